"""kl: soft labels, off-policy. At every answer token the student WITHOUT the prompt is
trained on the cross-entropy against the teacher's next-token distribution WITH the prompt
(raw log-probabilities: before temperature and penalties), kept as its top-k tokens. The local
trainer takes them as they are plus one bin for the mass they leave out (all other tokens
together: cross_entropy_with_rest); Tinker's cross_entropy takes the top-k renormalised. That
is forward KL(teacher || student) over those k + 1 bins up to the teacher's own entropy, and it
carries what the prompt does to every alternative, where a sampled answer carries one token.
`train.sft_weight` mixes in the sampled token itself.

The targets are computed once by a teacher-forced pass (the prompt shared across the batch)
and stored in `teacher_topk/`, one safetensors file per batch, written whole (temp + rename):
a killed run keeps what it finished and a re-run computes only what is missing.

A teacher that is not local (behind an endpoint) cannot be asked to score answers, but it
returned its top-k with each token it sampled (sampling.top_logprobs, with token ids:
teacher.logprob_token_ids): those, read from teacher.jsonl, are the targets then, nothing to
compute or store.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .. import distributed
from ..answerers import recorded_positions, recorded_topk
from ..render import Datum, Example, RenderError, render_example, sampled_datum, to_datum
from ..rundir import StageError, read_jsonl, sha256_text
from . import StepContext, check_shared_vocabulary, micro_batches, my_micro_batches, my_share, targets

LOSS = "cross_entropy"  # top-k renormalised: what Tinker's cross_entropy takes
REST = "cross_entropy_with_rest"  # top-k as they are, plus one bin for the rest of the vocabulary (local trainer)
FULL = "forward_kl"  # train.topk null: KL(teacher || student) over the whole vocabulary (local trainer)
TARGETS_DIR = "teacher_topk"


def target_key(row: dict, k: int, teacher: str) -> str:
    return sha256_text(repr((row["key"], row["answer"], k, teacher)))[:24]


def answer_targets(e: Example) -> list[int]:
    """The tokens an example is trained to predict, in order (its weighted targets)."""
    return [t for t, m in zip(e.tokens[1:], e.mask[1:]) if m]


def load_targets(root: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(root.glob("*.safetensors")):
        t = load_file(str(f))
        for name in t:
            if name.endswith(".ids"):
                key = name[:-4]
                out[key] = (t[name].long(), t[key + ".logprobs"])
    return out


def save_targets(root: Path, targets: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, (ids, logprobs) in targets.items():
        tensors[key + ".ids"] = ids.to(torch.int32).contiguous()
        tensors[key + ".logprobs"] = logprobs.float().contiguous()
    name = sha256_text(" ".join(sorted(targets)))[:16]
    tmp = root / f".{name}.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, root / f"{name}.safetensors")


def prepare(ctx: StepContext, examples: list[Example]) -> None:
    """Fill ctx.soft_targets (example id -> (top ids, top log-probabilities) per answer token)
    from the store, computing what is missing with the local prompted teacher; without one,
    from what the teacher recorded with its answers."""
    t, cfg = ctx.cfg.train, ctx.cfg
    local = ctx.teacher is not None and ctx.teacher.whole_distribution  # a teacher that gives its distribution here
    if t.topk is None:
        if not local or FULL not in ctx.trainer.LOSSES:
            raise StageError("train.topk null (the teacher's whole distribution, scored each step) needs a local "
                             "teacher and student.backend local; set train.topk to a number")
        check_shared_vocabulary(ctx, "kl: soft labels are the teacher's distribution over the student's tokens")
        return
    if not local:
        ctx.soft_targets = recorded_targets(ctx, examples)
        return
    root = ctx.run.root / TARGETS_DIR
    stored = load_targets(root)
    keys = {e.id: target_key(ctx.rows[e.id], t.topk, cfg.teacher.model) for e in examples}
    # Under a launcher rank 0 alone computes and writes the missing targets (two writers would
    # race on one file); the others wait for it, then read them all from the store.
    todo = [e for e in examples if keys[e.id] not in stored] if distributed.is_main() else []
    size = max(1, cfg.sampling.batch_size // 4)
    started = time.perf_counter()
    for batch in tqdm(micro_batches(todo, size), desc=f"train: teacher top-{t.topk} targets", unit="batch", leave=False):
        datums, kept = [], []
        for e in batch:
            row = ctx.rows[e.id]
            messages = [{"role": "system", "content": cfg.system_prompt}, {"role": "user", "content": row["query"]}]
            try:
                datums.append(to_datum(render_example(ctx.teacher.tokenizer, messages, row["answer"], e.id)))
            except RenderError as err:
                raise StageError(str(err)) from None
            kept.append(e)
        found = {}
        for e, d, logits in zip(kept, datums, ctx.teacher.logits(datums)):
            if targets(d) != answer_targets(e):
                raise StageError(f"train.objective kl: example {e.id}: the teacher tokenizes the answer differently "
                                 f"from the student; soft labels need teacher and student to share a tokenizer")
            top_lp, top_ids = torch.log_softmax(logits, -1).topk(t.topk, -1)
            found[keys[e.id]] = (top_ids, top_lp)
        save_targets(root, found)
        stored.update(found)
    if todo:
        print(f"train: the teacher's top-{t.topk} targets of {len(todo)} answers in {time.perf_counter() - started:.1f}s "
              f"(stored in {TARGETS_DIR}/)", flush=True)
    if distributed.world_size() > 1:
        distributed.barrier()
        stored = load_targets(root)
    ctx.soft_targets = {e.id: stored[keys[e.id]] for e in examples}


def recorded_targets(ctx: StepContext, examples: list[Example]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Soft targets from the top-k log-probabilities (with token ids) recorded in teacher.jsonl,
    k = the fewest any row carries (at most train.topk). They describe the answer positions up
    to where the trained tokens leave the sampled ones (`recorded_positions`); past that the
    teacher's context is not the trained one, so the trained token itself is the target there."""
    cfg = ctx.cfg
    by_key = {r["key"]: r for r in read_jsonl(ctx.run.teacher)}
    recorded = {}
    for e in examples:
        top = recorded_topk(by_key[ctx.rows[e.id]["key"]])
        if top is None:
            raise StageError(
                f"train.objective kl: teacher {cfg.teacher.model!r} is not a local model, so its top-k distributions "
                f"cannot be computed here, and its answer to {e.id!r} in teacher.jsonl carries no top-k "
                f"log-probabilities with token ids; set sampling.top_logprobs (and teacher.logprob_token_ids: true "
                f"for vLLM or distill serve) and re-generate, or use the sft objective")
        recorded[e.id] = top
    k = min(cfg.train.topk, *(top[0].shape[1] for top in recorded.values()))
    out, hard, positions = {}, 0, 0
    for e in examples:
        ids, logprobs, sampled = recorded[e.id]
        trained = torch.tensor(answer_targets(e))
        n = recorded_positions(sampled, trained)
        rest = trained[n:]
        one_hot = torch.full((len(rest), k), float("-inf"))
        one_hot[:, 0] = 0.0  # the trained token, with all the probability
        out[e.id] = (torch.cat([ids[:n, :k], rest[:, None].expand(-1, k)]), torch.cat([logprobs[:n, :k], one_hot]))
        hard += len(rest)
        positions += len(trained)
    if distributed.is_main():
        print(f"train: kl soft targets: the top-{k} log-probabilities {cfg.teacher.served_name} returned with its answers "
              f"(teacher.jsonl), {positions - hard} of {positions} answer positions"
              + (f"; the other {hard}, past where the trained tokens leave the sampled ones, learn the trained token"
                 if hard else ""), flush=True)
    return out


def soft_datum(e: Example, ids: torch.Tensor, logprobs: torch.Tensor, weight: float, sft_weight: float,
               rest: bool = False) -> Datum:
    """Datum with K targets per position: the teacher's top-k tokens, weighted by their
    renormalised probabilities (x weight), plus the sampled token when sft_weight > 0.
    rest: the top-k keep their own probabilities and one more target, id -1, carries the mass
    they leave out, for every other token together (the cross_entropy_with_rest loss): the
    student then learns how much the teacher puts outside its top k, not only how it splits the
    top k. (With sft_weight > 0, a sampled token outside the top k is left out of the rest bin.)"""
    p = logprobs.float().exp() if rest else torch.softmax(logprobs.float(), -1)
    q = p * (1 - sft_weight) * weight
    outside = (1 - p.sum(-1)).clamp(min=0) * (1 - sft_weight) * weight
    k = ids.shape[1] + (1 if rest else 0) + (1 if sft_weight > 0 else 0)
    targets, weights, j = [], [], 0
    for tok, m in zip(e.tokens[1:], e.mask[1:]):
        if not m:
            targets.append([0] * k)
            weights.append([0.0] * k)
            continue
        row_ids, row_w = ids[j].tolist(), q[j].tolist()
        if rest:
            row_ids, row_w = row_ids + [-1], row_w + [float(outside[j])]
        if sft_weight > 0:
            row_ids, row_w = row_ids + [tok], row_w + [sft_weight * weight]
        targets.append(row_ids)
        weights.append(row_w)
        j += 1
    return Datum(input_tokens=e.tokens[:-1], target_tokens=targets, weights=weights)


def full_datums(ctx: StepContext, batch: list[Example], weight: float) -> list[Datum]:
    """train.topk null: the teacher scores the batch's answers WITH the prompt now (the prompt's
    keys and values shared), and each datum carries its whole next-token distribution, mixed
    with the sampled token by sft_weight: the loss is then forward KL(target || student)."""
    cfg, s = ctx.cfg, ctx.cfg.train.sft_weight
    prompted = []
    for e in batch:
        messages = [{"role": "system", "content": cfg.system_prompt}, {"role": "user", "content": ctx.rows[e.id]["query"]}]
        prompted.append(sampled_datum(ctx.teacher.tokenizer, messages, answer_targets(e)))
    out = []
    for e, logits in zip(batch, ctx.teacher.logits(prompted)):
        target = torch.log_softmax(logits, -1)
        if s > 0:  # log((1 - s) p + s one_hot), in log space: a token the teacher rules out stays at -inf, not nan
            sampled = torch.full_like(target, float("-inf"))
            sampled.scatter_(-1, torch.tensor(answer_targets(e))[:, None], 0.0)
            target = torch.logaddexp(target + math.log(1 - s), sampled + math.log(s)) if s < 1 else sampled
        weights = [weight if m else 0.0 for m in e.mask[1:]]
        out.append(Datum(e.tokens[:-1], e.tokens[1:], weights, teacher_logprobs=target))
    return out


def step_batches(ctx: StepContext, examples: list[Example], step: int) -> tuple[list[list[Datum]], str, int]:
    total = sum(e.n_trainable for e in examples)
    if ctx.cfg.train.topk is None:
        return [full_datums(ctx, b, 1.0 / total) for b in my_micro_batches(examples, ctx.cfg.train.batch_size)], FULL, total
    rest = REST in ctx.trainer.LOSSES
    mine = [soft_datum(e, *ctx.soft_targets[e.id], 1.0 / total, ctx.cfg.train.sft_weight, rest) for e in my_share(examples)]
    return micro_batches(mine, ctx.cfg.train.batch_size), REST if rest else LOSS, total
