"""The interactive demo: talk to the distilled student, which gets NO system prompt.

Answers stream token by token. With --compare, the teacher (WITH the prompt) and the
base model (no prompt, no adapter) answer the same question beside it. A chat keeps its
history: each answerer reads the conversation so far with its own earlier answers, as it
would be served (`/reset` starts over; --single-turn answers each line alone). Reads one
question per line, so it works at a terminal and with piped stdin alike.
"""

from __future__ import annotations

import sys
from typing import TextIO

from ..answerers import Models, sampling_params
from ..backends.base import SamplingParams
from ..config import RunConfig
from ..render import prompt_ids
from ..rundir import RunDir


def stream_answer(models: Models, who: str, messages: list[dict], params: SamplingParams, seed: int, out: TextIO) -> str:
    """Generate one answer as `who`, writing text to `out` as it is produced."""
    sampler = models.sampler(who)
    tokens: list[int] = []
    shown = 0

    def on_token(_row: int, token: int) -> None:
        nonlocal shown
        tokens.append(token)
        text = sampler.tokenizer.decode(tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            out.write(text[shown:])
            out.flush()
            shown = len(text)

    with models.context(who):
        done = sampler.generate([prompt_ids(sampler.tokenizer, messages)], params, [seed], on_token=on_token)[0]
    out.write("\n")
    return done.text


RESET = "/reset"


def fitted(sampler, conversation: list[dict], max_tokens: int, out: TextIO) -> list[dict]:
    """The conversation with its oldest exchanges dropped until it and an answer fit the model's
    context (the system message, if any, stays); says so when it drops one."""
    window = getattr(getattr(sampler.model, "config", None), "max_position_embeddings", None)
    head = conversation[:1] if conversation[0]["role"] == "system" else []
    body = conversation[len(head):]
    dropped = 0
    while window and len(body) > 1 and len(prompt_ids(sampler.tokenizer, head + body)) + max_tokens > window:
        body, dropped = body[2:], dropped + 1
    if dropped:
        out.write(f"(the {dropped} oldest exchange{'s' if dropped > 1 else ''} dropped to fit the context of {window} tokens)\n")
    return head + body


def chat(cfg: RunConfig, run: RunDir, compare: bool = False, greedy: bool = False, history: bool = True,
         lines: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    """Answer each line of `lines`, each answerer after its own earlier answers (a line `/reset`
    starts a new conversation; `history` False answers every line alone); returns how many
    questions were answered."""
    models = Models(cfg, run)
    params = sampling_params(cfg)
    if greedy:
        params = SamplingParams(temperature=0, max_tokens=params.max_tokens, repetition_penalty=params.repetition_penalty)
    interactive = lines.isatty()
    if interactive:
        out.write(f"Chatting with the student of {run.root} (no system prompt). "
                  f"{RESET + ' starts a new conversation; ' if history else ''}Ctrl-D to quit.\n")
    whos = ["student", "teacher", "base"] if compare else ["student"]
    # Each answerer's own conversation: the teacher's opens with the system prompt.
    fresh = {"student": [], "teacher": models.teacher.with_prompt([]), "base": []}
    conversations = {who: list(fresh[who]) for who in whos}
    answered = 0
    while True:
        if interactive:
            out.write("\nyou> ")
            out.flush()
        line = lines.readline()
        if not line:
            break
        query = line.strip()
        if not query:
            continue
        if query == RESET and history:
            conversations = {who: list(fresh[who]) for who in whos}
            out.write("(new conversation)\n")
            continue
        if not interactive:
            out.write(f"you> {query}\n")
        for who in whos:
            asked = (conversations[who] if history else list(fresh[who])) + [{"role": "user", "content": query}]
            asked = fitted(models.sampler(who), asked, params.max_tokens, out)
            out.write(f"{who}> ")
            answer = stream_answer(models, who, asked, params, seed=params.seed + answered, out=out)
            conversations[who] = asked + [{"role": "assistant", "content": answer}]
        answered += 1
    return answered
