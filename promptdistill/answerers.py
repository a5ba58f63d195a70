"""What every stage that answers a run's queries shares (generate, eval, chat, serve): the
run's sampling settings and seeds, and the finished run's models loaded once. The three answerers:
  teacher   the run's Teacher (teacher.py), WITH the system prompt
  student   the student model + adapter, NO prompt
  base      the student model, NO adapter, NO prompt
(`teacher_again` in eval is the teacher with another seed.)

A teacher behind an endpoint (`teacher.backend: openai`) is asked there and never loaded
here: what it said with its answers (teacher.jsonl's top-k log-probabilities) is read by
`recorded_topk`, for eval's fidelity and the kl objective alike.
"""

from __future__ import annotations

import contextlib

import torch
from tqdm import tqdm

from . import teacher
from .backends.base import Completion, Sampler, SamplingParams
from .backends.local_model import load_causal_lm
from .backends.local_sampler import LocalSampler
from .backends.local_scorer import AnswerScorer
from .config import RunConfig
from .models import check_adapter
from .rundir import RunDir, StageError


def sampling_params(cfg: RunConfig) -> SamplingParams:
    """How to answer, for every stage that samples; only `generate` adds top_logprobs."""
    s = cfg.sampling
    return SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
                          repetition_penalty=s.repetition_penalty, seed=s.seed)


def answer_settings(cfg: RunConfig) -> dict:
    """The sampling settings an answer depends on: batching does not change one, and an
    unset option is left out so that adding an option keeps older runs' keys. best_of
    chooses among answers rather than shaping one, so it is in generate's inputs instead."""
    settings = cfg.sampling.model_dump(exclude={"batch_size", "best_of"}, exclude_none=True)
    # Like top_logprobs, token ids change what a row records: rows recorded without them are not reused.
    return settings | ({"logprob_token_ids": True} if cfg.teacher.logprob_token_ids else {})


def row_seed(key: str, base_seed: int) -> int:
    return (int(key[:12], 16) + base_seed) % (2**63)


def recorded_topk(row: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(top-k ids, their log-probabilities, the sampled ids) per answer token, from the
    `logprobs` generate recorded in a teacher.jsonl row (sampling.top_logprobs), or None when
    the row has none with token ids (a server that gives token text only)."""
    entries = row.get("logprobs") or []
    if not entries or any(e.get("id") is None or not e.get("top") or any(t[1] is None for t in e["top"])
                          for e in entries):
        return None
    k = min(len(e["top"]) for e in entries)
    return (torch.tensor([[t[1] for t in e["top"][:k]] for e in entries]),
            torch.tensor([[t[2] for t in e["top"][:k]] for e in entries]),
            torch.tensor([e["id"] for e in entries]))


def recorded_positions(sampled: torch.Tensor, scored: torch.Tensor) -> int:
    """How many leading positions of an answer, scored as the tokens `scored`, a teacher's
    recorded distributions describe: a distribution depends only on the tokens before it, so
    every position up to and including the first where `scored` leaves the tokens the teacher
    sampled (a re-tokenised text, an answer trimmed to its last full sentence), none beyond
    what was recorded."""
    n = min(len(sampled), len(scored))
    same = int((sampled[:n] == scored[:n]).long().cumprod(0).sum())
    return min(same + 1, n)


class Models:
    """The student base model with its adapter (switchable off for `base`) and the run's
    teacher, loaded once; when teacher and student are the same model, one copy serves both.
    A teacher behind an endpoint (backend openai) is never loaded, even when `model` names a
    local copy: its figures are then the served model's (the one that wrote teacher.jsonl),
    and a hub id is never downloaded."""

    def __init__(self, cfg: RunConfig, run: RunDir):
        student_dir = check_adapter(run.student, cfg.student.model)
        self.student, self.tokenizer = load_causal_lm(student_dir, cfg.student.device, adapter_dir=run.student,
                                                     dtype=cfg.student.dtype)
        self.cfg = cfg
        self.teacher = teacher.load(cfg, (self.student, self.tokenizer), tinker_on_local_copy=True)
        # KL over the full vocabulary needs the teacher here, numbering tokens like the student.
        self.full_vocab = self.teacher.local and (
            self.teacher.base_of_adapter or self.teacher.tokenizer.get_vocab() == self.tokenizer.get_vocab())
        self.batch_size = cfg.sampling.batch_size
        self._scorers: dict[str, AnswerScorer] = {}

    def sampler(self, who: str) -> LocalSampler:
        """`who`'s local sampler (token-level decoding, streaming callbacks)."""
        if who == "teacher" and not self.teacher.local:
            raise StageError(f"the teacher {self.cfg.teacher.served_name!r} is served at {self.cfg.teacher.base_url} "
                             f"(teacher.backend openai): it has no local copy here to decode with")
        if who == "teacher":
            return self.teacher.sampler()
        # The student decodes as it is deployed (export merged, gguf): its adapter in the weights.
        return LocalSampler(self.student, self.tokenizer, self.batch_size, merge_lora=who == "student")

    def answerer(self, who: str) -> Sampler:
        """What answers as `who`: its local sampler, or the remote teacher's endpoint."""
        return self.teacher.sampler() if who == "teacher" else self.sampler(who)

    def answer_all(self, who: str, conversations: list[list[dict]], params: SamplingParams, seeds: list[int],
                   desc: str) -> list[Completion]:
        """`who`'s answers to `conversations` (the teacher's WITH its prompt, as given), batch by
        batch with a progress bar; a row an endpoint gave up on after its retries fails the stage."""
        sampler, out = self.answerer(who), []
        with self.context(who):
            for start in tqdm(range(0, len(conversations), self.batch_size), desc=desc, unit="batch", leave=False):
                out += sampler.sample(conversations[start:start + self.batch_size], params,
                                      seeds[start:start + self.batch_size])
        failed = [c.error for c in out if c.finish_reason == "error"]
        if failed:
            raise StageError(f"{desc}: {len(failed)} of {len(out)} answers failed after retries (first: {failed[0]}); re-run eval")
        return out

    def context(self, who: str):
        if who == "teacher":
            return self.teacher.context()
        return contextlib.nullcontext() if who == "student" else self.student.disable_adapter()

    def scorer(self, who: str) -> AnswerScorer:
        """`who`'s teacher-forced scorer, one per answerer for the whole evaluation: it keeps the
        system prompt's keys and values between batches, and those depend on the adapter being
        on or off, so student, base and teacher never share one."""
        if who == "teacher":
            return self.teacher.scorer
        if who not in self._scorers:
            self._scorers[who] = AnswerScorer(self.student)
        return self._scorers[who]
