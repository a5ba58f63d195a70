"""`distill serve`: a real server process (python -m promptdistill.serve) on 127.0.0.1,
serving a finished tiny run (teacher == student: the teacher is the base weights with the
adapter off), driven with the official openai client.

The server is started once per test session and shared with test_openai_backend.py
(`served()` below): it is started with --teacher and --token-env, so every /v1 request
needs the planted key `KEY` as its bearer token.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from tiny import save_chatty_tiny, save_tiny, trained_tiny_run

REPO = Path(__file__).parents[1]
TOKEN_ENV = "PROMPTDISTILL_TEST_SERVE_KEY"
KEY = "sk-test-" + secrets.token_hex(16)  # the server's bearer token, planted in $TOKEN_ENV; must never be written
ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", TOKEN_ENV: KEY}
RUN_NAME = "tiny"
STUDENT, TEACHER = f"{RUN_NAME}-student", f"{RUN_NAME}-teacher"
SYSTEM_PROMPT = "You are a pirate. Talk like one."
def build_finished_run(root: Path) -> tuple[Path, Path]:
    """A tiny run with hand-written teacher answers and a trained student: (model dir, run dir)."""
    model = save_chatty_tiny(root / "tiny-chatty")
    # fp32: a bf16 matmul (dtype auto on a CPU with bf16 units) rounds by the batch's shape, so a
    # request's answer would depend on the batch it was decoded in, as with any bf16 server
    _, run = trained_tiny_run(root, model, 12, name=RUN_NAME, system_prompt=SYSTEM_PROMPT, lora={"rank": 4, "alpha": 8},
                              train={"steps": 3, "lr": 3e-2, "batch_size": 4, "eval_every": 3},
                              teacher={"model": str(model), "dtype": "float32"}, student={"model": str(model), "dtype": "float32"})
    return model, run.root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    out: Path
    err: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        return self.out.read_text(errors="replace") + self.err.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(run_dir: Path | list[Path], logs: Path, *args: str, env: dict = ENV, timeout: float = 180) -> ServerProcess:
    """`python -m promptdistill.serve RUN_DIR... --port P ARGS...`, returned once /health answers."""
    port = free_port()
    logs.mkdir(parents=True, exist_ok=True)
    out, err = logs / f"serve-{port}.out", logs / f"serve-{port}.err"
    run_dirs = [str(r) for r in (run_dir if isinstance(run_dir, list) else [run_dir])]
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen([sys.executable, "-m", "promptdistill.serve", *run_dirs, "--port", str(port), *args],
                                cwd=REPO, env=env, stdout=o, stderr=e)
    server = ServerProcess(proc, port, out, err)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{server.logs()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise AssertionError(f"server not ready after {timeout}s:\n{server.logs()}")
        time.sleep(0.1)


@dataclass
class Served:
    server: ServerProcess
    model: Path  # the tiny model dir (teacher == student)
    run: Path  # the served run dir
    root: Path


_SHARED: dict[str, Served] = {}


def served(tmp_path_factory, pytestconfig) -> Served:
    """The session's server (started on first use, stopped at the end of the session)."""
    if "served" not in _SHARED:
        root = tmp_path_factory.mktemp("served")
        model, run = build_finished_run(root)
        server = start_server(run, root / "logs", "--teacher", "--token-env", TOKEN_ENV)  # default --host
        pytestconfig.add_cleanup(server.stop)
        _SHARED["served"] = Served(server, model, run, root)
    s = _SHARED["served"]
    assert s.server.proc.poll() is None, s.server.logs()
    return s


@pytest.fixture(scope="module")
def srv(tmp_path_factory, pytestconfig) -> Served:
    return served(tmp_path_factory, pytestconfig)


@pytest.fixture
def client(srv) -> openai.OpenAI:
    with openai.OpenAI(base_url=f"{srv.server.url}/v1", api_key=KEY, max_retries=0, timeout=30) as c:
        yield c


def local_completion(srv: Served, messages: list[dict], adapter: bool, seed: int, max_tokens: int,
                     top_logprobs: int | None = None):
    """The same weights' Completion, computed in this process."""
    from promptdistill.backends.base import SamplingParams
    from promptdistill.backends.local_model import load_causal_lm
    from promptdistill.backends.local_sampler import LocalSampler
    from promptdistill.render import prompt_ids

    model, tokenizer = load_causal_lm(srv.model, "cpu", adapter_dir=srv.run / "student" if adapter else None)
    sampler = LocalSampler(model, tokenizer)
    ids = prompt_ids(tokenizer, messages)
    params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=max_tokens, top_logprobs=top_logprobs)
    return sampler.generate([ids], params, [seed])[0]


def local_answer(srv: Served, messages: list[dict], adapter: bool, seed: int, max_tokens: int) -> tuple[str, int, int, str]:
    """(text, prompt tokens, completion tokens, finish reason) from the same weights, in this process."""
    done = local_completion(srv, messages, adapter, seed, max_tokens)
    return done.text, done.prompt_tokens, len(done.token_ids), done.finish_reason


def listening_addresses(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of the sockets listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, state = fields[1], fields[3]
            ip, hex_port = address.split(":")
            if int(hex_port, 16) == port and state == "0A":  # 0A = LISTEN
                found.append(ip)
    return found


# --- the tests ------------------------------------------------------------------------


def test_binds_loopback_by_default_and_health_needs_no_token(srv):
    assert f"at http://127.0.0.1:{srv.server.port}/v1 (bearer token required)" in srv.server.out.read_text()
    if Path("/proc/net/tcp").exists():
        assert listening_addresses(srv.server.port) == ["0100007F"]  # 127.0.0.1 only, no 0.0.0.0 / ::
    health = httpx.get(f"{srv.server.url}/health").json()
    assert health["status"] == "ok" and sorted(health) == ["batches", "largest_batch", "status", "waiting"]


def test_every_v1_route_needs_the_bearer_token(srv, client):
    wrong = "sk-test-" + secrets.token_hex(16)
    for headers in ({}, {"Authorization": f"Bearer {wrong}"}, {"Authorization": KEY}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
            r = httpx.request(method, srv.server.url + path, headers=headers,
                              json={"model": STUDENT, "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
            assert wrong not in r.text and KEY not in r.text
    with openai.OpenAI(base_url=f"{srv.server.url}/v1", api_key=wrong, max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    assert [m.id for m in client.models.list().data] == [STUDENT, TEACHER]
    assert client.models.retrieve(TEACHER).id == TEACHER


def test_completions_are_the_local_models_answers_with_usage(srv, client):
    """Student = base + adapter, teacher = adapter off; seed, temperature, top_p and max_tokens
    honoured: the server's answers equal the same weights' answers computed here."""
    student_msgs = [{"role": "user", "content": "Where is the gold?"}]
    teacher_msgs = [{"role": "system", "content": SYSTEM_PROMPT}] + student_msgs
    texts = {}
    for who, messages, adapter in ((STUDENT, student_msgs, True), (TEACHER, teacher_msgs, False),
                                   (TEACHER, student_msgs, False)):
        for seed in (1, 2, 3):
            r = client.chat.completions.create(model=who, messages=messages, temperature=1.0, top_p=1.0,
                                               max_tokens=12, seed=seed)
            text, n_prompt, n_completion, finish = local_answer(srv, messages, adapter, seed, max_tokens=12)
            choice = r.choices[0]
            assert (choice.message.content, choice.finish_reason) == (text, finish), (who, seed)
            assert choice.message.role == "assistant" and r.model == who and r.object == "chat.completion"
            assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, n_completion)
            assert r.usage.total_tokens == n_prompt + n_completion and 1 <= n_completion <= 12
            texts[who, len(messages), seed] = text
    assert sum(bool(t) for t in texts.values()) >= 5  # real answers, not a row of empty strings
    # the adapter changes the answers: the student is not secretly the base model, or vice versa
    assert any(texts[STUDENT, 1, s] != texts[TEACHER, 1, s] for s in (1, 2, 3))
    again = client.chat.completions.create(model=STUDENT, messages=student_msgs, temperature=1.0, top_p=1.0,
                                           max_tokens=12, seed=2)
    assert again.choices[0].message.content == texts[STUDENT, 1, 2]  # same seed, same answer


def test_a_conversation_is_rendered_as_training_rendered_that_turn(srv, client):
    """A multi-turn request reaches the student as the prompt of its training example for that turn
    (render_example: the tokens before the first trained one): as many prompt tokens, and the answer
    the same weights give on exactly those tokens."""
    from transformers import AutoTokenizer

    from promptdistill.render import prompt_ids, render_example

    conversation = [{"role": "user", "content": "Where is the gold?"}, {"role": "assistant", "content": "Arr, buried deep."},
                    {"role": "user", "content": "Who buried it?"}, {"role": "assistant", "content": "Old Flint did."},
                    {"role": "user", "content": "And where is he now?"}]
    tokenizer = AutoTokenizer.from_pretrained(srv.model)
    example = render_example(tokenizer, conversation, "At the bottom of the sea.", "turn-3")
    trained_on = example.tokens[:example.mask.index(1)]
    assert trained_on == prompt_ids(tokenizer, conversation)
    for seed in (1, 2):
        r = client.chat.completions.create(model=STUDENT, messages=conversation, temperature=1.0, top_p=1.0,
                                           max_tokens=12, seed=seed)
        text, n_prompt, _, _ = local_answer(srv, conversation, adapter=True, seed=seed, max_tokens=12)
        assert r.usage.prompt_tokens == n_prompt == len(trained_on)
        assert r.choices[0].message.content == text


def test_logprobs_are_the_local_models_in_openai_shape(srv, client):
    messages = [{"role": "user", "content": "Where is the gold?"}]
    r = client.chat.completions.create(model=STUDENT, messages=messages, temperature=1.0, top_p=1.0, max_tokens=10,
                                       seed=5, logprobs=True, top_logprobs=3)
    local = local_completion(srv, messages, True, 5, max_tokens=10, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == len(local.token_ids)
    for got, want in zip(content, local.logprobs, strict=True):
        assert got.token == want["token"] and got.logprob == pytest.approx(want["logprob"], abs=1e-4)
        assert [t.token for t in got.top_logprobs] == [t for t, _, _ in want["top"]]
        tops = [t.logprob for t in got.top_logprobs]
        assert tops == sorted(tops, reverse=True) and got.logprob <= tops[0] + 1e-6 and bytes(got.bytes).decode() == got.token
    plain = client.chat.completions.create(model=STUDENT, messages=messages, max_tokens=4, seed=5)
    assert plain.choices[0].logprobs is None  # only when asked
    as_ids = client.chat.completions.create(model=STUDENT, messages=messages, temperature=1.0, top_p=1.0, max_tokens=10,
                                            seed=5, logprobs=True, top_logprobs=3,
                                            extra_body={"return_tokens_as_token_ids": True})  # vLLM's option
    for got, want in zip(as_ids.choices[0].logprobs.content, local.logprobs, strict=True):
        assert got.token == f"token_id:{want['id']}" and got.logprob == pytest.approx(want["logprob"], abs=1e-4)
        assert [t.token for t in got.top_logprobs] == [f"token_id:{i}" for _, i, _ in want["top"]]
    with pytest.raises(openai.BadRequestError, match="without streaming"):
        client.chat.completions.create(model=STUDENT, messages=messages, max_tokens=4, logprobs=True, stream=True)


def test_streaming_gives_the_same_answer_in_openai_chunks(srv, client):
    messages = [{"role": "user", "content": "Tell me about the storm."}]
    kwargs = dict(model=STUDENT, messages=messages, temperature=1.0, top_p=1.0, max_tokens=16, seed=11)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    # on the wire: server-sent events, every one a JSON chunk, the last one [DONE]
    with httpx.stream("POST", f"{srv.server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json=kwargs | {"stream": True}, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert "".join(json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events[:-1]) == text


def test_bad_requests_get_openai_errors(srv, client):
    hi = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=hi)
    with pytest.raises(openai.BadRequestError, match="n > 1"):
        client.chat.completions.create(model=STUDENT, messages=hi, n=2)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 2048"):
        client.chat.completions.create(model=STUDENT, messages=hi, max_tokens=5000)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=STUDENT, messages=hi, temperature=-1)
    r = httpx.post(f"{srv.server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   content=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    # and the server is still fine
    assert client.chat.completions.create(model=STUDENT, messages=hi, max_tokens=2).usage.completion_tokens <= 2


def test_serve_refuses_a_token_env_that_is_not_set(srv, tmp_path):
    env = {k: v for k, v in ENV.items() if k != TOKEN_ENV}
    r = subprocess.run([sys.executable, "-m", "promptdistill.serve", str(srv.run), "--token-env", TOKEN_ENV],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and f"--token-env {TOKEN_ENV}: that environment variable is not set" in r.stderr


def ask(client, request: tuple[dict, bool]) -> tuple:
    """One chat request (kwargs, stream?): its text, finish reasons and rounded logprobs."""
    kwargs, stream = request
    if stream:
        chunks = client.chat.completions.create(**kwargs, stream=True)
        pieces = [(c.choices[0].delta.content or "", c.choices[0].finish_reason) for c in chunks if c.choices]
        return "".join(t for t, _ in pieces), [f for _, f in pieces if f], None
    r = client.chat.completions.create(**kwargs)
    lp = r.choices[0].logprobs
    return (r.choices[0].message.content, [r.choices[0].finish_reason],
            None if lp is None else [(t.token, round(t.logprob, 4)) for t in lp.content])


def ask_all_at_once(client, requests: list[tuple[dict, bool]]) -> list[tuple]:
    """Every request from its own thread, released together by a barrier: one burst."""
    start = threading.Barrier(len(requests))

    def ask_together(request) -> tuple:
        start.wait()
        return ask(client, request)

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(ask_together, requests))


def test_concurrent_requests_get_the_answers_they_get_alone(srv, client):
    """Batching is invisible in the answers: each of a burst of concurrent requests (varied
    models, seeds, temperatures, top_p, max_tokens, logprobs, streaming) gets exactly the
    answer it got when sent alone, although the burst was decoded in shared batches."""
    questions = ["Where is the gold?", "Tell me about the storm.", "Who is your captain?", "Do you like parrots?"]
    settings = [dict(temperature=1.0, top_p=1.0, max_tokens=12), dict(temperature=0.0, max_tokens=12),
                dict(temperature=0.8, top_p=0.9, max_tokens=6),
                dict(temperature=1.0, top_p=1.0, max_tokens=12, logprobs=True, top_logprobs=2)]
    requests = []  # 2 models x 4 settings: 8 groups of 3 that can share a batch
    for i in range(24):
        kwargs = dict(model=(STUDENT, TEACHER)[i // 12], messages=[{"role": "user", "content": questions[i // 4 % 4]}],
                      seed=100 + i, **settings[i % 4])
        requests.append((kwargs, i % 8 == 1))  # some greedy ones stream

    alone = [ask(client, r) for r in requests]  # one at a time: every request is a batch of one
    before = httpx.get(f"{srv.server.url}/health").json()
    together = ask_all_at_once(client, requests)
    after = httpx.get(f"{srv.server.url}/health").json()
    assert together == alone
    texts = [text for text, _, _ in alone]
    assert sum(map(bool, texts)) >= 12 and len(set(texts)) >= 8, texts  # real, varied answers
    assert after["largest_batch"] > 1 and after["batches"] - before["batches"] < len(requests), (before, after)


def test_a_full_queue_answers_503_with_retry_after(tmp_path):
    """--max-batch 1 --max-queue 2 under a burst of 24 requests at once: each request is either
    answered or refused with 503, Retry-After and an OpenAI-shaped error; none is lost, and the
    server serves again afterwards."""
    model = save_tiny(tmp_path)  # not the chatty one: ~200-token answers keep the worker busy
    _, run = trained_tiny_run(tmp_path, model, 8, name=RUN_NAME, train={"steps": 1, "batch_size": 2, "eval_every": 1})
    server = start_server(run.root, tmp_path / "logs", "--max-batch", "1", "--max-queue", "2")
    try:
        body = {"model": STUDENT, "messages": [{"role": "user", "content": "Where is the gold?"}], "max_tokens": 64,
                "temperature": 1.0}
        start = threading.Barrier(24)

        def post(i: int) -> httpx.Response:
            start.wait()
            return httpx.post(f"{server.url}/v1/chat/completions", json=body | {"seed": i}, timeout=60)

        with ThreadPoolExecutor(24) as pool:
            responses = list(pool.map(post, range(24)))
        codes = [r.status_code for r in responses]
        assert set(codes) == {200, 503} and codes.count(200) >= 2, codes
        for r in responses:
            if r.status_code == 503:
                assert int(r.headers["retry-after"]) >= 1
                assert r.json()["error"]["code"] == "server_busy" and "retry in" in r.json()["error"]["message"]
        assert httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).status_code == 200
        assert httpx.get(f"{server.url}/health").json()["largest_batch"] == 1
    finally:
        server.stop()
