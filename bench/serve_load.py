"""`distill serve` under load: requests/s and latency at 1, 4, 16 and 64 concurrent
clients, the batching server (--max-batch 16) against the one-at-a-time one (--max-batch 1).
Given several run dirs (students of one base), the server of them all, its clients spread
across the students in turn, against a one-student server of the first run at the same load,
and the memory (resident set, now and at its peak, from /proc) of the many-student server
against the one-student servers of every run together.

    python bench/serve_load.py RUN_DIR                # a run dir with a trained student
    python bench/serve_load.py RUN_DIR --clients 1,16 --requests 8,32 --baseline-requests 8,16
    python bench/serve_load.py RUN_A RUN_B RUN_C --clients 1,16,64 --requests 8,48,128

Each server is its own process on 127.0.0.1 (loopback only). Each level is a closed loop:
N client tasks share a fixed number of requests and each sends its next one as soon as
its last is answered. Every request is a Beethoven query (examples/beethoven/queries.jsonl,
in turn), max 24 new tokens, temperature 0.7, top-p 0.9, its own seed. Reported per level:
requests/s (requests / wall time of the level), p50 and p99 latency (send to full answer),
errors (anything but 200), mean completion tokens, the 1-minute load average at the
start, and the server process's CPU seconds per request (user + system, from /proc): on a
busy machine the wall-clock figures measure the other processes as much as the server,
CPU per request does not.
Writes bench/results/<UTC date>-serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
QUERIES = REPO / "examples" / "beethoven" / "queries.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run_dirs: list[str], max_batch: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = os.environ | {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "promptdistill.serve", *run_dirs, "--port", str(port),
                                 "--max-batch", str(max_batch)], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"server not ready after 300 s:\n{log.read_text()}")


async def level(url: str, models: list[str], queries: list[str], clients: int, n_requests: int) -> dict:
    """One closed-loop level: `clients` tasks send `n_requests` requests in all, request i to
    models[i % len(models)]."""
    latencies, tokens, errors = [], [], []
    todo = iter(range(n_requests))
    load = os.getloadavg()[0]

    async def client(http: httpx.AsyncClient) -> None:
        for i in todo:
            body = {"model": models[i % len(models)], "messages": [{"role": "user", "content": queries[i % len(queries)]}],
                    "max_tokens": 24, "temperature": 0.7, "top_p": 0.9, "seed": i}
            sent = time.perf_counter()
            try:
                r = await http.post(f"{url}/v1/chat/completions", json=body)
            except httpx.HTTPError as e:
                errors.append(type(e).__name__)
                continue
            if r.status_code != 200:
                errors.append(str(r.status_code))
                continue
            latencies.append(time.perf_counter() - sent)
            tokens.append(r.json()["usage"]["completion_tokens"])

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=1800, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - start
    lat = np.array(latencies) if latencies else np.array([float("nan")])
    return {"clients": clients, "requests": n_requests, "ok": len(latencies), "errors": len(errors),
            "error_kinds": sorted(set(errors)), "wall_s": wall, "requests_per_s": len(latencies) / wall,
            "p50_s": float(np.percentile(lat, 50)), "p99_s": float(np.percentile(lat, 99)),
            "mean_completion_tokens": float(np.mean(tokens)) if tokens else 0.0, "load_1min_at_start": load}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mb(pid: int) -> dict:
    """The process's resident set now and at its peak (VmRSS, VmHWM in /proc/PID/status), MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024, "peak_rss_mb": int(fields["VmHWM"].split()[0]) / 1024}


def run_server(run_dirs: list[str], max_batch: int, clients: list[int], requests: list[int], log: Path,
               label: str) -> tuple[list[dict], dict]:
    """(a row per level, the server's memory after the last level)."""
    proc, url = start_server(run_dirs, max_batch, log)
    try:
        models = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"] if m["id"].endswith("-student")]
        queries = [json.loads(line)["query"] for line in QUERIES.read_text().splitlines() if line.strip()]
        asyncio.run(level(url, models, queries, 1, len(models)))  # warm-up (every student once), not reported
        rows = []
        for c, n in zip(clients, requests, strict=True):
            cpu = cpu_seconds(proc.pid)
            row = asyncio.run(level(url, models, queries, c, n)) | {"max_batch": max_batch, "server": label,
                                                                    "students": len(models)}
            row["server_cpu_s_per_request"] = (cpu_seconds(proc.pid) - cpu) / max(row["ok"], 1)
            print(table_row(row), flush=True)
            rows.append(row)
        return rows, memory_mb(proc.pid) | {"server": label, "run_dirs": run_dirs}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


HEADER = ("| server | clients | requests | requests/s | p50 s | p99 s | errors | tokens/answer | load at start "
          "| server CPU s/request |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def table_row(r: dict) -> str:
    return (f"| {r['server']} | {r['clients']} | {r['requests']} | {r['requests_per_s']:.2f} | {r['p50_s']:.1f} | "
            f"{r['p99_s']:.1f} | {r['errors']} | {r['mean_completion_tokens']:.1f} | {r['load_1min_at_start']:.1f} | "
            f"{r['server_cpu_s_per_request']:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="one run dir, or several students of one base")
    ap.add_argument("--clients", default="1,4,16,64", help="concurrent clients per level, batching server")
    ap.add_argument("--requests", default="8,16,48,128", help="requests per level, batching server")
    ap.add_argument("--baseline-clients", default="1,4,16,64", help="the same for the one-at-a-time server")
    ap.add_argument("--baseline-requests", default="8,8,16,64")
    ap.add_argument("--max-batch", type=int, default=16)
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    print(HEADER, flush=True)
    logs = Path(tempfile.mkdtemp(prefix="serve-bench-"))  # the servers' output, if one fails
    requests = [int(n) for n in args.requests.split(",")]
    result = {"cpu_count": os.cpu_count()}
    if len(args.run_dirs) == 1:
        rows, _ = run_server(args.run_dirs, args.max_batch, clients, requests, logs / "batching.log",
                             f"batching (--max-batch {args.max_batch})")
        rows += run_server(args.run_dirs, 1, [int(c) for c in args.baseline_clients.split(",")],
                           [int(n) for n in args.baseline_requests.split(",")], logs / "one-at-a-time.log",
                           "one at a time (--max-batch 1)")[0]
        by = {(r["max_batch"], r["clients"]): r for r in rows}
        if (args.max_batch, 1) in by and (args.max_batch, 16) in by:
            print(f"\nbatching server, 16 clients vs 1: "
                  f"{by[args.max_batch, 16]['requests_per_s'] / by[args.max_batch, 1]['requests_per_s']:.1f}x requests/s")
    else:
        many, many_memory = run_server(args.run_dirs, args.max_batch, clients, requests, logs / "many.log",
                                       f"{len(args.run_dirs)} students, one base")
        one, first_memory = run_server(args.run_dirs[:1], args.max_batch, clients, requests, logs / "one.log",
                                       "one student")
        rows = many + one
        # every other run's one-student server, at the largest level only: memory peaks with the largest batch
        memories = [first_memory] + [run_server([d], args.max_batch, clients[-1:], requests[-1:],
                                                logs / f"one-{i}.log", "one student")[1]
                                     for i, d in enumerate(args.run_dirs[1:], 1)]
        apart = {k: sum(m[k] for m in memories) for k in ("rss_mb", "peak_rss_mb")}
        result["memory"] = {"many": many_memory, "one_student_servers": memories, "one_student_servers_total": apart}
        print(f"\nmemory: {len(args.run_dirs)} students in one server {many_memory['rss_mb']:.0f} MB "
              f"(peak {many_memory['peak_rss_mb']:.0f}); {len(memories)} one-student servers "
              f"{apart['rss_mb']:.0f} MB (peak {apart['peak_rss_mb']:.0f}) together")
        for many_row, one_row in zip(many, one):
            print(f"{many_row['clients']} clients: {len(args.run_dirs)}-student server "
                  f"{many_row['requests_per_s'] / one_row['requests_per_s']:.0%} of the one-student server's requests/s")
    result["rows"] = rows
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    suffix = "serve" if len(args.run_dirs) == 1 else "serve-many"
    path = out / f"{date}-{suffix}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
