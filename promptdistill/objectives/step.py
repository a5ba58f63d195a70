"""What every objective is handed besides a step's examples."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ..render import Example
from ..rundir import RunDir, StageError

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..teacher import Teacher


@dataclass
class StepContext:
    cfg: RunConfig
    run: RunDir
    trainer: object
    rows: dict[str, dict]  # example id -> its train row (query, answer, teacher row key)
    teacher: Teacher | None = None
    soft_targets: dict = field(default_factory=dict)  # kl: example id -> (top ids, top log-probabilities)
    steps: int = 0  # the run's optimiser steps
    my_examples_at: Callable[[int], list[Example]] | None = None  # this process's share of any step (sample_ahead)
    samples: dict = field(default_factory=dict)  # on_policy: step -> {(example id, sample index): the student's answer}


def answer_tokens(e: Example) -> list[int]:
    """The tokens an example is trained to predict, in order (its weighted targets)."""
    return [t for t, m in zip(e.tokens[1:], e.mask[1:]) if m]


def trained_runs(e: Example) -> list[list[int]]:
    """The tokens an example is trained to predict, one list per trained turn (a conversation's
    turns are apart: a user turn lies between any two)."""
    runs, previous = [], 0
    for t, m in zip(e.tokens[1:], e.mask[1:]):
        if m and not previous:
            runs.append([])
        if m:
            runs[-1].append(t)
        previous = m
    return runs


def check_shared_vocabulary(ctx: StepContext, why: str) -> None:
    """The distribution-level objectives compare teacher and student token by token."""
    if ctx.teacher.tokenizer.get_vocab() != ctx.trainer.tokenizer.get_vocab():
        raise StageError(f"train.objective {why}, so teacher and student must share a tokenizer; these two differ")
