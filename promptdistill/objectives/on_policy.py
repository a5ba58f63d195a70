"""on_policy: the student learns on its own answers. Each step it samples answers to the
step's train queries WITHOUT the prompt (current weights); the prompted teacher scores
those same tokens; the loss is reverse KL(student || teacher) per token, exact over the
vocabulary. Off-policy objectives train the student only on paths the teacher took; here
it is corrected where it actually goes when it is on its own, as it will be served.

The samples are a pure function of (train.seed, step, example, sample index) and the
weights, so a run resumed from a checkpoint draws the same answers it would have drawn.
"""

from __future__ import annotations

import torch

from .. import distributed
from ..backends.base import SamplingParams
from ..render import Datum, Example, sampled_datum
from ..rundir import StageError, sha256_text
from . import StepContext, micro_batches, my_share

LOSS = "reverse_kl"


def prepare(ctx: StepContext, examples: list[Example]) -> None:
    if ctx.teacher is None:
        raise StageError(f"train.objective on_policy: teacher {ctx.cfg.teacher.model!r} is not a local model; the local "
                         f"trainer needs it to score the student's samples (use the sft or kl objective)")
    if ctx.teacher.tokenizer.get_vocab() != ctx.trainer.tokenizer.get_vocab():
        raise StageError("train.objective on_policy: reverse KL over the vocabulary needs teacher and student to share "
                         "a tokenizer; these two differ")


def sample_seed(example_id: str, sample: int, seed: int, step: int) -> int:
    return int(sha256_text(f"{example_id}\x00{sample}\x00{seed}\x00{step}")[:12], 16)


def step_batches(ctx: StepContext, examples: list[Example], step: int) -> tuple[list[list[Datum]], str, int]:
    cfg, op = ctx.cfg, ctx.cfg.train.on_policy
    mine = [(e.id, s) for e in my_share(examples) for s in range(op.samples_per_query)]
    queries = [ctx.rows[i]["query"] for i, _ in mine]
    params = SamplingParams(temperature=op.temperature, top_p=op.top_p,
                            max_tokens=op.max_tokens or cfg.sampling.max_tokens)
    seeds = [sample_seed(i, s, cfg.train.seed, step) for i, s in mine]
    answers = ctx.trainer.sampler().sample([[{"role": "user", "content": q}] for q in queries], params, seeds)
    total, = distributed.sum_across([sum(a.completion_tokens for a in answers)])
    total = int(total)
    datums = []
    for q, a in zip(queries, answers):
        student = sampled_datum(ctx.trainer.tokenizer, [{"role": "user", "content": q}], a.token_ids, 1.0 / total)
        teacher = sampled_datum(ctx.teacher.tokenizer, [{"role": "system", "content": cfg.system_prompt},
                                                       {"role": "user", "content": q}], a.token_ids, 1.0)
        datums.append((student, teacher))
    out = []
    for chunk in micro_batches(datums, cfg.train.batch_size):
        judged = ctx.teacher.logits([t for _, t in chunk])
        out.append([Datum(s.input_tokens, s.target_tokens, s.weights, torch.log_softmax(lp, -1))
                    for (s, _), lp in zip(chunk, judged)])
    return out, LOSS, total
