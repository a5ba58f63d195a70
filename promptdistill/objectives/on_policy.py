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

`train.on_policy.sample_ahead` K > 1 samples the answers of K steps in one decode, with the
weights at the first of them (groups start at multiples of K). Decoding a 135M model on a CPU
is bound by reading the weights once per token, not by the batch: 8 steps' answers (64 rows)
cost about as much as one step's 8, and the later steps of a group learn on answers a few steps
old, as asynchronous RL does (the exact loss still takes the current student's distribution at
those positions; the sampled form's importance ratio corrects for the old sampler). A run
resumed inside a group samples the rest of that group with its resumed weights.
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


def sample_group(ctx: StepContext, examples: list[Example], step: int) -> None:
    """Sample the student's answers for `step` and the rest of its group of sample_ahead steps
    (those that are on_policy steps of this run) in one decode; keep them in ctx.samples."""
    cfg, op = ctx.cfg, ctx.cfg.train.on_policy
    group = [s for s in range(step, step + op.sample_ahead - step % op.sample_ahead)
             if s == step or (s < ctx.steps and cfg.train.objective_at(s) == "on_policy")]
    mine = {s: [(e.id, k) for e in my_share(examples if s == step else ctx.examples_at(s))
                for k in range(op.samples_per_query)] for s in group}
    flat = [(s, i, k) for s in group for i, k in mine[s]]
    params = SamplingParams(temperature=op.temperature, top_p=op.top_p, max_tokens=op.max_tokens or cfg.sampling.max_tokens,
                            top_logprobs=None if exact(ctx) else 0)
    answers = ctx.trainer.sampler().sample([[{"role": "user", "content": ctx.rows[i]["query"]}] for _, i, _ in flat],
                                           params, [sample_seed(i, k, cfg.train.seed, s) for s, i, k in flat])
    if failed := next((a for a in answers if a.finish_reason == "error"), None):
        raise StageError(f"train: step {step + 1}: the student's sampler failed ({failed.error}); re-run to resume")
    for s in group:
        ctx.samples[s] = (mine[s], answers[:len(mine[s])])
        answers = answers[len(mine[s]):]


def step_batches(ctx: StepContext, examples: list[Example], step: int) -> tuple[list[list[Datum]], str, int]:
    cfg, whole = ctx.cfg, exact(ctx)
    if step not in ctx.samples:
        sample_group(ctx, examples, step)
    mine, answers = ctx.samples.pop(step)
    queries = [ctx.rows[i]["query"] for i, _ in mine]
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
