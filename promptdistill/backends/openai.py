"""OpenAI backend: sample from any OpenAI-compatible chat-completions server (OpenAI,
vLLM, llama.cpp's server, `distill serve`, ...) through the official `openai` SDK.

`sample()` is synchronous, as the Sampler interface wants, and fans the batch out inside
one asyncio event loop: every row is its own request, at most `concurrency` in flight.
We do our own retries (the SDK's are off): 429, 408/409, 5xx, timeouts and dropped
connections are retried with exponential backoff and full jitter, and a server's
`Retry-After` is honoured (and makes every request of the batch wait, not just the one
that was told). A row still failing after `max_retries` retries comes back as a
Completion with finish_reason "error" and the reason in `error`; it never fails the
batch. Only answers the server can never give (401/403: the key; 404: the model name or
URL) stop the stage at once, since every other row would fail the same way.

The API key is read from the environment variable *named* in the config, at the start
of each `sample()` call, and lives only in that call's client: it is never an attribute
of the sampler, never in a config or run dir, and every error text that leaves this
module is scrubbed of it. Without `api_key_env` no Authorization header is sent at all
(the SDK would otherwise send $OPENAI_API_KEY to whatever server base_url names).

Token counts are the server's own (`usage`); the prompt size is not known before a
request, so `count_prompt_tokens` returns None and the generate stage's context check
is left to the server (an over-long prompt comes back as an HTTP 400 row error).

Log-probabilities come back with token text; with `logprob_token_ids` the request asks
for token ids instead (vLLM's `return_tokens_as_token_ids`, which `distill serve`
honours too: tokens come back as "token_id:123"), which is what fidelity and the kl
objective need. `timed()` streams one request at a time for eval's latency: the time to
the first text chunk and to the end, as this client sees them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import os
import random
import time
from dataclasses import dataclass

from ..models import ModelError
from ..render import Message
from .base import Completion, SamplingParams

BACKOFF_BASE = 0.5  # seconds: the first retry waits up to this, doubling each time...
BACKOFF_CAP = 30.0  # ...up to this
RETRY_AFTER_MAX = 120.0  # a server asking for a longer pause gets the row marked failed instead
RETRYABLE_STATUS = {408, 409, 429}  # and every 5xx
FATAL_STATUS = {401: "the server refused the API key", 403: "the server refused the API key",
                404: "no such model or URL on the server"}
ERROR_TEXT_MAX = 500


TOKEN_ID_PREFIX = "token_id:"  # how vLLM's return_tokens_as_token_ids writes a token


@dataclass(frozen=True)
class RemoteCompletion(Completion):
    """A completion whose token ids are the server's secret; its counts come from `usage`.
    A streamed one (`timed`) also has the seconds to its first text chunk and to its end."""

    usage_completion_tokens: int = 0
    first_token_s: float | None = None
    total_s: float | None = None

    @property
    def completion_tokens(self) -> int:
        return self.usage_completion_tokens


def failed(error: str) -> RemoteCompletion:
    return RemoteCompletion(text="", token_ids=[], prompt_tokens=0, finish_reason="error", error=error)


class _Retry(Exception):
    """A retryable failure: `reason` (already scrubbed), `wait` the server's Retry-After."""

    def __init__(self, reason: str, wait: float | None = None):
        super().__init__(reason)
        self.reason, self.wait = reason, wait


class _GiveUp(Exception):
    """A failure of this row that retrying cannot fix (HTTP 400, a refused answer...)."""


def scrub(text: str, secret: str | None) -> str:
    """`text` without `secret` in it, cut to a readable length."""
    text = str(text)
    if secret:
        text = text.replace(secret, "[redacted]")
    return text if len(text) <= ERROR_TEXT_MAX else text[:ERROR_TEXT_MAX] + "..."


def retry_after(headers) -> float | None:
    """Seconds the server asked us to wait: `retry-after-ms`, or `retry-after` in seconds or as an HTTP date."""
    if headers is None:
        return None
    try:
        if headers.get("retry-after-ms") is not None:
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


def backoff(attempt: int, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2^attempt)]."""
    return random.uniform(0.0, min(cap, base * 2**attempt))


def _server_message(err) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if isinstance(inner, str):
            return inner
    return str(getattr(err, "message", "") or err)


def _run(coro):
    """Run a coroutine to completion from synchronous code, even under a running loop (a notebook)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


class OpenAISampler:
    """Sampler over an OpenAI-compatible chat-completions API."""

    def __init__(self, base_url: str, api_model: str, api_key_env: str | None = None, concurrency: int = 8,
                 timeout: float = 60.0, max_retries: int = 5, backoff_base: float = BACKOFF_BASE,
                 backoff_cap: float = BACKOFF_CAP, logprob_token_ids: bool = False):
        self.base_url = base_url
        self.api_model = api_model
        self.api_key_env = api_key_env  # the variable's NAME; the key itself is never kept
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.logprob_token_ids = logprob_token_ids

    @classmethod
    def from_config(cls, model) -> "OpenAISampler":
        sampler = cls(base_url=model.base_url, api_model=model.served_name, api_key_env=model.api_key_env,
                      concurrency=model.concurrency, timeout=model.timeout, max_retries=model.max_retries,
                      logprob_token_ids=model.logprob_token_ids)
        sampler._api_key()  # a missing key is an error now, before anything is sampled
        return sampler

    def _api_key(self) -> str | None:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            name = self.api_key_env
            # Real variable names are upper case; anything else may be a pasted key: do not echo it.
            shown = repr(name) if name.isupper() else "named in api_key_env"
            raise ModelError(f"the environment variable {shown} (api_key_env) is not set or empty; "
                             f"export the API key there, or remove api_key_env if {self.base_url} needs no key")
        return key

    def count_prompt_tokens(self, conversation: list[Message]) -> int | None:
        """Unknown before a request: the server tokenizes (its usage reports the count afterwards)."""
        return None

    def sample(self, conversations: list[list[Message]], params: SamplingParams, seeds: list[int]) -> list[Completion]:
        if len(conversations) != len(seeds):
            raise ValueError(f"{len(conversations)} conversations but {len(seeds)} seeds")
        if not conversations:
            return []
        return _run(self._sample(conversations, params, seeds))

    def timed(self, conversations: list[list[Message]], params: SamplingParams) -> list[RemoteCompletion]:
        """Each conversation streamed, one request at a time (seed params.seed), with the
        seconds from sending it to its first text chunk and to its last: latency as a client
        of this server sees it. One client serves them all, so only the first pays for the
        connection, as in a long-lived client."""
        if not conversations:
            return []
        return _run(self._sample(conversations, params, [params.seed] * len(conversations), timed=True))

    async def _sample(self, conversations, params: SamplingParams, seeds: list[int], timed: bool = False) -> list[Completion]:
        import openai

        key = self._api_key()
        client = openai.AsyncOpenAI(base_url=self.base_url, api_key=key or "unused", max_retries=0, timeout=self.timeout)
        batch = _Batch(self, client, key, params, timed)
        tasks = [asyncio.ensure_future(batch.row(c, s)) for c, s in zip(conversations, seeds)]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            await client.close()


class _Batch:
    """One `sample()` (or `timed()`) call: its client, its concurrency limit, and the pause
    every request honours after a server said Retry-After."""

    def __init__(self, sampler: OpenAISampler, client, key: str | None, params: SamplingParams, timed: bool = False):
        self.s, self.client, self.key, self.params, self.timed = sampler, client, key, params, timed
        self.slots = asyncio.Semaphore(1 if timed else sampler.concurrency)  # timed: nothing else in flight
        self.not_before = 0.0  # time.monotonic() before which no request is sent

    async def row(self, messages: list[Message], seed: int) -> Completion:
        reason = "no attempt made"
        for attempt in range(self.s.max_retries + 1):
            async with self.slots:
                while (pause := self.not_before - time.monotonic()) > 0:
                    await asyncio.sleep(pause)
                try:
                    return await self._attempt(messages, seed)
                except _GiveUp as e:
                    return failed(str(e))
                except _Retry as e:
                    reason, wait = e.reason, e.wait
            if attempt == self.s.max_retries:
                break
            if wait is not None:
                if wait > RETRY_AFTER_MAX:
                    return failed(f"{reason}; the server asked to wait {wait:.0f}s (more than {RETRY_AFTER_MAX:.0f}s): "
                                  f"re-run later")
                self.not_before = max(self.not_before, time.monotonic() + wait)
            else:
                await asyncio.sleep(backoff(attempt, self.s.backoff_base, self.s.backoff_cap))
        tries = self.s.max_retries + 1
        return failed(f"{reason} (gave up after {tries} attempt{'s' if tries > 1 else ''})")

    async def _attempt(self, messages: list[Message], seed: int) -> Completion:
        import openai

        p = self.params
        extra = {"repetition_penalty": p.repetition_penalty} if p.repetition_penalty != 1.0 else {}
        scores = {} if p.top_logprobs is None else {"logprobs": True, "top_logprobs": p.top_logprobs}
        if scores and self.s.logprob_token_ids:
            extra["return_tokens_as_token_ids"] = True
        stream = {"stream": True, "stream_options": {"include_usage": True}} if self.timed else {}
        headers = None if self.key else {"Authorization": openai.Omit()}  # no key: send no Authorization at all
        try:
            start = time.perf_counter()
            request = self.client.chat.completions.create(
                model=self.s.api_model, messages=messages, temperature=p.temperature, top_p=p.top_p,
                max_tokens=p.max_tokens, seed=seed, extra_body=extra or None, extra_headers=headers, **scores, **stream)
            return await asyncio.wait_for(self._streamed(request, start) if self.timed else self._answered(request),
                                          self.s.timeout)
        except (asyncio.TimeoutError, openai.APITimeoutError):
            raise _Retry(f"timed out after {self.s.timeout:g}s") from None
        except openai.APIConnectionError as e:
            cause = e.__cause__
            detail = f"{type(cause).__name__}: {cause}" if cause is not None else str(e)
            raise _Retry(scrub(f"connection error ({detail})", self.key)) from None
        except openai.APIStatusError as e:
            status = e.status_code
            text = scrub(f"HTTP {status}: {_server_message(e)}", self.key)
            if status in FATAL_STATUS:
                hint = (f"; check the key in ${self.s.api_key_env}" if status in (401, 403) and self.s.api_key_env
                        else "; set api_key_env to the variable holding its key" if status in (401, 403)
                        else f"; check base_url and the model name {self.s.api_model!r} (api_model)")
                raise ModelError(f"{self.s.base_url}: {FATAL_STATUS[status]} ({text}){hint}") from None
            if status in RETRYABLE_STATUS or status >= 500:
                raise _Retry(text, retry_after(e.response.headers)) from None
            raise _GiveUp(text) from None
        except openai.OpenAIError as e:
            raise _GiveUp(scrub(f"{type(e).__name__}: {e}", self.key)) from None
        except _GiveUp:
            raise
        except Exception as e:  # noqa: BLE001  a garbled answer (bad JSON...): one row's trouble, maybe transient
            raise _Retry(scrub(f"unexpected {type(e).__name__}: {e}", self.key)) from None

    async def _answered(self, request) -> Completion:
        resp = await request
        choices = getattr(resp, "choices", None) or []
        if not choices or choices[0].message is None:
            raise _GiveUp("the response has no choices")
        choice = choices[0]
        usage = getattr(resp, "usage", None)
        return RemoteCompletion(
            text=(choice.message.content or "").strip(),
            token_ids=[],  # the server's ids are not returned; counts come from usage
            prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            finish_reason=_plain_finish(choice.finish_reason),
            usage_completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            logprobs=_logprobs(choice) if self.params.top_logprobs is not None else None,
        )

    async def _streamed(self, request, start: float) -> RemoteCompletion:
        """A streamed answer put together, timed from `start` (just before the request went out)."""
        parts, first, finish, usage = [], None, None, None
        async for chunk in await request:
            usage = chunk.usage or usage  # the last chunk, with stream_options include_usage
            for choice in chunk.choices:
                if choice.delta is not None and choice.delta.content:
                    first = first or time.perf_counter()
                    parts.append(choice.delta.content)
                finish = choice.finish_reason or finish
        end = time.perf_counter()
        return RemoteCompletion(
            text="".join(parts).strip(), token_ids=[], prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            finish_reason=_plain_finish(finish), usage_completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            first_token_s=(first or end) - start, total_s=end - start)  # an empty answer's first text is its end


def _plain_finish(finish: str | None) -> str:
    finish = finish or "stop"
    if finish not in ("stop", "length"):  # content_filter, tool_calls...: not a plain answer
        raise _GiveUp(f"finish_reason {finish!r}: the server gave no plain text answer")
    return finish


def _token(text: str) -> tuple[str | None, int | None]:
    """(token text, token id) of a logprobs entry's token: an id when the server wrote it as
    "token_id:123" (return_tokens_as_token_ids), which then carries no text."""
    if text.startswith(TOKEN_ID_PREFIX) and text[len(TOKEN_ID_PREFIX):].isdigit():
        return None, int(text[len(TOKEN_ID_PREFIX):])
    return text, None


def _logprobs(choice) -> list[dict] | None:
    """The answer's token log-probabilities in our shape, or None where the server offers none.
    Servers give token text, whose "id" is None, or with logprob_token_ids the id alone."""
    content = getattr(getattr(choice, "logprobs", None), "content", None)
    if not content:
        return None
    out = []
    for c in content:
        token, token_id = _token(c.token)
        out.append({"token": token, "id": token_id, "logprob": c.logprob,
                    "top": [[*_token(t.token), t.logprob] for t in (c.top_logprobs or [])]})
    return out
