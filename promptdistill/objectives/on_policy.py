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

import math

import torch

from .. import divergence
from ..backends.base import SamplingParams
from ..loss import Loss, teacher_logprobs
from ..render import Datum, Example, sampled_datum
from ..rundir import StageError, sha256_text
from .step import StepContext, check_shared_vocabulary

TEACHER = True
JUDGES_SAMPLES = True


class ReverseKL(Loss):
    """KL(student || teacher) over the whole vocabulary, the teacher's log-probabilities carried by
    the datums: exact, gradients through the student's distribution (local trainer only)."""

    def local(self, out, batch):
        per_token = divergence.reverse_kl(out.logits, teacher_logprobs(batch).to(out.logits.device))
        return (per_token * out.weight).sum(), per_token.detach()


class ImportanceSampling(Loss):
    """Tinker's policy-gradient loss, -sum(exp(log p - sampling log p) x advantage) over the sampled
    tokens; with advantage = weight x (teacher - sampler log-probability), its per-token value is the
    sampled reverse-KL estimate the advantages encode."""

    tinker = "importance_sampling"

    def local(self, out, batch):
        old, advantage = (torch.tensor([x for d in batch for x, w in zip(getattr(d, f), d.weights) if w > 0],
                                       device=out.logits.device) for f in ("sampling_logprobs", "advantages"))
        logp = torch.log_softmax(out.logits, -1).gather(-1, out.target[:, None]).squeeze(-1)
        return -(torch.exp(logp - old) * advantage).sum(), divergence.sampled_reverse_kl(advantage, out.weight)

    def tinker_inputs(self, d):
        n = [len(d.target_tokens)]
        return {"target_tokens": (list(d.target_tokens), "int64", n), "logprobs": (list(d.sampling_logprobs), "float32", n),
                "advantages": (list(d.advantages), "float32", n)}

    def from_tinker(self, d, logprobs):
        loss = per_token = 0.0
        tokens = 0
        for w, lp, old, adv in zip(d.weights, logprobs, d.sampling_logprobs, d.advantages, strict=True):
            if w > 0:
                loss -= math.exp(lp - old) * adv
                per_token += divergence.sampled_reverse_kl(adv, w)
                tokens += 1
        return loss, per_token, tokens


REVERSE_KL = ReverseKL()
IMPORTANCE_SAMPLING = ImportanceSampling()


def prepare(ctx: StepContext, examples: list[Example]) -> None:
    if ctx.teacher is None:
        raise StageError(f"train.objective on_policy: teacher {ctx.cfg.teacher.model!r} (backend "
                         f"{ctx.cfg.teacher.backend}) cannot score the student's samples each step; it must be local "
                         f"or on Tinker (use the sft or kl objective)")
    check_shared_vocabulary(ctx, "on_policy: the teacher scores the student's own tokens")


def on_turns(cfg) -> bool:
    """It learns one turn at a time: the student answers each turn after the conversation so far."""
    return True


def exact(ctx: StepContext) -> bool:
    """The exact form needs the teacher's whole distribution and a trainer that takes it."""
    return ctx.trainer.takes(REVERSE_KL) and ctx.teacher.whole_distribution


def loss(ctx: StepContext) -> Loss:
    return REVERSE_KL if exact(ctx) else IMPORTANCE_SAMPLING


def sample_seed(example_id: str, sample: int, seed: int, step: int) -> int:
    return int(sha256_text(f"{example_id}\x00{sample}\x00{seed}\x00{step}")[:12], 16)


def sample_group(ctx: StepContext, step: int, top_logprobs: int | None) -> None:
    """Sample the student's answers for this process's share of `step` and of the rest of its group
    of sample_ahead steps (those that sample the student too) in one decode; keep them in ctx.samples
    by (example id, sample index): a step's micro-batches take its examples in any order."""
    cfg, op = ctx.cfg, ctx.cfg.train.on_policy
    group = [s for s in range(step, step + op.sample_ahead - step % op.sample_ahead)
             if s == step or (s < ctx.steps and cfg.train.objective_at(s) == cfg.train.objective_at(step))]
    mine = {s: [(e.id, k) for e in ctx.my_examples_at(s) for k in range(op.samples_per_query)] for s in group}
    flat = [(s, i, k) for s in group for i, k in mine[s]]
    params = SamplingParams(temperature=op.temperature, top_p=op.top_p, max_tokens=op.max_tokens or cfg.sampling.max_tokens,
                            top_logprobs=top_logprobs)
    answers = ctx.trainer.sampler().sample([ctx.rows[i]["prompt"] for _, i, _ in flat],
                                           params, [sample_seed(i, k, cfg.train.seed, s) for s, i, k in flat])
    if failed := next((a for a in answers if a.finish_reason == "error"), None):
        raise StageError(f"train: step {step + 1}: the student's sampler failed ({failed.error}); re-run to resume")
    for s in group:
        ctx.samples[s] = dict(zip(mine[s], answers))  # an example twice in a step: one seed, one answer
        answers = answers[len(mine[s]):]


def samples(ctx: StepContext, examples: list[Example], step: int, top_logprobs: int | None) -> list[tuple[list, object]]:
    """(the conversation it answers, the student's answer) for each of `examples` (some of this process's share of
    `step`) and each of its samples_per_query: sampled with the step's group on first use."""
    for done in [s for s in ctx.samples if s < step]:  # the steps before this one have used all theirs
        del ctx.samples[done]
    if step not in ctx.samples:
        sample_group(ctx, step, top_logprobs)
    k = ctx.cfg.train.on_policy.samples_per_query
    return [(ctx.rows[e.id]["prompt"], ctx.samples[step][e.id, i]) for e in examples for i in range(k)]


def judged_samples(ctx: StepContext, examples: list[Example], step: int, whole: bool) -> list[Datum]:
    """The student's answers to `examples` as its datums, each with the teacher's judgement WITH the
    prompt: its whole distribution at every answer token (`whole`), or the advantage of each token."""
    pairs = samples(ctx, examples, step, None if whole else 0)
    prompts, answers = [c for c, _ in pairs], [a.token_ids for _, a in pairs]
    students = [sampled_datum(ctx.trainer.tokenizer, c, a) for c, a in zip(prompts, answers)]
    if whole:
        return [exact_datum(s, lp) for s, lp in zip(students, ctx.teacher.distributions(prompts, answers))]
    return [advantage_datum(s, a, lp) for s, (_, a), lp in zip(students, pairs, ctx.teacher.token_logprobs(prompts, answers))]


def datums(ctx: StepContext, examples: list[Example], step: int) -> list[Datum]:
    return judged_samples(ctx, examples, step, exact(ctx))


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
