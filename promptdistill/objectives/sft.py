"""sft: cross-entropy on the teacher's sampled answer tokens (hard labels), a token mean over the step."""

from __future__ import annotations

from ..loss import CROSS_ENTROPY
from ..render import Datum, Example, to_datum
from .step import StepContext

TEACHER = False
JUDGES_SAMPLES = False


def loss(ctx: StepContext):
    return CROSS_ENTROPY


def datums(ctx: StepContext, examples: list[Example], step: int) -> list[Datum]:
    return [to_datum(e) for e in examples]
