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


def trained_run_of(e: Example) -> list[int | None]:
    """Per target position of `e`, which of its trained turns it trains (0, 1, ... in order), or
    None: a conversation's trained turns are apart, a user turn lies between any two."""
    out, run, previous = [], -1, 0
    for m in e.mask[1:]:
        if m and not previous:
            run += 1
        out.append(run if m else None)
        previous = m
    return out


def trained_runs(e: Example) -> list[list[int]]:
    """The tokens an example is trained to predict, one list per trained turn."""
    runs: list[list[int]] = []
    for t, run in zip(e.tokens[1:], trained_run_of(e)):
        if run is not None:
            if run == len(runs):
                runs.append([])
            runs[run].append(t)
    return runs


def check_shared_vocabulary(ctx: StepContext, why: str) -> None:
    """The distribution-level objectives compare teacher and student token by token."""
    if ctx.teacher.tokenizer.get_vocab() != ctx.trainer.tokenizer.get_vocab():
        raise StageError(f"train.objective {why}, so teacher and student must share a tokenizer; these two differ")
