"""A stand-in for a busy inference server: answers every OpenAI chat-completions request
after a fixed latency, with a fixed number of tokens, and does no work meanwhile.

    python bench/latency_server.py --port 8123 --latency 0.2 --tokens 64

Alone, one request at a time, a client gets tokens / latency tokens per second; what a
client gains by keeping requests in flight is then the client's own doing, which is what
the `concurrency` benchmark measures. Runs on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import uvicorn
from fastapi import FastAPI


def make_app(latency: float, tokens: int) -> FastAPI:
    app = FastAPI()
    text = " ".join(["word"] * tokens)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat(body: dict) -> dict:
        await asyncio.sleep(latency)  # the model "thinking": a wait that costs the server nothing
        return {"id": "bench", "object": "chat.completion", "created": int(time.time()), "model": body.get("model", "bench"),
                "choices": [{"index": 0, "finish_reason": "length",
                             "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": tokens + 1}}

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--latency", type=float, default=0.2, help="seconds per request")
    ap.add_argument("--tokens", type=int, default=64, help="completion tokens per answer")
    args = ap.parse_args()
    uvicorn.run(make_app(args.latency, args.tokens), host="127.0.0.1", port=args.port, log_level="warning",
                backlog=1024)


if __name__ == "__main__":
    main()
