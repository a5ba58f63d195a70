"""What `distill serve` honours of OpenAI's chat-completions API: the request's shape, what
it refuses, errors in OpenAI's shape, and per-token log-probabilities as OpenAI returns them."""

from __future__ import annotations

import json
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .backends.openai import TOKEN_ID_PREFIX

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


Body = TypeVar("Body", bound=BaseModel)


def parse_body(raw: bytes, shape: type[Body]) -> Body:
    """A request body as `shape`, or a 400 naming each bad field and its problem (never its value)."""
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None
    try:
        return shape.model_validate(payload)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors())
        raise ApiError(400, f"invalid request: {problems}") from None


def text_of(message: ChatMessage) -> str:
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


def openai_logprobs(scored: list[dict] | None, as_token_ids: bool = False) -> dict | None:
    """Our per-token log-probabilities in OpenAI's `choices[0].logprobs` shape; with
    `as_token_ids` each token is written "token_id:<id>", as vLLM does."""
    if scored is None:
        return None

    def entry(token: str, token_id: int, logprob: float) -> dict:
        text = f"{TOKEN_ID_PREFIX}{token_id}" if as_token_ids else token
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [entry(s["token"], s["id"], s["logprob"]) | {"top_logprobs": [entry(*t) for t in s["top"]]}
                        for s in scored]}


def check_supported(req: ChatRequest) -> None:
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

