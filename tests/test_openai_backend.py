"""The openai backend: `distill generate` with `teacher.backend: openai` against a real
`distill serve` process (shared with test_serve.py), directly and through a fault-injecting
proxy (429 + Retry-After, 500, dropped and cut connections, stalls past the timeout), and
checks that the API key is never written anywhere.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from test_serve import ENV, KEY, REPO, SYSTEM_PROMPT, TEACHER, TOKEN_ENV, served
from tiny import QUESTIONS

from promptdistill.backends.openai import OpenAISampler, backoff, retry_after, scrub
from promptdistill.config_errors import ConfigError
from promptdistill.config_file import load_config
from promptdistill.models import ModelError
from promptdistill.pipeline import run_stage
from promptdistill.rundir import StageError
from promptdistill.stages.generate import row_key


@pytest.fixture(scope="module")
def srv(tmp_path_factory, pytestconfig):
    return served(tmp_path_factory, pytestconfig)


def write_project(root: Path, srv, base_url: str, n: int = 10, overrides: dict | None = None, **teacher) -> Path:
    """Queries and a config whose teacher is the served tiny teacher, reached over HTTP."""
    queries = [{"id": f"q{i:02d}", "query": f"Question {i}: {QUESTIONS[i]}"} for i in range(n)]
    (root / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    config = {"name": "remote", "run_dir": str(root / "run"), "system_prompt": SYSTEM_PROMPT,
              "teacher": {"model": str(srv.model), "backend": "openai", "base_url": base_url, "api_model": TEACHER,
                          "api_key_env": TOKEN_ENV, "concurrency": 4, "timeout": 10, "max_retries": 2} | teacher,
              "student": {"model": str(srv.model)},
              "queries": {"files": ["q.jsonl"], "train": 0.5, "val": 0.25, "test": 0.25},
              "sampling": {"temperature": 1.0, "top_p": 1.0, "max_tokens": 10, "batch_size": 4},
              "lora": {"rank": 4, "alpha": 8},
              "train": {"steps": 2, "batch_size": 4, "eval_every": 2},
              "eval": {"classifier_train_size": 8, "latency_queries": 2, "bootstrap": 100, "skills": "none"}}
    for section, values in (overrides or {}).items():
        config[section] = config[section] | values
    (root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root / "config.yaml"


def teacher_rows(run: Path) -> list[dict]:
    path = run / "teacher.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# --- a fault-injecting HTTP proxy -----------------------------------------------------


class FaultProxy:
    """An HTTP/1.1 proxy on 127.0.0.1 in front of the real server, one request per connection.
    `plan[marker]` lists the faults for a query's successive attempts (the marker is looked for
    in the request's last message); once they are used up, requests are forwarded.
    Faults: 429 (Retry-After: 1), 500, echo500 (500 whose body echoes the Authorization header,
    as a careless server might), drop (close before answering), cut (close halfway through a
    response), stall (answer nothing for `stall` seconds)."""

    def __init__(self, upstream_port: int, plan: dict[str, list[str]] | None = None, stall: float = 4.0,
                 inject_auth: str | None = None):
        self.upstream_port, self.plan, self.stall, self.inject_auth = upstream_port, plan or {}, stall, inject_auth
        self.log: list[dict] = []  # one entry per request: marker, attempt, fault, received, answered
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    def close(self) -> None:
        def stop():
            self.server.close()
            self.loop.stop()
        self.loop.call_soon_threadsafe(stop)
        self.thread.join(10)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def attempts(self, marker: str) -> list[dict]:
        return [e for e in self.log if e["marker"] == marker]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:] if ":" in l)}
            body = await reader.readexactly(int(headers.get("content-length", 0)))
            entry = {"received": time.monotonic(), "auth": headers.get("authorization"), "marker": None}
            if body:
                content = json.loads(body)["messages"][-1]["content"]
                entry["marker"] = next((m for m in self.plan if m in content), content)
            entry["attempt"] = len(self.attempts(entry["marker"]))
            faults = self.plan.get(entry["marker"], [])
            entry["fault"] = faults[entry["attempt"]] if entry["attempt"] < len(faults) else "ok"
            self.log.append(entry)
            await self._answer(entry, lines, headers, body, writer)
            entry["answered"] = time.monotonic()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _answer(self, entry, lines, headers, body, writer) -> None:
        fault = entry["fault"]
        if fault in ("429", "500", "echo500"):
            status = "429 Too Many Requests" if fault == "429" else "500 Internal Server Error"
            message = {"429": "slow down", "500": "upstream exploded",
                       "echo500": f"bad gateway; you sent {headers.get('authorization')}"}[fault]
            payload = json.dumps({"error": {"message": message, "type": "server_error"}}).encode()
            extra = "Retry-After: 1\r\n" if fault == "429" else ""
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                         f"{extra}Connection: close\r\n\r\n".encode() + payload)
            await writer.drain()
        elif fault == "drop":
            return
        elif fault == "cut":
            writer.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n{"id": "chat')
            await writer.drain()
        elif fault == "stall":
            await asyncio.sleep(self.stall)
        else:
            writer.write(await self._forward(lines, headers, body))
            await writer.drain()

    async def _forward(self, lines, headers, body) -> bytes:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        kept = [l for l in lines[1:] if l and l.split(":", 1)[0].strip().lower() not in ("connection", "host")]
        if self.inject_auth and "authorization" not in headers:
            kept.append(f"Authorization: Bearer {self.inject_auth}")
        kept += [f"Host: 127.0.0.1:{self.upstream_port}", "Connection: close"]
        up_writer.write(("\r\n".join([lines[0], *kept]) + "\r\n\r\n").encode("latin-1") + body)
        await up_writer.drain()
        response = await up_reader.read()
        up_writer.close()
        head, _, rest = response.partition(b"\r\n\r\n")
        head_lines = [l for l in head.split(b"\r\n") if not l.lower().startswith(b"connection:")]
        return b"\r\n".join(head_lines + [b"Connection: close"]) + b"\r\n\r\n" + rest


@pytest.fixture
def proxy(srv):
    p = FaultProxy(srv.server.port)
    yield p
    p.close()


# --- the tests ------------------------------------------------------------------------


def test_generate_from_the_served_teacher(srv, tmp_path, monkeypatch, capsys):
    from transformers import AutoTokenizer

    from promptdistill.render import prompt_ids

    monkeypatch.setenv(TOKEN_ENV, KEY)
    cfg = load_config(write_project(tmp_path, srv, f"{srv.server.url}/v1", n=10))
    run_stage(cfg, "queries")
    summary = run_stage(cfg, "generate")
    assert summary.startswith("generate: 10 teacher answers (0 reused)")
    rows = teacher_rows(cfg.run_path)
    assert sorted(r["id"] for r in rows) == [f"q{i:02d}" for i in range(10)]  # one row per query
    tokenizer = AutoTokenizer.from_pretrained(srv.model)
    for r in rows:
        assert r["finish_reason"] in ("stop", "length") and r["model"] == str(srv.model)
        assert r["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT}
        assert r["tokens"]["prompt"] == len(prompt_ids(tokenizer, r["messages"]))  # the server's usage
        assert 1 <= r["tokens"]["completion"] <= 10
    assert not (cfg.run_path / "teacher_errors.jsonl").exists()
    capsys.readouterr()
    run_stage(cfg, "generate")
    assert "generate: already done, skipped" in capsys.readouterr().out


def test_without_api_key_env_no_authorization_header_is_sent(srv, tmp_path, monkeypatch):
    """Not even $OPENAI_API_KEY, which the SDK would otherwise pick up and send to any base_url."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-for-this-server")
    p = FaultProxy(srv.server.port, inject_auth=KEY)  # the proxy adds the server's token itself
    try:
        cfg = load_config(write_project(tmp_path, srv, p.base_url, n=3, api_key_env=None))
        run_stage(cfg, "queries")
        run_stage(cfg, "generate")
    finally:
        p.close()
    assert len(teacher_rows(cfg.run_path)) == 3
    assert len(p.log) == 3 and all(e["auth"] is None for e in p.log)


def test_faults_are_retried_and_a_hopeless_row_waits_for_the_next_run(srv, tmp_path, monkeypatch, proxy, capsys):
    monkeypatch.setenv(TOKEN_ENV, KEY)
    proxy.plan = {"Question 1:": ["429", "429"], "Question 2:": ["500"], "Question 3:": ["drop"],
                  "Question 4:": ["cut"], "Question 5:": ["stall"], "Question 6:": ["echo500"] * 9}
    proxy.stall = 5.0
    cfg = load_config(write_project(tmp_path, srv, proxy.base_url, n=8, timeout=2.0, max_retries=2))
    run_stage(cfg, "queries")
    start = time.monotonic()
    with pytest.raises(StageError, match=r"1 failed after retries; re-run to retry them") as failure:
        run_stage(cfg, "generate")
    elapsed = time.monotonic() - start
    out = capsys.readouterr()

    ids = [r["id"] for r in teacher_rows(cfg.run_path)]
    assert sorted(ids) == [f"q{i:02d}" for i in range(8) if i != 6]  # every other row, exactly once
    for marker, faults in (("Question 1:", ["429", "429"]), ("Question 2:", ["500"]), ("Question 3:", ["drop"]),
                           ("Question 4:", ["cut"]), ("Question 5:", ["stall"])):
        assert [e["fault"] for e in proxy.attempts(marker)] == faults + ["ok"], marker
    tries = proxy.attempts("Question 1:")
    for before, after in zip(tries, tries[1:]):  # Retry-After: 1 was honoured both times
        assert after["received"] - before["answered"] >= 1.0 - 1e-3
    stalled = proxy.attempts("Question 5:")
    assert 2.0 - 0.1 <= stalled[1]["received"] - stalled[0]["received"] < 5.0  # gave up at the 2 s timeout
    assert [e["fault"] for e in proxy.attempts("Question 6:")] == ["echo500"] * 3  # 1 try + max_retries 2
    assert elapsed < 20

    errors = [json.loads(line) for line in (cfg.run_path / "teacher_errors.jsonl").read_text().splitlines()]
    assert [(e["id"], sorted(e)) for e in errors] == [("q06", ["error", "id", "key", "time"])]
    assert "HTTP 500" in errors[0]["error"] and "gave up after 3 attempts" in errors[0]["error"]
    assert "[redacted]" in errors[0]["error"]  # the proxy echoed the key back; it was scrubbed
    assert KEY not in str(failure.value) and KEY not in out.out + out.err
    manifest = json.loads((cfg.run_path / "manifest.json").read_text())
    assert "finished" not in manifest["stages"]["generate"]  # not recorded as done with a row missing

    proxy.plan = {}
    summary = run_stage(cfg, "generate")  # the faults are gone: the re-run fetches just the missing row
    assert summary.startswith("generate: 1 teacher answers (7 reused)")
    assert sorted(r["id"] for r in teacher_rows(cfg.run_path)) == [f"q{i:02d}" for i in range(8)]
    assert "finished" in json.loads((cfg.run_path / "manifest.json").read_text())["stages"]["generate"]
    capsys.readouterr()
    run_stage(cfg, "generate")
    assert "generate: already done, skipped" in capsys.readouterr().out


def test_a_refused_key_stops_the_stage_at_once_without_showing_the_key(srv, tmp_path, monkeypatch, capsys):
    wrong = "sk-test-" + secrets.token_hex(16)
    monkeypatch.setenv(TOKEN_ENV, wrong)
    cfg = load_config(write_project(tmp_path, srv, f"{srv.server.url}/v1", n=6))
    run_stage(cfg, "queries")
    with pytest.raises(ModelError, match=rf"refused the API key \(HTTP 401.*check the key in \${TOKEN_ENV}") as e:
        run_stage(cfg, "generate")
    out = capsys.readouterr()
    assert wrong not in str(e.value) + out.out + out.err
    assert not (cfg.run_path / "teacher.jsonl").exists() and "generate" not in json.loads(
        (cfg.run_path / "manifest.json").read_text())["stages"]  # nothing written, nothing recorded
    monkeypatch.delenv(TOKEN_ENV)
    with pytest.raises(ModelError, match=rf"environment variable '{TOKEN_ENV}' \(api_key_env\) is not set"):
        run_stage(cfg, "generate")


def _files_holding(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_the_key_is_never_written_anywhere(srv, tmp_path):
    """`distill run` (queries, generate over the API, train, eval, report) as a real process:
    no file in the run dir and no line of its output holds the key."""
    # Sampled answers vary with the (tmp) model path in the row keys; eval needs >= 2 test answers
    # that are not empty or cut off mid-sentence, so give it plenty of test queries and tokens.
    config = write_project(tmp_path, srv, f"{srv.server.url}/v1", n=32,
                           overrides={"queries": {"train": 0.4, "val": 0.1, "test": 0.5}, "sampling": {"max_tokens": 32}})
    # --no-validate: the numbered queries ("Question 1: what of the 7 ships?") are near-duplicates
    # across splits by construction, which `distill run`'s checks rightly refuse.
    r = subprocess.run([sys.executable, "-m", "promptdistill.cli", "run", str(config), "--no-validate"], cwd=REPO,
                       env=ENV, capture_output=True, timeout=180)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-3000:]
    run = tmp_path / "run"
    assert len(teacher_rows(run)) == 32 and (run / "summary.json").is_file() and (run / "report.md").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["teacher"]["api_key_env"] == TOKEN_ENV
    notes = json.loads((run / "summary.json").read_text())["notes"]  # eval asked the endpoint, with the key, too
    assert any(n.startswith("fidelity skipped: the teacher is behind its endpoint") and "teacher.logprob_token_ids" in n
               for n in notes), notes
    needle = KEY.encode()
    assert needle not in r.stdout and needle not in r.stderr
    assert _files_holding(tmp_path, needle) == []
    assert _files_holding(srv.root, needle) == []  # nor the server's run dir or its logs


def test_a_key_in_the_config_is_refused_without_echoing_it(srv, tmp_path):
    key = "sk-test-" + secrets.token_hex(16)
    config = write_project(tmp_path, srv, f"{srv.server.url}/v1", n=2)
    data = yaml.safe_load(config.read_text())
    cases = [("teacher", {"api_key": key}), ("teacher", {"api_key_env": key}), ("student", {"token": key})]
    for section, extra in cases:
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump(data | {section: data[section] | extra}))
        with pytest.raises(ConfigError) as e:
            load_config(bad)
        assert key not in str(e.value) and "api_key_env" in str(e.value), str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(config, [f"teacher.api_key={key}"])
    assert key not in str(e.value) and "never goes in the config" in str(e.value)
    with pytest.raises(ConfigError, match="backend openai needs base_url"):
        load_config(config, ["teacher.base_url=null"])
    from promptdistill.serve import serve

    with pytest.raises(ConfigError, match=f"--teacher: run .*'s teacher '{TEACHER}' is served by {srv.server.url}/v1 already"):
        serve([str(config)], teacher=True)  # refused before any model is loaded


def test_retry_helpers():
    assert retry_after({"retry-after": "2"}) == 2.0 and retry_after({"retry-after-ms": "1500"}) == 1.5
    assert retry_after({}) is None and retry_after({"retry-after": "soon"}) is None
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= retry_after({"retry-after": date}) <= 31
    assert all(0 <= backoff(a, 0.5, 30) <= min(30, 0.5 * 2**a) for a in range(12) for _ in range(20))
    assert scrub("Bearer sk-1 and sk-1", "sk-1") == "Bearer [redacted] and [redacted]"
    sampler = OpenAISampler("http://127.0.0.1:9/v1", "m")
    assert sampler.count_prompt_tokens([{"role": "user", "content": "hi"}]) is None
    assert not hasattr(sampler, "model")  # generate's context check skips it (no local model config)


def test_top_logprobs_are_kept_with_each_teacher_answer(srv, tmp_path, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, KEY)
    cfg = load_config(write_project(tmp_path, srv, f"{srv.server.url}/v1", n=4, overrides={"sampling": {"top_logprobs": 2}}))
    run_stage(cfg, "queries")
    run_stage(cfg, "generate")
    rows = teacher_rows(cfg.run_path)
    assert len(rows) == 4
    for r in rows:
        assert len(r["logprobs"]) == r["tokens"]["completion"]
        for t in r["logprobs"]:
            assert t["id"] is None and len(t["top"]) == 2 and t["top"][0][2] >= t["top"][1][2] and t["logprob"] <= 0
    plain = tmp_path / "plain"  # asking for logprobs is part of a row's key: older rows without them are not reused
    plain.mkdir()
    assert row_key(load_config(write_project(plain, srv, f"{srv.server.url}/v1", n=4)), "q") != row_key(cfg, "q")
