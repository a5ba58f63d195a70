"""`distill serve RUN_DIR...`: three tiny runs' students on one base model in one real server
process on 127.0.0.1 (and the teacher with --teacher), the distilled prompt dropped from
requests that still carry it, and the runs refused at start."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from test_serve import (KEY, RUN_NAME, SYSTEM_PROMPT, TOKEN_ENV, Served, ask, ask_all_at_once, local_completion,
                        served, start_server)
from tiny import save_tiny, trained_tiny_run
from chat_page import READ_COLUMNS, say
from test_serve_page import needs_browser
from webdriver import headless_chromium

# The first run is test_serve's (its tiny model is the base of all three); the other two are
# trained here with other prompts, steps, learning rates and seeds, so that a row decoded
# through another student's adapter would show in its answer.
TRAINED_HERE = {"poet": ("You are a poet. Answer in rhyme.", {"steps": 5, "lr": 5e-2, "seed": 1}),
                "robot": ("You are a robot. Beep before every sentence.", {"steps": 4, "lr": 4e-2, "seed": 2})}
PROMPTS = {RUN_NAME: SYSTEM_PROMPT} | {name: prompt for name, (prompt, _) in TRAINED_HERE.items()}
STUDENTS = [f"{name}-student" for name in PROMPTS]


def tiny_run(root: Path, model: Path, name: str, system_prompt: str, train: dict) -> Path:
    (root / name).mkdir()
    _, run = trained_tiny_run(root / name, model, 12, name=name, system_prompt=system_prompt,
                              lora={"rank": 4, "alpha": 8}, train=train | {"batch_size": 4, "eval_every": 3},
                              teacher={"model": str(model), "dtype": "float32"},
                              student={"model": str(model), "dtype": "float32"})  # fp32: see test_serve.build_finished_run
    return run.root


@pytest.fixture(scope="module")
def many(tmp_path_factory, pytestconfig) -> dict:
    root = tmp_path_factory.mktemp("many")
    shared = served(tmp_path_factory, pytestconfig)
    model = shared.model
    runs = {RUN_NAME: shared.run} | {name: tiny_run(root, model, name, prompt, train)
                                     for name, (prompt, train) in TRAINED_HERE.items()}
    server = start_server(list(runs.values()), root / "logs", "--teacher")
    pytestconfig.add_cleanup(server.stop)
    return {"server": server, "model": model, "runs": runs, "root": root}


@pytest.fixture(scope="module")
def other_base_run(many) -> Path:
    """A run like the others but trained on another tiny model (another seed's weights)."""
    other_model = save_tiny(many["root"] / "other", seed=1)
    return tiny_run(many["root"], other_model, "parrot", "You are a parrot.", {"steps": 1, "seed": 0})


@pytest.fixture
def client(many) -> openai.OpenAI:
    with openai.OpenAI(base_url=f"{many['server'].url}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def local(many, name: str, messages: list[dict], seed: int, max_tokens: int = 12):
    """The answer of run `name`'s own student (base + its adapter alone), computed in this process."""
    srv = Served(many["server"], many["model"], many["runs"][name], many["root"])
    return local_completion(srv, messages, adapter=True, seed=seed, max_tokens=max_tokens)


def test_each_student_answers_with_its_own_adapter(many, client):
    assert [m.id for m in client.models.list().data] == STUDENTS + [f"{n}-teacher" for n in PROMPTS]
    messages = [{"role": "user", "content": "Where is the gold?"}]
    texts = {}
    for name in PROMPTS:
        for seed in (1, 2):
            r = client.chat.completions.create(model=f"{name}-student", messages=messages, temperature=1.0, top_p=1.0,
                                               max_tokens=12, seed=seed)
            want = local(many, name, messages, seed)
            assert r.choices[0].message.content == want.text and r.usage.completion_tokens == len(want.token_ids)
            texts[name, seed] = want.text
    # the adapters differ: a row decoded through another student's adapter would show
    assert len({tuple(texts[n, s] for s in (1, 2)) for n in PROMPTS}) == 3, texts


def test_a_mixed_burst_gets_the_answers_each_request_gets_alone(many, client):
    """Requests for three students and the teacher, several settings, some streamed, some with
    logprobs: sent together they get exactly what each got alone, and students were decoded
    in shared batches (the server counts batches that mixed students)."""
    questions = ["Where is the gold?", "Tell me about the storm.", "Who is your captain?"]
    settings = [dict(temperature=1.0, top_p=1.0, max_tokens=12), dict(temperature=0.0, max_tokens=10),
                dict(temperature=0.8, top_p=0.9, max_tokens=8, logprobs=True, top_logprobs=2)]
    models = STUDENTS + ["poet-teacher"]
    requests = []
    for i in range(24):
        kwargs = dict(model=models[i % 4], messages=[{"role": "user", "content": questions[i // 4 % 3]}],
                      seed=200 + i, **settings[i // 4 % 3])
        requests.append((kwargs, "logprobs" not in kwargs and i % 3 == 0))

    alone = [ask(client, r) for r in requests]
    before = httpx.get(f"{many['server'].url}/metrics").json()
    together = ask_all_at_once(client, requests)
    after = httpx.get(f"{many['server'].url}/metrics").json()
    assert together == alone
    assert len({text for text, _, _ in alone}) >= 12 and sum(s for _, s in requests) >= 4
    assert after["batches"]["mixing_students"] > before["batches"]["mixing_students"], (before, after)
    for name in models:  # per-model counts: 6 requests each, twice
        assert after["models"][name]["requests"] - before["models"][name]["requests"] == 6
        assert after["models"][name]["latency_s"]["p99"] >= after["models"][name]["latency_s"]["p50"] > 0


def test_the_distilled_prompt_is_dropped_and_another_is_kept_and_logged(many, client):
    from transformers import AutoTokenizer

    from promptdistill.render import prompt_ids

    prompt = SYSTEM_PROMPT
    question = {"role": "user", "content": "Where is the gold?"}
    spaced = "  " + prompt.replace(" ", "\n ", 1) + "\t"  # the same prompt after whitespace normalisation
    kwargs = dict(model=f"{RUN_NAME}-student", temperature=1.0, top_p=1.0, max_tokens=12, seed=7)
    bare = client.chat.completions.with_raw_response.create(messages=[question], **kwargs)
    carried = client.chat.completions.with_raw_response.create(messages=[{"role": "system", "content": spaced}, question],
                                                               **kwargs)
    assert "x-promptdistill-prompt-dropped" not in bare.headers
    assert carried.headers["x-promptdistill-prompt-dropped"] == "1"
    bare, carried = bare.parse(), carried.parse()
    assert carried.choices[0].message.content == bare.choices[0].message.content
    tokenizer = AutoTokenizer.from_pretrained(many["model"])
    saved = len(prompt_ids(tokenizer, [{"role": "system", "content": spaced}, question])) - bare.usage.prompt_tokens
    assert saved > 10 and carried.usage.prompt_tokens == bare.usage.prompt_tokens
    assert carried.usage.model_extra["prompt_tokens_saved"] == saved and "prompt_tokens_saved" not in bare.usage.model_extra
    chunks = list(client.chat.completions.create(messages=[{"role": "system", "content": prompt}, question], stream=True,
                                                 stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == bare.choices[0].message.content
    streamed_saved = len(prompt_ids(tokenizer, [{"role": "system", "content": prompt}, question])) - bare.usage.prompt_tokens
    assert chunks[-1].usage.model_extra["prompt_tokens_saved"] == streamed_saved

    # another run's prompt is not this student's: it goes through, answered with it, and logged
    other = [{"role": "system", "content": PROMPTS["robot"]}, question]
    r = client.chat.completions.with_raw_response.create(messages=other, **kwargs)
    assert "x-promptdistill-prompt-dropped" not in r.headers
    want = local(many, RUN_NAME, other, seed=7)
    assert r.parse().choices[0].message.content == want.text and r.parse().usage.prompt_tokens == want.prompt_tokens
    log = many["server"].err.read_text()
    assert f"{RUN_NAME}-student: a request's system message ({len(PROMPTS['robot'])} characters) is not the prompt" in log
    assert "outside what the student was trained on" in log and PROMPTS["robot"] not in log
    metrics = httpx.get(f"{many['server'].url}/metrics").json()["models"][f"{RUN_NAME}-student"]
    assert metrics["prompt_tokens_saved"] == saved + streamed_saved  # no other test sends this student a system message


def test_keep_system_prompt_passes_the_distilled_prompt_on(many):
    """--keep-system-prompt, in process: the request's tokens are the prompt's and nothing is saved."""
    from promptdistill.config_file import load_config
    from promptdistill.render import prompt_ids
    from promptdistill.rundir import RunDir
    from promptdistill.serve import Server
    from promptdistill.serve_openai import ChatRequest

    cfg = load_config(many["runs"][RUN_NAME])
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "Ahoy?"}]
    request = ChatRequest(model=f"{RUN_NAME}-student", messages=messages)
    for keep, sent in ((True, messages), (False, messages[1:])):
        server = Server([(cfg, RunDir(cfg.run_path))], keep_system_prompt=keep, max_batch=1)
        job, saved = server.prepare(request)
        assert job.ids == prompt_ids(server.models.tokenizer, sent)
        assert (saved is None) == keep


def refusal(capsys, *run_dirs: Path) -> str:
    from promptdistill.serve import main

    assert main([str(r) for r in run_dirs] + ["--port", "1"]) == 2  # port 1: a start would fail loudly
    return capsys.readouterr().err


def test_runs_that_cannot_be_served_together_are_refused_at_start(many, other_base_run, tmp_path, capsys):
    runs, other = many["runs"], other_base_run
    err = refusal(capsys, runs[RUN_NAME], other)
    assert f"run 'parrot' ({other})" in err and "one server serves students of one base model" in err

    missing = shutil.copytree(runs["poet"], tmp_path / "poet-missing")
    (missing / "student" / "adapter_model.safetensors").unlink()
    err = refusal(capsys, runs[RUN_NAME], missing)
    assert f"run 'poet' ({missing})" in err and "no trained adapter" in err

    corrupt = shutil.copytree(runs["robot"], tmp_path / "robot-corrupt")
    weights = corrupt / "student" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    err = refusal(capsys, runs[RUN_NAME], runs["poet"], corrupt)
    assert f"run 'robot' ({corrupt})" in err and f"the adapter file {weights} is corrupt or truncated" in err

    twin = shutil.copytree(runs["poet"], tmp_path / "poet-again")
    err = refusal(capsys, runs["poet"], twin)
    assert f"run 'poet' ({twin}): a run named 'poet' is already served from {runs['poet']}" in err


@needs_browser
def test_the_page_switches_student_each_beside_its_own_runs_teacher(many, tmp_path):
    """In headless Chromium: every student is offered; each chosen student talks two turns beside
    its own run's teacher, prompted with that run's system prompt; the answers are the server's."""
    from transformers import AutoTokenizer

    from promptdistill.render import prompt_ids

    tokenizer, url = AutoTokenizer.from_pretrained(many["model"]), many["server"].url

    def unstreamed(model: str, messages: list[dict]) -> str:
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={"model": model, "messages": messages, "seed": 7})
        return r.json()["choices"][0]["message"]["content"]

    with headless_chromium(tmp_path / "chromium") as browser:
        browser.open(f"{url}/")
        browser.wait_for("return document.querySelectorAll('.column').length === 2", what="two columns")
        offered = browser.run("return [...document.querySelectorAll('#model option')].map(o => o.value)")
        assert offered == STUDENTS + [f"{n}-teacher" for n in PROMPTS]
        browser.type("#seed", "7")
        said = ["Where is the gold?", "And who hid it?"]
        for name in ("poet", "robot"):
            pair = [f"{name}-student", f"{name}-teacher"]
            browser.click(f"#model option[value='{pair[0]}']")
            browser.wait_for("return document.querySelectorAll('.turn').length === 0 && [...document.querySelectorAll("
                             "'.column')].map(c => c.dataset.model).join() === arguments[0]", ",".join(pair),
                             what=f"a new chat with {pair}")
            for text in said:
                say(browser, text)
            columns = browser.run(READ_COLUMNS)
            assert [c["model"] for c in columns] == pair
            for column in columns:
                history = [{"role": "system", "content": PROMPTS[name]}] if column["model"] == pair[1] else []
                for turn in column["turns"]:
                    history.append({"role": "user", "content": turn["user"]})
                    assert int(turn["promptTokens"]) == len(prompt_ids(tokenizer, history)), (column["model"], turn)
                    assert turn["answer"] == unstreamed(column["model"], history)
                    history.append({"role": "assistant", "content": turn["answer"]})
        assert browser.screenshot(tmp_path / "page.png").read_bytes()[:4] == b"\x89PNG"


# --- students loaded and unloaded while serving (--allow-runtime-students) ------------------


@pytest.fixture(scope="module")
def hot(many, pytestconfig) -> dict:
    """A server started with the first run alone, behind the bearer token, that loads and
    unloads students while serving; every test leaves it serving that run alone again."""
    # batches of 4: under load, requests then wait behind the first run's batches (see the load test)
    server = start_server([many["runs"][RUN_NAME]], many["root"] / "hot-logs", "--teacher", "--token-env", TOKEN_ENV,
                          "--allow-runtime-students", "--max-batch", "4")
    pytestconfig.add_cleanup(server.stop)
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60) as c:
        yield {"server": server, "client": c}


def change(hot, verb: str, body: dict, key: str = KEY) -> httpx.Response:
    """POST /v1/{verb}_lora_adapter."""
    return httpx.post(f"{hot['server'].url}/v1/{verb}_lora_adapter", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {key}"})


def served_now(hot) -> dict:
    """What the server serves: the models it lists, the page's prompts, its adapters and metrics."""
    def get(path: str) -> dict:
        return httpx.get(f"{hot['server'].url}{path}", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()

    metrics = get("/metrics")
    return {"models": [m["id"] for m in get("/v1/models")["data"]], "prompts": get("/page/system_prompts"),
            "adapters": metrics["adapters"], "metrics": metrics}


def test_runtime_students_are_off_unless_allowed(many):
    r = httpx.post(f"{many['server'].url}/v1/load_lora_adapter", json={"lora_path": str(many["runs"]["poet"])})
    assert r.status_code == 404 and "--allow-runtime-students" in r.json()["error"]["message"]
    assert [m["id"] for m in httpx.get(f"{many['server'].url}/v1/models").json()["data"]] == \
        STUDENTS + [f"{n}-teacher" for n in PROMPTS]


def test_a_student_loaded_while_serving_answers_as_if_served_from_the_start(many, hot, client):
    """poet loaded into a server started with the first run alone: listed (its teacher too, and
    its prompt on the page), counted, its distilled prompt dropped, and every answer the one the
    server started with all three runs gives; unloaded, it is a 404 and its adapter's memory is
    given back; loaded again, the same answers."""
    before = served_now(hot)
    assert before["models"] == [f"{RUN_NAME}-student", f"{RUN_NAME}-teacher"] and before["adapters"]["loaded"] == 1
    requests = [(dict(model=f"poet-{who}", messages=[{"role": "user", "content": question}], seed=seed, **settings),
                 stream)
                for who in ("student", "teacher")
                for seed, question, settings, stream in (
                    (1, "Where is the gold?", dict(temperature=1.0, top_p=1.0, max_tokens=12), False),
                    (2, "Tell me about the storm.", dict(temperature=0.8, top_p=0.9, max_tokens=10), True),
                    (3, "Who is your captain?", dict(temperature=0.0, max_tokens=8, logprobs=True, top_logprobs=2),
                     False))]
    from_the_start = [ask(client, r) for r in requests]
    assert len({text for text, _, _ in from_the_start}) >= 4, from_the_start
    carrying = dict(model="poet-student", seed=1, temperature=1.0, top_p=1.0, max_tokens=12,
                    messages=[{"role": "system", "content": PROMPTS["poet"]}, {"role": "user", "content": "Where is the gold?"}])

    for attempt in range(2):
        r = change(hot, "load", {"lora_path": str(many["runs"]["poet"]), "lora_name": "poet-student"})
        assert r.status_code == 200, r.text
        assert [m["id"] for m in r.json()["data"]] == ["poet-student", "poet-teacher"]
        now = served_now(hot)
        assert now["models"] == before["models"] + ["poet-student", "poet-teacher"]
        assert now["prompts"] == before["prompts"] | {"poet-teacher": PROMPTS["poet"]}
        assert now["adapters"]["loaded"] == 2 and now["adapters"]["bytes"] > before["adapters"]["bytes"]
        assert {"poet-student", "poet-teacher"} <= set(now["metrics"]["models"])
        assert [ask(hot["client"], r) for r in requests] == from_the_start, attempt
        dropped = hot["client"].chat.completions.with_raw_response.create(**carrying)
        assert dropped.headers["x-promptdistill-prompt-dropped"] == "1"
        assert dropped.parse().choices[0].message.content == from_the_start[0][0]

        r = change(hot, "unload", {"lora_name": "poet-student"})
        assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["poet-student", "poet-teacher"]
        after = served_now(hot)
        assert {k: after[k] for k in ("models", "prompts", "adapters")} == \
            {k: before[k] for k in ("models", "prompts", "adapters")}  # the adapter's bytes given back
        for who in ("student", "teacher"):
            with pytest.raises(openai.NotFoundError, match="does not exist"):
                hot["client"].chat.completions.create(model=f"poet-{who}", messages=requests[0][0]["messages"])
        assert after["metrics"]["models"]["poet-student"]["requests"] == 4 * (attempt + 1)  # its counts stay
    log = hot["server"].err.read_text()
    assert log.count(f"loaded poet-student, poet-teacher from {many['runs']['poet']}") == 2
    assert log.count(f"unloaded poet-student, poet-teacher (run {many['runs']['poet']}) once the 0 requests waiting") == 2


def test_a_load_that_cannot_be_served_is_refused_and_nothing_changes(many, hot, other_base_run, tmp_path):
    runs = many["runs"]
    before = served_now(hot)
    missing = shutil.copytree(runs["poet"], tmp_path / "poet-missing")
    (missing / "student" / "adapter_model.safetensors").unlink()
    corrupt = shutil.copytree(runs["robot"], tmp_path / "robot-corrupt")
    weights = corrupt / "student" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    # whole files that do not fit together: peft fails half-way through adding it to the model
    misfit = shutil.copytree(runs["robot"], tmp_path / "robot-misfit")
    config = json.loads((misfit / "student" / "adapter_config.json").read_text())
    (misfit / "student" / "adapter_config.json").write_text(json.dumps(config | {"r": config["r"] * 2}))
    refused = [
        ({"lora_path": str(misfit)}, 400, [f"run 'robot' ({misfit}): cannot load its adapter", "size mismatch"]),
        ({"lora_path": str(other_base_run)}, 400, [f"run 'parrot' ({other_base_run})",
                                                   "one server serves students of one base model"]),
        ({"lora_path": str(missing)}, 400, [f"run 'poet' ({missing})", "no trained adapter"]),
        ({"lora_path": str(corrupt)}, 400, [f"run 'robot' ({corrupt})", f"the adapter file {weights} is corrupt"]),
        ({"lora_path": str(runs[RUN_NAME])}, 400, [f"a run named '{RUN_NAME}' is already served from {runs[RUN_NAME]}"]),
        ({"lora_path": str(runs["poet"]), "lora_name": "bard-student"}, 400,
         [f"run 'poet' ({runs['poet']}) is served as 'poet-student', not 'bard-student'"]),
        ({"lora_path": str(tmp_path / "nowhere")}, 400, [f"{tmp_path / 'nowhere'}", "config file not found"]),
        ({"lora_name": "poet-student"}, 400, ["lora_path: Field required"]),
    ]
    for body, status, said in refused:
        r = change(hot, "load", body)
        assert r.status_code == status and all(s in r.json()["error"]["message"] for s in said), (body, r.text)
    for body, status, said in (({"lora_name": "poet-student"}, 404, ["no student 'poet-student' is served"]),
                               ({"lora_name": f"{RUN_NAME}-teacher"}, 400, ["is a run's teacher"]),
                               ({"lora_name": f"{RUN_NAME}-student"}, 400, ["is the last student served"])):
        r = change(hot, "unload", body)
        assert r.status_code == status and all(s in r.json()["error"]["message"] for s in said), (body, r.text)
    for verb in ("load", "unload"):  # behind the bearer token like /v1
        r = change(hot, verb, {"lora_path": str(runs["poet"]), "lora_name": "poet-student"}, key="sk-wrong")
        assert r.status_code == 401 and "sk-wrong" not in r.text
    after = served_now(hot)
    assert {k: after[k] for k in ("models", "prompts", "adapters")} == {k: before[k] for k in ("models", "prompts", "adapters")}
    assert hot["client"].chat.completions.create(model=f"{RUN_NAME}-student", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=2).usage.completion_tokens <= 2


def test_the_first_run_unloaded_hands_the_model_to_the_next(many, hot, client):
    """The first run's adapter is peft's `default`, the active one, through which a one-student
    server decodes. Unloaded while poet is served, poet is the one student left, decoded through
    its adapter made active, and answers the same question (whose prefix the first run's answers
    left cached) as the server started with all three runs; the first run loaded again answers
    as it did."""
    first = f"{RUN_NAME}-student"

    def requests(model: str) -> list[tuple[dict, bool]]:
        return [(dict(model=model, messages=[{"role": "user", "content": "Where is the gold?"}], seed=seed,
                      temperature=1.0, top_p=1.0, max_tokens=12), seed == 2) for seed in (1, 2, 3)]

    before = served_now(hot)
    first_alone = [ask(hot["client"], r) for r in requests(first)]
    poet_want = [ask(client, r) for r in requests("poet-student")]
    assert change(hot, "load", {"lora_path": str(many["runs"]["poet"])}).status_code == 200
    r = change(hot, "unload", {"lora_name": first})
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == [first, f"{RUN_NAME}-teacher"]
    now = served_now(hot)
    assert now["models"] == ["poet-student", "poet-teacher"] and now["adapters"]["loaded"] == 1
    assert [ask(hot["client"], r) for r in requests("poet-student")] == poet_want
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        hot["client"].chat.completions.create(**requests(first)[0][0])

    assert change(hot, "load", {"lora_path": str(many["runs"][RUN_NAME])}).status_code == 200
    assert [ask(hot["client"], r) for r in requests(first)] == first_alone
    assert change(hot, "unload", {"lora_name": "poet-student"}).status_code == 200
    after = served_now(hot)
    assert {k: after[k] for k in ("models", "prompts", "adapters")} == {k: before[k] for k in ("models", "prompts", "adapters")}


def wait_until(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def streamed(first, stream) -> tuple:
    """What `ask` returns for a streamed request, from its first chunk (already read) and the rest."""
    pieces = [(c.choices[0].delta.content or "", c.choices[0].finish_reason) for c in [first, *stream] if c.choices]
    return "".join(t for t, _ in pieces), [f for _, f in pieces if f], None


def test_a_student_under_load_is_untouched_while_another_is_loaded_and_unloaded(many, hot, client):
    """8 clients keep asking the first run's student (each sends its request again once
    answered) while robot is loaded, asked four streamed requests at once (two with the first
    run's settings, decoded in the same batches; two with settings of their own, waiting behind
    the first run's batches), and unloaded while those streams are open: 0 errors, every answer
    the one its request gets alone; robot's streams finish with the answers of the server
    started with all three runs, and after the unload robot is a 404."""
    settings = [dict(temperature=1.0, top_p=1.0, max_tokens=12), dict(temperature=0.0, max_tokens=10)]
    questions = ["Where is the gold?", "Tell me about the storm.", "Who is your captain?", "Do you like parrots?"]

    def request(model: str, i: int, stream: bool) -> tuple[dict, bool]:
        return dict(model=model, messages=[{"role": "user", "content": questions[i % 4]}], seed=300 + i,
                    **settings[i % 2]), stream

    first_run = [request(f"{RUN_NAME}-student", i, i % 3 == 0) for i in range(8)]
    robot = [request("robot-student", i, True) for i in range(2)]
    robot += [(dict(model="robot-student", messages=[{"role": "user", "content": q}], seed=310 + i, temperature=0.7,
                    top_p=0.95, max_tokens=12), True) for i, q in enumerate(questions[2:])]
    before = served_now(hot)
    alone = [ask(hot["client"], r) for r in first_run]
    robot_want = [ask(client, r) for r in robot]
    assert len({text for text, _, _ in alone + robot_want}) >= 6, (alone, robot_want)

    stop, answers, errors = threading.Event(), [], []

    def keep_asking(i: int) -> None:
        while not stop.is_set():
            try:
                answers.append((i, ask(hot["client"], first_run[i]), time.monotonic()))
            except Exception as e:  # noqa: BLE001  every error is a failure, counted below
                errors.append((i, repr(e)))

    def open_stream(r: tuple[dict, bool]) -> tuple:
        stream = hot["client"].chat.completions.create(**r[0], stream=True)
        return next(stream), stream  # the first chunk: the request is in the server's queue

    with ThreadPoolExecutor(8 + len(robot)) as pool:
        load = [pool.submit(keep_asking, i) for i in range(8)]
        wait_until(lambda: len(answers) >= 8, "the first answers under load")
        r = change(hot, "load", {"lora_path": str(many["runs"]["robot"])})
        assert r.status_code == 200, r.text
        loaded = time.monotonic()
        mixed_before = served_now(hot)["metrics"]["batches"]["mixing_students"]
        streams = list(pool.map(open_stream, robot))
        r = change(hot, "unload", {"lora_name": "robot-student"})
        unloaded = time.monotonic()
        assert r.status_code == 200, r.text
        robot_got = [streamed(first, stream) for first, stream in streams]
        wait_until(lambda: sum(t > unloaded for _, _, t in answers) >= 8, "answers after the unload")
        stop.set()
        for f in load:
            f.result()
    after = served_now(hot)

    assert errors == [] and len(answers) >= 24
    assert [a for i, a, _ in answers if a != alone[i]] == []
    assert robot_got == robot_want
    assert sum(loaded < t < unloaded for _, _, t in answers) >= 1  # the load went on while robot was served
    assert after["metrics"]["batches"]["mixing_students"] > mixed_before  # robot's rows decoded beside the first run's
    assert after["metrics"]["models"]["robot-student"]["requests"] == len(robot)
    # the unload came while some of robot's requests were still waiting (batches of 4, the first
    # run's 8 clients ahead of them): those were answered first, through robot's adapter
    waited = re.search(r"unloaded robot-student, robot-teacher \(run .*\) once the (\d+) requests waiting",
                       hot["server"].err.read_text())
    assert waited and int(waited[1]) >= 1, hot["server"].err.read_text()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        hot["client"].chat.completions.create(**robot[0][0])
    assert {k: after[k] for k in ("models", "prompts", "adapters")} == {k: before[k] for k in ("models", "prompts", "adapters")}
