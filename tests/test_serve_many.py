"""`distill serve RUN_DIR...`: three tiny runs' students on one base model in one real server
process on 127.0.0.1 (and the teacher with --teacher), the distilled prompt dropped from
requests that still carry it, and the runs refused at start."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import openai
import pytest
from test_serve import RUN_NAME, SYSTEM_PROMPT, Served, ask, ask_all_at_once, local_completion, served, start_server
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


_MANY: dict = {}


def many_students(tmp_path_factory, pytestconfig) -> dict:
    """The three runs and their server, built on first use and shared with test_serve_runtime.py
    (stopped at the end of the session); "other" is a run like them on another base model."""
    if not _MANY:
        root = tmp_path_factory.mktemp("many")
        shared = served(tmp_path_factory, pytestconfig)
        model = shared.model
        runs = {RUN_NAME: shared.run} | {name: tiny_run(root, model, name, prompt, train)
                                         for name, (prompt, train) in TRAINED_HERE.items()}
        server = start_server(list(runs.values()), root / "logs", "--teacher")
        pytestconfig.add_cleanup(server.stop)
        other_model = save_tiny(root / "other", seed=1)  # another seed's weights
        other = tiny_run(root, other_model, "parrot", "You are a parrot.", {"steps": 1, "seed": 0})
        _MANY.update(server=server, model=model, runs=runs, root=root, other=other)
    assert _MANY["server"].proc.poll() is None, _MANY["server"].logs()
    return _MANY


@pytest.fixture(scope="module")
def many(tmp_path_factory, pytestconfig) -> dict:
    return many_students(tmp_path_factory, pytestconfig)


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
    from promptdistill.serve_server import Server
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


def test_runs_that_cannot_be_served_together_are_refused_at_start(many, tmp_path, capsys):
    runs, other = many["runs"], many["other"]
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

