"""The interactive demo: talk to the distilled student, which gets NO system prompt.

Answers stream token by token. With --compare, the teacher (WITH the prompt) and the
base model (no prompt, no adapter) answer the same question beside it. Reads one
question per line, so it works at a terminal and with piped stdin alike.
"""

from __future__ import annotations

import sys
from typing import TextIO

from ..answerers import Models, sampling_params, student_messages
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


def chat(cfg: RunConfig, run: RunDir, compare: bool = False, greedy: bool = False,
         lines: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    """Answer each line of `lines`; returns how many questions were answered."""
    models = Models(cfg, run)
    params = sampling_params(cfg)
    if greedy:
        params = SamplingParams(temperature=0, max_tokens=params.max_tokens, repetition_penalty=params.repetition_penalty)
    interactive = lines.isatty()
    if interactive:
        out.write(f"Chatting with the student of {run.root} (no system prompt). Ctrl-D to quit.\n")
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
        if not interactive:
            out.write(f"you> {query}\n")
        askers = [("student", student_messages(query))]
        if compare:
            askers += [("teacher", models.teacher.messages(query)), ("base", student_messages(query))]
        for who, messages in askers:
            out.write(f"{who}> ")
            stream_answer(models, who, messages, params, seed=params.seed + answered, out=out)
        answered += 1
    return answered
