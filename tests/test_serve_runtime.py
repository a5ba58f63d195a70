"""`distill serve --allow-runtime-students`: students loaded into and unloaded from a real server
process on 127.0.0.1 while it serves (POST /v1/load_lora_adapter, /v1/unload_lora_adapter),
checked against the server test_serve_many.py starts with all three runs, and under load."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from test_serve import KEY, RUN_NAME, TOKEN_ENV, ask, start_server
from test_serve_many import PROMPTS, STUDENTS, client, many  # noqa: F401  (fixtures shared with that module)


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


def test_a_load_that_cannot_be_served_is_refused_and_nothing_changes(many, hot, tmp_path):
    runs, other_base_run = many["runs"], many["other"]
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
    # top_p 1 like the first run's settings: below 1 the nucleus is sorted, and the tiny model's
    # near-uniform probabilities can agree to 1e-7, so the last-bit differences between a request
    # decoded alone and in a batch (any LoRA forward has them) can reorder them and the draw
    robot += [(dict(model="robot-student", messages=[{"role": "user", "content": q}], seed=310 + i, temperature=0.7,
                    top_p=1.0, max_tokens=12), True) for i, q in enumerate(questions[2:])]
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
