"""on_policy: the student learns on its own answers. Each step it samples answers to the
step's train queries WITHOUT the prompt (current weights); the prompted teacher scores
those same tokens; the loss is reverse KL(student || teacher) per token. Off-policy
objectives train the student only on paths the teacher took; here it is corrected where it
actually goes when it is on its own, as it will be served.

Two forms of one objective. Exact: the local trainer with a local teacher takes the KL over
the whole vocabulary, gradients through the student's distribution. Sampled: a Tinker
student, or a teacher on Tinker (which gives the log-probability of given tokens through
compute_logprobs, not its whole distribution), takes importance_sampling with per-token
advantage = teacher - student log-probability of each sampled token (the Tinker cookbook's
on-policy distillation): the same gradient in expectation, from one sample per position.

The samples are a pure function of (train.seed, step, example, sample index) and the
weights, so a run resumed from a checkpoint draws the same answers it would have drawn.
"""

from __future__ import annotations

import torch

from .. import distributed
from ..backends.base import SamplingParams
from ..render import Datum, Example, sampled_datum
from ..rundir import StageError, sha256_text
from . import StepContext, check_shared_vocabulary, micro_batches, my_share

EXACT = "reverse_kl"  # the local trainer: exact over the vocabulary, gradients through the student's distribution
SAMPLED = "importance_sampling"  # the same objective as a policy gradient on the sampled tokens


def prepare(ctx: StepContext, examples: list[Example]) -> None:
    if ctx.teacher is None:
        raise StageError(f"train.objective on_policy: teacher {ctx.cfg.teacher.model!r} (backend "
                         f"{ctx.cfg.teacher.backend}) cannot score the student's samples each step; it must be local "
                         f"or on Tinker (use the sft or kl objective)")
    check_shared_vocabulary(ctx, "on_policy: the teacher scores the student's own tokens")


def exact(ctx: StepContext) -> bool:
    """The exact form needs the teacher's whole distribution and a trainer that takes it."""
    return EXACT in ctx.trainer.LOSSES and ctx.teacher.whole_distribution


def sample_seed(example_id: str, sample: int, seed: int, step: int) -> int:
    return int(sha256_text(f"{example_id}\x00{sample}\x00{seed}\x00{step}")[:12], 16)


def step_batches(ctx: StepContext, examples: list[Example], step: int) -> tuple[list[list[Datum]], str, int]:
    cfg, op, whole = ctx.cfg, ctx.cfg.train.on_policy, exact(ctx)
    mine = [(e.id, s) for e in my_share(examples) for s in range(op.samples_per_query)]
    queries = [ctx.rows[i]["query"] for i, _ in mine]
    params = SamplingParams(temperature=op.temperature, top_p=op.top_p,
                            max_tokens=op.max_tokens or cfg.sampling.max_tokens, top_logprobs=None if whole else 0)
    seeds = [sample_seed(i, s, cfg.train.seed, step) for i, s in mine]
    answers = ctx.trainer.sampler().sample([[{"role": "user", "content": q}] for q in queries], params, seeds)
    if failed := next((a for a in answers if a.finish_reason == "error"), None):
        raise StageError(f"train: step {step + 1}: the student's sampler failed ({failed.error}); re-run to resume")
    total, = distributed.sum_across([sum(a.completion_tokens for a in answers)])
    total = int(total)
    datums = []
    for q, a in zip(queries, answers):
        student = sampled_datum(ctx.trainer.tokenizer, [{"role": "user", "content": q}], a.token_ids, 1.0 / total)
        teacher = sampled_datum(ctx.teacher.tokenizer, [{"role": "system", "content": cfg.system_prompt},
                                                       {"role": "user", "content": q}], a.token_ids, 1.0)
        datums.append((student, teacher, a))
    out = []
    for chunk in micro_batches(datums, cfg.train.batch_size):
        judged = [t for _, t, _ in chunk]
        if whole:
            out.append([exact_datum(s, torch.log_softmax(lp, -1)) for (s, _, _), lp in zip(chunk, ctx.teacher.logits(judged))])
        else:
            out.append([advantage_datum(s, a, lp) for (s, _, a), lp in zip(chunk, ctx.teacher.token_logprobs(judged))])
    return out, EXACT if whole else SAMPLED, total


def exact_datum(student: Datum, teacher_logprobs: torch.Tensor) -> Datum:
    """The student's datum with the teacher's whole distribution at each answer token."""
    return Datum(student.input_tokens, student.target_tokens, student.weights, teacher_logprobs)


def advantage_datum(student: Datum, answer, teacher: torch.Tensor) -> Datum:
    """The policy-gradient form: the sampler's log-probability of each answer token and its
    advantage weight x (teacher - student log-probability); minimising -sum(ratio x advantage)
    on one's own samples is minimising the reverse KL."""
    n = len(student.target_tokens) - len(answer.token_ids)  # prompt positions, weight 0
    sampler = [e["logprob"] for e in answer.logprobs]
    weight = student.weights[n:]
    return Datum(student.input_tokens, student.target_tokens, student.weights,
                 sampling_logprobs=[0.0] * n + sampler,
                 advantages=[0.0] * n + [w * (t - lp) for w, t, lp in zip(weight, teacher.tolist(), sampler, strict=True)])
