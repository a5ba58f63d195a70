"""`distill serve RUN_DIR`: the distilled student behind an OpenAI-compatible HTTP API,
so any OpenAI client (the official SDKs, LangChain, curl) can talk to it.

  POST /v1/chat/completions   JSON, or server-sent events with "stream": true
  GET  /v1/models             "<run name>-student" (and "<run name>-teacher" with --teacher)
  GET  /health                no token needed; 200 once the models are loaded, with the number
                              of requests waiting, batches decoded and the largest batch

The student answers WITHOUT a system prompt: the request's messages go through the
student's chat template exactly as given (the template may add its own default system
prompt, as in training). With --teacher, "<run name>-teacher" serves the teacher model,
also with the messages as given, so a client sends the system prompt itself (that is what
`distill generate` does with `teacher.backend: openai`); when teacher and student are the
same model, the teacher is the base weights with the adapter switched off.

Sampling: temperature, top_p, max_tokens (or max_completion_tokens), seed, logprobs and top_logprobs (not with streaming) and
repetition_penalty (a vLLM-style extension) are honoured, and so is vLLM's return_tokens_as_token_ids
(each logprobs token written "token_id:123": the ids a client lines the log-probabilities up
with); anything not given falls back to the run config's `sampling` section, and a request
without a seed gets a random one.
Batching: one worker thread decodes; requests that arrive while a batch decodes wait and
form the next batch (oldest first, up to --max-batch, those with the same model and
sampling settings together; it gathers while requests keep arriving, until none came for
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
import math
import json
import os
import random
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .backends.openai import TOKEN_ID_PREFIX
from .serve_args import SERVE_DESCRIPTION, serve_arguments
from .terminal import USER_ERRORS, quiet_libraries

# --- the OpenAI request shape (the parts we honour; unknown fields are ignored) -----------


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    repetition_penalty: float | None = Field(None, gt=0)
    stream: bool = False
    stream_options: dict | None = None
    n: int | None = 1
    stop: str | list[str] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    tools: list | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    return_tokens_as_token_ids: bool = False


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Cancelled(Exception):
    """Raised from the token callback when the client went away: stops the decoding loop."""


def _text_of(message: ChatMessage) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"content part of type {part.get('type')!r} is not supported (text only)", param="messages")
        parts.append(part["text"])
    return "".join(parts)


def _openai_logprobs(scored: list[dict] | None, as_token_ids: bool = False) -> dict | None:
    """Our per-token log-probabilities in OpenAI's `choices[0].logprobs` shape; with
    `as_token_ids` each token is written "token_id:<id>", as vLLM does."""
    if scored is None:
        return None

    def entry(token: str, token_id: int, logprob: float) -> dict:
        text = f"{TOKEN_ID_PREFIX}{token_id}" if as_token_ids else token
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [entry(s["token"], s["id"], s["logprob"]) | {"top_logprobs": [entry(*t) for t in s["top"]]}
                        for s in scored]}


def _check_supported(req: ChatRequest) -> None:
    if req.n not in (None, 1):
        raise ApiError(400, "n > 1 is not supported; send one request per answer", param="n")
    if req.stop:
        raise ApiError(400, "stop sequences are not supported; the model stops at its end-of-turn token", param="stop")
    if req.tools:
        raise ApiError(400, "tools are not supported", param="tools")
    if req.logprobs and req.stream:
        raise ApiError(400, "logprobs are returned without streaming only; set stream to false", param="logprobs")
    if req.top_logprobs and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name):
            raise ApiError(400, f"{name} is not supported; use repetition_penalty", param=name)


class _Deltas:
    """Turns tokens into text deltas whose concatenation is exactly the final (stripped)
    answer: waits for the rest of a multi-byte character, holds back leading and trailing
    whitespace until text follows it."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.sent = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        return self._advance(text.strip())

    def finish(self, final_text: str) -> str:
        return self._advance(final_text)

    def _advance(self, visible: str) -> str:
        if not visible.startswith(self.sent):
            return ""
        delta, self.sent = visible[len(self.sent):], visible
        return delta


class Server:
    """The loaded models, what each served name means, and the batching worker."""

    def __init__(self, cfg, run, teacher: bool = False, max_batch: int = 16, max_queue: int = 256):
        from .answerers import Models, sampling_params

        # Without --teacher, never load a separate teacher model: make Models see the student twice.
        models_cfg = cfg if teacher else cfg.model_copy(update={"teacher": cfg.student})
        self.models = Models(models_cfg, run)
        self.names = {f"{cfg.name}-student": "student"}
        if teacher:
            self.names[f"{cfg.name}-teacher"] = "teacher"
        self.samplers = {who: self.models.sampler(who) for who in self.names.values()}
        self.defaults = sampling_params(cfg)
        self.started = int(time.time())
        self.batcher = Batcher(self, max_batch, max_queue)

    def context_length(self, who: str) -> int | None:
        model = self.samplers[who].model
        return getattr(getattr(model, "config", None), "max_position_embeddings", None)

    def prepare(self, req: ChatRequest) -> tuple[str, list[int], Any, int]:
        """(who, prompt ids, sampling params, seed) for a request, or an ApiError."""
        from .backends.base import SamplingParams
        from .render import prompt_ids

        who = self.names.get(req.model)
        if who is None:
            raise ApiError(404, f"The model {req.model!r} does not exist; this server has {sorted(self.names)}",
                           code="model_not_found", param="model")
        _check_supported(req)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text_of(m)} for m in req.messages]
        tokenizer = self.samplers[who].tokenizer
        try:
            ids = prompt_ids(tokenizer, messages)
        except Exception as e:  # noqa: BLE001  RenderError, or the template's own raise_exception (jinja2)
            raise ApiError(400, f"cannot render these messages with the model's chat template: {e}", param="messages") from None
        d = self.defaults
        max_tokens = req.max_completion_tokens or req.max_tokens or d.max_tokens
        limit = self.context_length(who)
        if limit is not None and len(ids) + max_tokens > limit:
            raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{len(ids) + max_tokens} tokens ({len(ids)} in the messages, {max_tokens} in the "
                                f"completion). Please reduce the length of the messages or completion.",
                           param="messages", code="context_length_exceeded")
        params = SamplingParams(
            temperature=d.temperature if req.temperature is None else req.temperature,
            top_p=d.top_p if req.top_p is None else req.top_p,
            max_tokens=max_tokens,
            repetition_penalty=d.repetition_penalty if req.repetition_penalty is None else req.repetition_penalty,
            top_logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        )
        seed = random.getrandbits(63) if req.seed is None else req.seed % 2**63
        return who, ids, params, seed


def _settle(future: concurrent.futures.Future, result=None, error: BaseException | None = None) -> None:
    """Resolve a job's future, unless its client went away and asyncio cancelled it."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


GATHER_SECONDS = 0.05  # the longest a new batch waits for more requests
QUIET_SECONDS = 0.01  # ...and it stops waiting once none has arrived for this long


@dataclass(eq=False)
class Job:
    """One request waiting for (or in) a batch. `on_text` is called from the worker thread."""

    who: str
    ids: list[int]
    params: Any
    seed: int
    on_text: Callable[[str], None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class Batcher:
    """A bounded queue of jobs and the one thread that decodes them, a batch at a time.

    A batch is the oldest waiting job plus the next waiting jobs with the same model and
    sampling settings (LocalSampler.generate takes one SamplingParams per batch; seeds are
    per row), up to `max_batch`. Jobs arriving meanwhile wait for the next batch, which
    gathers while jobs keep arriving (QUIET_SECONDS apart, GATHER_SECONDS at most). A client
    that goes away cancels its job: skipped if still waiting, left to finish with its batch
    otherwise (the batch stops early only when every row's client has gone)."""

    def __init__(self, server: Server, max_batch: int, max_queue: int):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0 (got {max_batch}, {max_queue})")
        self.server, self.max_batch, self.max_queue = server, max_batch, max_queue
        self.waiting: deque[Job] = deque()
        self.ready = threading.Condition()
        self.batch_seconds = 1.0  # the last batch's wall time: the Retry-After estimate
        self.batch_sizes: list[int] = []  # every batch's size, in order (/health reports them)
        threading.Thread(target=self._work, name="promptdistill-batcher", daemon=True).start()

    def submit(self, job: Job) -> Job:
        with self.ready:
            if len(self.waiting) >= self.max_queue:
                wait = max(1, math.ceil(self.batch_seconds * (1 + len(self.waiting) // self.max_batch)))
                raise ApiError(503, f"the server is busy ({len(self.waiting)} requests waiting); retry in {wait} s",
                               kind="server_error", code="server_busy", headers={"Retry-After": str(wait)})
            self.waiting.append(job)
            self.ready.notify()
        return job

    def _next_batch(self) -> list[Job]:
        with self.ready:
            while not self.waiting:
                self.ready.wait()
            # A batch's clients get their answers together and send their next requests within
            # milliseconds. Starting at the first arrival would decode it alone and keep the rest
            # waiting a whole batch (batches then alternate small and large), so gather while
            # requests keep arriving: until none came for QUIET_SECONDS, at most GATHER_SECONDS.
            deadline = time.monotonic() + GATHER_SECONDS
            while len(self.waiting) < self.max_batch:
                seen, left = len(self.waiting), min(QUIET_SECONDS, deadline - time.monotonic())
                if left <= 0:
                    break
                self.ready.wait(left)
                if len(self.waiting) == seen:
                    break
            while True:
                while self.waiting and self.waiting[0].cancel.is_set():
                    _settle(self.waiting.popleft().future, error=_Cancelled())
                if self.waiting:
                    break
                self.ready.wait()
            first = self.waiting[0]
            batch = [j for j in self.waiting if (j.who, j.params) == (first.who, first.params)
                     and not j.cancel.is_set()][:self.max_batch]
            for j in batch:
                self.waiting.remove(j)
            return batch

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            started = time.monotonic()
            try:
                done = self._decode(batch)
            except Exception as e:  # noqa: BLE001  (each client gets the error; the worker lives on)
                for job in batch:
                    _settle(job.future, error=e)
            else:
                for job, completion in zip(batch, done):
                    _settle(job.future, completion)
            self.batch_seconds = time.monotonic() - started
            self.batch_sizes.append(len(batch))

    def _decode(self, batch: list[Job]) -> list:
        sampler = self.server.samplers[batch[0].who]
        deltas = [_Deltas(sampler.tokenizer) for _ in batch]

        def on_token(row: int, token: int) -> None:
            if all(j.cancel.is_set() for j in batch):
                raise _Cancelled  # nobody is listening: stop decoding
            job = batch[row]
            if job.on_text is not None and not job.cancel.is_set():
                delta = deltas[row].push(token)
                if delta:
                    job.on_text(delta)

        with self.server.models.context(batch[0].who):
            done = sampler.generate([j.ids for j in batch], batch[0].params, [j.seed for j in batch], on_token=on_token)
        for job, d, completion in zip(batch, deltas, done):
            rest = d.finish(completion.text) if job.on_text is not None else ""
            if rest:
                job.on_text(rest)
        return done


def build_app(server: Server, token: str | None = None) -> FastAPI:
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

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": server.started, "owned_by": "promptdistill"}

    @app.get("/health")
    async def health():
        b = server.batcher
        return {"status": "ok", "waiting": len(b.waiting), "batches": len(b.batch_sizes),
                "largest_batch": max(b.batch_sizes, default=0)}

    @app.get("/v1/models")
    async def list_models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card(n) for n in server.names]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str, request: Request):
        authorize(request)
        if name not in server.names:
            raise ApiError(404, f"The model {name!r} does not exist", code="model_not_found", param="model")
        return model_card(name)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        try:
            payload = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        try:
            req = ChatRequest.model_validate(payload)
        except ValidationError as e:  # name the field and the problem; never echo the values
            problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors())
            raise ApiError(400, f"invalid request: {problems}") from None
        who, ids, params, seed = server.prepare(req)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        loop = asyncio.get_running_loop()

        def usage(done) -> dict:
            n = len(done.token_ids)
            return {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}

        if not req.stream:
            job = server.batcher.submit(Job(who, ids, params, seed))
            try:
                done = await asyncio.wrap_future(job.future)
            except asyncio.CancelledError:
                job.cancel.set()  # the client went away: do not decode for nobody
                raise
            return {"id": rid, "object": "chat.completion", "created": created, "model": req.model,
                    "system_fingerprint": None,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                                 "logprobs": _openai_logprobs(done.logprobs, req.return_tokens_as_token_ids),
                                 "finish_reason": done.finish_reason}],
                    "usage": usage(done)}

        include_usage = bool((req.stream_options or {}).get("include_usage"))
        queue: asyncio.Queue = asyncio.Queue()

        def put(item) -> None:  # from the worker thread into this request's event loop
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def finished(future: concurrent.futures.Future) -> None:
            e = future.exception()
            if not isinstance(e, _Cancelled):
                put(("done", future.result()) if e is None else ("error", e))

        job = server.batcher.submit(Job(who, ids, params, seed, on_text=lambda d: put(("text", d))))
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
                        err = ApiError(500, f"generation failed: {type(value).__name__}", kind="server_error")
                        yield f"data: {json.dumps(err.body())}\n\n"
                        break
                    else:
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
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def serve(run_dir: str, teacher: bool = False, host: str = "127.0.0.1", port: int = 8000,
          token_env: str | None = None, max_batch: int = 16, max_queue: int = 256) -> int:
    """Load the run's models and serve them until Ctrl-C. User errors (a missing token
    variable, an untrained run, an API teacher with --teacher) raise the CLI's user errors."""
    import uvicorn

    from .config import ConfigError, load_config
    from .rundir import RunDir

    token = None
    if token_env:
        token = os.environ.get(token_env)
        if not token:
            raise ConfigError(f"--token-env {token_env}: that environment variable is not set or empty")
    cfg = load_config(run_dir)
    if teacher and cfg.teacher.backend != "local":
        raise ConfigError(f"--teacher: the teacher {cfg.teacher.served_name!r} is served by {cfg.teacher.base_url} "
                          f"already (backend {cfg.teacher.backend}); serve the student alone")
    if max_batch < 1 or max_queue < 0:
        raise ConfigError(f"--max-batch must be >= 1 and --max-queue >= 0 (got {max_batch}, {max_queue})")
    server = Server(cfg, RunDir(cfg.run_path), teacher=teacher, max_batch=max_batch, max_queue=max_queue)
    app = build_app(server, token)
    if host not in ("127.0.0.1", "localhost", "::1") and token is None:
        print(f"warning: listening on {host} without --token-env: anyone who can reach this machine can use the model",
              file=sys.stderr)
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
        return serve(args.run_dir, teacher=args.teacher, host=args.host, port=args.port, token_env=args.token_env,
                     max_batch=args.max_batch, max_queue=args.max_queue)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
