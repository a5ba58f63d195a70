"""Training objectives: what one optimiser step of `distill train` minimises.

Each objective is one small module with the same function,

    step_batches(ctx, examples, step) -> (micro-batches of Datums, loss name, token count)

which the one training loop in stages/train.py calls, then hands the batches to the
trainer's forward_backward. The objectives differ only in where the targets come from:

  sft        the teacher's sampled answer tokens (hard labels)
  kl         the teacher's top-k next-token distribution WITH the prompt on those answers
             (soft labels, off-policy), computed once and stored beside teacher.jsonl
  on_policy  the student samples its own answers WITHOUT the prompt each step; the teacher
             judges every token WITH the prompt; the loss is reverse KL(student || teacher)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import distributed
from ..backends import make_sampler
from ..backends.local import AnswerScorer, load_causal_lm
from ..config import RunConfig
from ..models import resolve_model
from ..render import Datum, Example
from ..rundir import RunDir, StageError


class PromptedTeacher:
    """The local teacher WITH its system prompt, scoring given tokens: its logits at the
    weighted positions of each datum (the prompt's keys and values computed once and shared
    by the batch). When teacher and student are the same model, the trainer's own model with
    its adapter switched off is the teacher: no second copy in memory."""

    whole_distribution = True  # its logits over the vocabulary, not only the given tokens' log-probabilities

    def __init__(self, model, tokenizer, base_of_adapter: bool):
        self.model, self.tokenizer = model, tokenizer
        self.base_of_adapter = base_of_adapter
        self.scorer = AnswerScorer(model)

    @classmethod
    def for_run(cls, cfg: RunConfig, trainer) -> "PromptedTeacher | RemoteTeacher | None":
        """The local teacher; a teacher on Tinker when on_policy needs its judgement (it can score
        given tokens there); else None (its judgement then comes only from what generate recorded)."""
        if cfg.teacher.backend == "tinker" and "on_policy" in cfg.train.objectives():
            return RemoteTeacher(make_sampler(cfg.teacher, cfg.sampling.batch_size))
        if cfg.teacher.backend != "local":
            return None
        if cfg.teacher.model == cfg.student.model and cfg.student.backend == "local":
            return cls(trainer.model, trainer.tokenizer, base_of_adapter=True)
        model, tokenizer = load_causal_lm(resolve_model(cfg.teacher.model), cfg.teacher.device, dtype=cfg.teacher.dtype)
        return cls(model, tokenizer, base_of_adapter=False)

    @torch.no_grad()
    def logits(self, datums: list[Datum]) -> list[torch.Tensor]:
        was_training = self.model.training
        self.model.eval()
        off = self.model.disable_adapter() if self.base_of_adapter else contextlib.nullcontext()
        with off:
            s = self.scorer.scored(datums, share_prefix=True)
        self.model.train(was_training)
        return [logits for logits, _ in s.per_row(len(datums))]

    def token_logprobs(self, datums: list[Datum]) -> list[torch.Tensor]:
        """Its log-probability of each datum's weighted target tokens."""
        return [torch.log_softmax(logits, -1).gather(-1, torch.tensor(targets(d))[:, None]).squeeze(-1)
                for d, logits in zip(datums, self.logits(datums))]


class RemoteTeacher:
    """A teacher on a server that scores given tokens WITH its prompt (Tinker's compute_logprobs):
    the log-probability of each weighted target, not its whole distribution."""

    whole_distribution = False

    def __init__(self, sampler):
        self.sampler, self.tokenizer = sampler, sampler.tokenizer

    def token_logprobs(self, datums: list[Datum]) -> list[torch.Tensor]:
        return [torch.tensor(lps) for lps in self.sampler.target_logprobs(datums)]


def targets(d: Datum) -> list[int]:
    return [t for t, w in zip(d.target_tokens, d.weights) if w > 0]


def check_shared_vocabulary(ctx: "StepContext", why: str) -> None:
    """The distribution-level objectives compare teacher and student token by token."""
    if ctx.teacher.tokenizer.get_vocab() != ctx.trainer.tokenizer.get_vocab():
        raise StageError(f"train.objective {why}, so teacher and student must share a tokenizer; these two differ")


@dataclass
class StepContext:
    """What the objectives need besides the step's examples."""
    cfg: RunConfig
    run: RunDir
    trainer: object
    rows: dict[str, dict]  # example id -> its train row (query, answer, teacher row key)
    teacher: PromptedTeacher | RemoteTeacher | None = None
    soft_targets: dict = field(default_factory=dict)  # kl: example id -> (top ids, top log-probabilities)
    steps: int = 0  # the run's optimiser steps
    examples_at: Callable[[int], list[Example]] | None = None  # the examples of any step (on_policy's sample_ahead)
    samples: dict = field(default_factory=dict)  # on_policy: step -> (its (example id, sample), the student's answers)


def my_share(items: list) -> list:
    """This process's share of a step (every world_size-th item, from its rank); all of it
    with one process."""
    return items[distributed.rank()::distributed.world_size()]


def micro_batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def my_micro_batches(items: list, size: int) -> list[list]:
    return micro_batches(my_share(items), size)
