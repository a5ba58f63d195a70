"""jsd: the generalised Jensen-Shannon divergence of GKD (Agarwal et al., "On-Policy Distillation
of Language Models", 2024; TRL's GKDTrainer) between the prompted teacher's next-token
distribution T and the student's S, at every answer token, over the whole vocabulary:

    JSD_beta(T || S) = beta KL(T || M) + (1 - beta) KL(S || M),   M = beta T + (1 - beta) S

`train.jsd.beta` moves it between the two KLs: beta 0 is the forward KL(T || S) (the kl objective
with train.topk null), beta 1 the reverse KL(S || T) (on_policy's exact loss). The mixture form
itself shrinks to 0 at both ends, so, as TRL does, the ends are those KLs. Between them the
divergence is bounded (by log 2 at beta 0.5) and never infinite where one side rules a token out.

`train.jsd.on_policy` true: on the student's own answers WITHOUT the prompt (sampled as on_policy
samples them, with train.on_policy's settings), else on the teacher's answers (as kl). Either way
the local teacher scores the tokens WITH the prompt each step; local trainer only.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field

from .. import divergence
from ..loss import Loss, teacher_logprobs
from ..render import Datum, Example
from ..rundir import StageError
from . import kl, on_policy
from .step import StepContext, check_shared_vocabulary

TEACHER = True
JUDGES_SAMPLES = False  # its teacher gives its whole distribution: a local one, never one on Tinker


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    beta: float = Field(0.5, ge=0, le=1, description="0: forward KL(teacher || student), 1: reverse KL, between: the JSD")
    on_policy: bool = Field(False, description="on the student's own samples (else on the teacher's answers)")


def generalized_jsd(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, beta: float) -> torch.Tensor:
    """JSD_beta(teacher || student) per position, [positions, vocab] -> [positions]."""
    if beta == 0:
        return divergence.forward_kl(teacher_logprobs, student_logits)
    if beta == 1:
        return divergence.reverse_kl(student_logits, teacher_logprobs)
    t = torch.log_softmax(teacher_logprobs.float(), -1)
    s = torch.log_softmax(student_logits.float(), -1)
    mixture = torch.logaddexp(t + math.log(beta), s + math.log(1 - beta))
    return beta * divergence.forward_kl(t, mixture) + (1 - beta) * divergence.forward_kl(s, mixture)


class GeneralizedJSD(Loss):
    def __init__(self, beta: float):
        self.beta = beta

    def local(self, out, batch):
        per_token = generalized_jsd(out.logits, teacher_logprobs(batch).to(out.logits.device), self.beta)
        return (per_token * out.weight).sum(), per_token.detach()


def on_turns(cfg) -> bool:
    """On the student's own samples it learns one turn at a time, as on_policy does; else whole conversations."""
    return cfg.train.options("jsd").on_policy


def loss(ctx: StepContext) -> Loss:
    return GeneralizedJSD(ctx.cfg.train.options("jsd").beta)


def prepare(ctx: StepContext, examples: list[Example]) -> None:
    if ctx.teacher is None or not ctx.teacher.whole_distribution or not ctx.trainer.takes(loss(ctx)):
        raise StageError(f"train.objective jsd: needs the teacher's whole distribution each step: a local teacher "
                         f"(not {ctx.cfg.teacher.backend!r}) and student.backend local")
    check_shared_vocabulary(ctx, "jsd: the teacher's distribution is compared with the student's token by token")


def datums(ctx: StepContext, examples: list[Example], step: int) -> list[Datum]:
    if ctx.cfg.train.options("jsd").on_policy:
        return on_policy.judged_samples(ctx, examples, step, whole=True)
    return kl.full_datums(ctx, examples, sft_weight=0.0)
