"""`distill serve`'s description and arguments, which `distill serve` and
`python -m promptdistill.serve` both parse."""

from __future__ import annotations

import argparse

SERVE_DESCRIPTION = ("Serve distilled students (one per run, on one shared base model; with --teacher also the "
                     "teacher) over an OpenAI-compatible HTTP API: POST /v1/chat/completions (streaming too), "
                     "GET /v1/models, GET /metrics, GET /health; and a page to chat with them in a browser at /.")


def serve_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`distill serve`'s arguments, here (not in serve.py) so the CLI starts without importing FastAPI."""
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run dirs with a trained student/, all on the same base model; each is served as "
                        "'<run name>-student'")
    p.add_argument("--teacher", action="store_true",
                   help="also serve the teacher as '<run name>-teacher' (every run's teacher must be the first run's)")
    p.add_argument("--keep-system-prompt", action="store_true",
                   help="pass a request's system message to the student even when it is the run's distilled "
                        "prompt (by default that prompt is dropped: the student was trained without it)")
    p.add_argument("--allow-runtime-students", action="store_true",
                   help="let clients load a run's student (POST /v1/load_lora_adapter with the run dir) and unload "
                        "one (POST /v1/unload_lora_adapter) while serving, like vLLM's "
                        "VLLM_ALLOW_RUNTIME_LORA_UPDATING; off by default: a client could make the server read any "
                        "run dir it can")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--token-env", metavar="NAME",
                   help="require 'Authorization: Bearer <token>', the token being the value of environment variable NAME")
    p.add_argument("--max-batch", type=int, default=16, metavar="N",
                   help="decode up to N waiting requests together (default: 16; 1 = one at a time)")
    p.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="at most N requests wait for a batch; more get 503 with Retry-After (default: 256)")
    return p
