"""sft: cross-entropy on the teacher's sampled answer tokens, a token mean over the step."""

from __future__ import annotations

from ..render import Datum, Example, to_datum
from . import StepContext, micro_batches, my_share

LOSS = "cross_entropy"


def weighted(examples: list[Example], total_tokens: int) -> list[Datum]:
    # Each trainable token weighs 1/total over the whole optimiser step: a token mean,
    # however the step is split into micro-batches or processes.
    return [to_datum(e, 1.0 / total_tokens) for e in examples]


def step_batches(ctx: StepContext, examples: list[Example], step: int) -> tuple[list[list[Datum]], str, int]:
    total = sum(e.n_trainable for e in examples)  # the whole step's, in every process
    return micro_batches(weighted(my_share(examples), total), ctx.cfg.train.batch_size), LOSS, total
