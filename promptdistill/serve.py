"""`distill serve RUN_DIR [RUN_DIR...]`: the distilled students behind an OpenAI-compatible
HTTP API, so any OpenAI client (the official SDKs, LangChain, curl) can talk to them.

  POST /v1/chat/completions   JSON, or server-sent events with "stream": true
  GET  /v1/models             "<run name>-student" per run (and "<run name>-teacher" with --teacher)
  GET  /metrics               per served model: requests answered and failed, prompt, completion
                              and saved tokens, latency p50/p99/mean (request received to last
                              token, over its last 1000 requests); batches decoded, the largest,
                              and how many mixed students (JSON; the token as for /v1)
  GET  /                      a page to chat with them in a browser (serve_page.py); it reads the
                              teacher's system prompt from GET /page/system_prompts (token needed)
  GET  /health                no token needed; 200 once the models are loaded, with the number
                              of requests waiting, batches decoded and the largest batch
  POST /v1/load_lora_adapter, /v1/unload_lora_adapter   with --allow-runtime-students: a run's
                              student added or removed while serving (serve_runtime.py)

Many runs, one base: every run must be a trained student of the same base model (and dtype,
device); the base is loaded once, the first run's adapter with it and every other run's
beside it, and a request's `model` picks the student. Refused at start, naming the run, before
anything is served: another base, a missing or corrupt adapter, a run name given twice.
One student decodes through its adapter (peft's LoRA forward); with several, every batch row
goes through its own student's adapter (every adapter stacked, backends/stacked_lora.py), so
requests for different students decode in one batch.

The student answers WITHOUT a system prompt: the request's messages go through the
student's chat template exactly as given (the template may add its own default system
prompt, as in training), except that a leading system message equal to the run's distilled
prompt (after whitespace normalisation: clients migrating from the prompted model still send
it) is dropped, so the student answers as trained; the response then carries the header
`X-Promptdistill-Prompt-Dropped: 1` and `usage.prompt_tokens_saved` (the tokens the prompt
would have cost). Any other system message is kept, and the server's log says (with its length,
never its text) that the request is outside what the student was trained on.
--keep-system-prompt keeps the distilled prompt too.
With --teacher, "<run name>-teacher" (one per run, all the same model: every run's teacher must
be the first run's) serves the teacher model, with the messages as given, so a client sends
the system prompt itself (that is what `distill generate` does with `teacher.backend: openai`);
when teacher and student are the same model, the teacher is the base weights with the adapters
switched off.

Sampling: temperature, top_p, max_tokens (or max_completion_tokens), seed, logprobs and top_logprobs (not with streaming) and
repetition_penalty (a vLLM-style extension) are honoured, and so is vLLM's return_tokens_as_token_ids
(each logprobs token written "token_id:123": the ids a client lines the log-probabilities up
with); anything not given falls back to the run config's `sampling` section, and a request
without a seed gets a random one.
Batching: one worker thread decodes; requests that arrive while a batch decodes wait and
form the next batch (oldest first, up to --max-batch, those with the same sampling settings
together, every student one model; it gathers while requests keep arriving, until none came for
10 ms, at most 50 ms: a batch's clients come back together), so each row keeps its own settings and seed and its answer
does not depend on its batch-mates (LocalSampler seeds every row alone). At most
--max-queue requests wait; beyond that the server answers 503 with Retry-After.
--max-batch 1 serves one request at a time (the benchmark's baseline).
Binds 127.0.0.1 unless told otherwise; --token-env NAME requires `Authorization: Bearer
<the value of $NAME>` on every /v1 request.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import hmac
import json
import os
import sys
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .serve_args import SERVE_DESCRIPTION, serve_arguments
from .serve_batcher import Cancelled
from .serve_openai import ApiError, ChatRequest, openai_logprobs, parse_body
from .serve_page import add_page
from .serve_server import Server
from .serve_runtime import add_runtime_students
from .terminal import USER_ERRORS, quiet_libraries

PROMPT_DROPPED_HEADER = "X-Promptdistill-Prompt-Dropped"  # "1": the distilled prompt was dropped from the request


def build_app(server: Server, token: str | None = None, runtime_students: bool = False) -> FastAPI:
    app = FastAPI(title="promptdistill", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(_request, e: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else e.headers
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    def authorize(request: Request) -> None:
        if token is None:
            return
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            # Never echo what was sent: a mistyped key is still mostly a key.
            raise ApiError(401, "missing or invalid bearer token (Authorization: Bearer <token>)", code="invalid_api_key")

    @app.get("/health")
    async def health():
        b = server.batcher
        return {"status": "ok", "waiting": len(b.waiting), "batches": len(b.batch_sizes),
                "largest_batch": max(b.batch_sizes, default=0)}

    @app.get("/v1/models")
    async def list_models(request: Request):
        authorize(request)
        return {"object": "list", "data": [server.model_card(n) for n in server.names]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str, request: Request):
        authorize(request)
        if name not in server.names:
            raise ApiError(404, f"The model {name!r} does not exist", code="model_not_found", param="model")
        return server.model_card(name)

    @app.get("/metrics")
    async def metrics(request: Request):
        authorize(request)
        b = server.batcher
        return server.metrics.snapshot() | {"batches": {"decoded": len(b.batch_sizes), "largest": max(b.batch_sizes, default=0),
                                                        "mixing_students": b.mixed_batches}, "adapters": server.adapters}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        req = parse_body(await request.body(), ChatRequest)
        received = time.perf_counter()
        job, saved = server.prepare(req)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        loop = asyncio.get_running_loop()
        dropped = {} if saved is None else {PROMPT_DROPPED_HEADER: "1"}

        def usage(done) -> dict:
            n, read = len(done.token_ids), len(job.ids)
            return {"prompt_tokens": read, "completion_tokens": n, "total_tokens": read + n} | (
                {} if saved is None else {"prompt_tokens_saved": saved})

        def answered(done) -> None:
            server.metrics.answered(req.model, time.perf_counter() - received, len(job.ids), len(done.token_ids),
                                    saved or 0)

        if not req.stream:
            server.batcher.submit(job)
            try:
                done = await asyncio.wrap_future(job.future)
            except asyncio.CancelledError:
                job.cancel.set()  # the client went away: do not decode for nobody
                raise
            except Exception:
                server.metrics.failed(req.model)
                raise
            answered(done)
            return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": req.model,
                                 "system_fingerprint": None,
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                                              "logprobs": openai_logprobs(done.logprobs, req.return_tokens_as_token_ids),
                                              "finish_reason": done.finish_reason}],
                                 "usage": usage(done)}, headers=dropped)

        include_usage = bool((req.stream_options or {}).get("include_usage"))
        queue: asyncio.Queue = asyncio.Queue()

        def put(item) -> None:  # from the worker thread into this request's event loop
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def finished(future: concurrent.futures.Future) -> None:
            e = future.exception()
            if not isinstance(e, Cancelled):
                put(("done", future.result()) if e is None else ("error", e))

        job.on_text = lambda d: put(("text", d))
        server.batcher.submit(job)
        job.future.add_done_callback(finished)

        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                    "system_fingerprint": None,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
            if include_usage and "usage" not in extra:
                body["usage"] = None
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    kind, value = await queue.get()
                    if kind == "text":
                        yield chunk({"content": value})
                    elif kind == "error":
                        server.metrics.failed(req.model)
                        err = ApiError(500, f"generation failed: {type(value).__name__}", kind="server_error")
                        yield f"data: {json.dumps(err.body())}\n\n"
                        break
                    else:
                        answered(value)
                        yield chunk({}, value.finish_reason)
                        if include_usage:
                            body = {"id": rid, "object": "chat.completion.chunk", "created": created,
                                    "model": req.model, "system_fingerprint": None, "choices": [], "usage": usage(value)}
                            yield f"data: {json.dumps(body)}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                job.cancel.set()  # no-op when finished; if the client left, its row is no longer decoded for it

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"} | dropped)

    add_page(app, server.teacher_prompts, authorize)
    add_runtime_students(app, server, authorize, runtime_students)
    return app


def serve(run_dirs: list[str], teacher: bool = False, host: str = "127.0.0.1", port: int = 8000,
          token_env: str | None = None, max_batch: int = 16, max_queue: int = 256,
          keep_system_prompt: bool = False, allow_runtime_students: bool = False) -> int:
    """Load the runs' models and serve them until Ctrl-C. User errors (a missing token
    variable, an untrained run, runs that cannot share one base, an API teacher with
    --teacher) raise the CLI's user errors before anything is loaded or served."""
    import uvicorn

    from .config_errors import ConfigError
    from .config_file import load_config
    from .rundir import RunDir

    token = None
    if token_env:
        token = os.environ.get(token_env)
        if not token:
            raise ConfigError(f"--token-env {token_env}: that environment variable is not set or empty")
    if max_batch < 1 or max_queue < 0:
        raise ConfigError(f"--max-batch must be >= 1 and --max-queue >= 0 (got {max_batch}, {max_queue})")
    runs = [(cfg, RunDir(cfg.run_path)) for cfg in map(load_config, run_dirs)]
    server = Server(runs, teacher=teacher, max_batch=max_batch, max_queue=max_queue,
                    keep_system_prompt=keep_system_prompt)
    app = build_app(server, token, allow_runtime_students)
    if host not in ("127.0.0.1", "localhost", "::1") and token is None:
        print(f"warning: listening on {host} without --token-env: anyone who can reach this machine can use the model"
              f"{' and load any run dir this process can read' if allow_runtime_students else ''}", file=sys.stderr)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {', '.join(server.names)} at http://{shown}:{port}/v1"
          f"{' (bearer token required)' if token else ''}, batches of up to {max_batch}, {max_queue} may wait; "
          f"Ctrl-C to stop", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m promptdistill.serve ...`: the same as `distill serve ...`."""
    args = serve_arguments(argparse.ArgumentParser(prog="distill serve", description=SERVE_DESCRIPTION)).parse_args(argv)
    try:
        quiet_libraries()
        return serve(args.run_dirs, teacher=args.teacher, host=args.host, port=args.port, token_env=args.token_env,
                     max_batch=args.max_batch, max_queue=args.max_queue, keep_system_prompt=args.keep_system_prompt,
                     allow_runtime_students=args.allow_runtime_students)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
