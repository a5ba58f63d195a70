"""`distill serve` under load: requests/s and latency at 1, 4, 16 and 64 concurrent
clients, the batching server (--max-batch 16) against the one-at-a-time one (--max-batch 1).

    python bench/serve_load.py RUN_DIR                # a run dir with a trained student
    python bench/serve_load.py RUN_DIR --clients 1,16 --requests 8,32 --baseline-requests 8,16

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


def start_server(run_dir: str, max_batch: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = os.environ | {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "promptdistill.serve", run_dir, "--port", str(port),
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


async def level(url: str, model: str, queries: list[str], clients: int, n_requests: int) -> dict:
    """One closed-loop level: `clients` tasks send `n_requests` requests in all."""
    latencies, tokens, errors = [], [], []
    todo = iter(range(n_requests))
    load = os.getloadavg()[0]

    async def client(http: httpx.AsyncClient) -> None:
        for i in todo:
            body = {"model": model, "messages": [{"role": "user", "content": queries[i % len(queries)]}],
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


def run_server(run_dir: str, max_batch: int, clients: list[int], requests: list[int], log: Path) -> list[dict]:
    proc, url = start_server(run_dir, max_batch, log)
    try:
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        queries = [json.loads(line)["query"] for line in QUERIES.read_text().splitlines() if line.strip()]
        asyncio.run(level(url, model, queries, 1, 1))  # warm-up, not reported
        rows = []
        for c, n in zip(clients, requests, strict=True):
            cpu = cpu_seconds(proc.pid)
            row = asyncio.run(level(url, model, queries, c, n)) | {"max_batch": max_batch}
            row["server_cpu_s_per_request"] = (cpu_seconds(proc.pid) - cpu) / max(row["ok"], 1)
            print(table_row(row), flush=True)
            rows.append(row)
        return rows
    finally:
        proc.terminate()
        proc.wait(timeout=30)


HEADER = ("| server | clients | requests | requests/s | p50 s | p99 s | errors | tokens/answer | load at start "
          "| server CPU s/request |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def table_row(r: dict) -> str:
    name = "one at a time (--max-batch 1)" if r["max_batch"] == 1 else f"batching (--max-batch {r['max_batch']})"
    return (f"| {name} | {r['clients']} | {r['requests']} | {r['requests_per_s']:.2f} | {r['p50_s']:.1f} | "
            f"{r['p99_s']:.1f} | {r['errors']} | {r['mean_completion_tokens']:.1f} | {r['load_1min_at_start']:.1f} | "
            f"{r['server_cpu_s_per_request']:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
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
    rows = run_server(args.run_dir, args.max_batch, clients, [int(n) for n in args.requests.split(",")],
                      logs / "batching.log")
    rows += run_server(args.run_dir, 1, [int(c) for c in args.baseline_clients.split(",")],
                       [int(n) for n in args.baseline_requests.split(",")], logs / "one-at-a-time.log")
    by = {(r["max_batch"], r["clients"]): r for r in rows}
    if (args.max_batch, 1) in by and (args.max_batch, 16) in by:
        print(f"\nbatching server, 16 clients vs 1: "
              f"{by[args.max_batch, 16]['requests_per_s'] / by[args.max_batch, 1]['requests_per_s']:.1f}x requests/s")
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    path = out / f"{date}-serve.json"
    path.write_text(json.dumps({"cpu_count": os.cpu_count(), "rows": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
