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
from ..loss import CROSS_ENTROPY, Loss, teacher_logprobs
from ..render import Datum, Example
from ..rundir import StageError, read_jsonl, sha256_text
from .step import StepContext, answer_tokens, check_shared_vocabulary, trained_runs

TEACHER = True
JUDGES_SAMPLES = False
TARGETS_DIR = "teacher_topk"


class CrossEntropyWithRest(Loss):
    """The soft cross-entropy where a target id of -1 stands for all the tokens the position's
    other targets do not name, as one bin (log p of it = logsumexp of their logits - logsumexp
    of all): stored top-k soft labels with the mass they leave out. (Local trainer only; on
    Tinker the top-k are renormalised and take its cross_entropy.)"""

    def local(self, out, batch):
        rest = out.target < 0
        named = torch.where(rest, out.target[:, :1], out.target)  # the rest bin's column repeats a named id
        picked = -torch.log_softmax(out.logits, -1).gather(-1, named)  # [positions, K]
        log_rest = torch.logsumexp(out.logits.scatter(-1, named, float("-inf")), -1) - torch.logsumexp(out.logits, -1)
        picked = torch.where(rest, -log_rest[:, None], picked)
        return (picked * out.weight).sum(), ((picked * out.weight).sum(-1) / out.weight.sum(-1)).detach()


class ForwardKL(Loss):
    """KL(teacher || student) over the whole vocabulary, the teacher's log-probabilities carried by
    the datums (train.topk null; local trainer only)."""

    def local(self, out, batch):
        kl = out.forward_kl(teacher_logprobs(batch))
        return (kl * out.weight).sum(), kl.detach()


REST = CrossEntropyWithRest()
FORWARD_KL = ForwardKL()


def loss(ctx: StepContext) -> Loss:
    if ctx.cfg.train.topk is None:
        return FORWARD_KL
    return REST if ctx.trainer.takes(REST) else CROSS_ENTROPY


def target_key(row: dict, k: int, teacher: str) -> str:
    return sha256_text(repr((row["keys"], row["messages"], sorted(row["trained"].items()), k, teacher)))[:24]


def teacher_logits(ctx: StepContext, batch: list[Example]) -> list[torch.Tensor]:
    """The local prompted teacher's logits at every trained token of `batch`: each example's
    conversation rendered WITH the prompt (its keys and values computed once for the batch)."""
    datums = [ctx.teacher.rendered(ctx.rows[e.id]["messages"], ctx.rows[e.id]["trained"], e.id) for e in batch]
    for e, d in zip(batch, datums):
        if [t for t, w in zip(d.target_tokens, d.weights) if w > 0] != answer_tokens(e):
            raise StageError(f"train.objective kl: example {e.id}: the teacher tokenizes the answer differently "
                             f"from the student; soft labels need teacher and student to share a tokenizer")
    return ctx.teacher.logits(datums)


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
        if not local or not ctx.trainer.takes(FORWARD_KL):
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
    for batch in tqdm([todo[i:i + size] for i in range(0, len(todo), size)], desc=f"train: teacher top-{t.topk} targets",
                      unit="batch", leave=False):
        found = {}
        for e, logits in zip(batch, teacher_logits(ctx, batch)):
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
        keys = ctx.rows[e.id]["keys"]  # one per trained turn, in order
        recorded[e.id] = [recorded_topk(by_key[key]) for key in keys]
        if None in recorded[e.id]:
            raise StageError(
                f"train.objective kl: teacher {cfg.teacher.model!r} is not a local model, so its top-k distributions "
                f"cannot be computed here, and its answer {keys[recorded[e.id].index(None)]!r} of example {e.id!r} in "
                f"teacher.jsonl carries no top-k log-probabilities with token ids; set sampling.top_logprobs (and "
                f"teacher.logprob_token_ids: true for vLLM or distill serve) and re-generate, or use the sft objective")
    k = min(cfg.train.topk, *(top[0].shape[1] for tops in recorded.values() for top in tops))
    out, hard, positions = {}, 0, 0
    for e in examples:
        parts = []
        for (ids, logprobs, sampled), trained in zip(recorded[e.id], trained_runs(e), strict=True):
            trained = torch.tensor(trained)
            n = recorded_positions(sampled, trained)
            rest = trained[n:]
            one_hot = torch.full((len(rest), k), float("-inf"))
            one_hot[:, 0] = 0.0  # the trained token, with all the probability
            parts.append((torch.cat([ids[:n, :k], rest[:, None].expand(-1, k)]), torch.cat([logprobs[:n, :k], one_hot])))
            hard += len(rest)
            positions += len(trained)
        out[e.id] = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
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


def full_datums(ctx: StepContext, batch: list[Example], sft_weight: float) -> list[Datum]:
    """train.topk null: the teacher scores the batch's answers WITH the prompt now (the prompt's
    keys and values shared), and each datum carries its whole next-token distribution, mixed
    with the sampled token by sft_weight: the loss is then forward KL(target || student)."""
    s, out = sft_weight, []
    for e, logits in zip(batch, teacher_logits(ctx, batch)):
        target, answer = torch.log_softmax(logits, -1), answer_tokens(e)
        if s > 0:  # log((1 - s) p + s one_hot), in log space: a token the teacher rules out stays at -inf, not nan
            sampled = torch.full_like(target, float("-inf"))
            sampled.scatter_(-1, torch.tensor(answer)[:, None], 0.0)
            target = torch.logaddexp(target + math.log(1 - s), sampled + math.log(s)) if s < 1 else sampled
        out.append(Datum(e.tokens[:-1], e.tokens[1:], [float(m) for m in e.mask[1:]], teacher_logprobs=target))
    return out


def datums(ctx: StepContext, examples: list[Example], step: int) -> list[Datum]:
    t = ctx.cfg.train
    if t.topk is None:
        return full_datums(ctx, examples, t.sft_weight)
    return [soft_datum(e, *ctx.soft_targets[e.id], 1.0, t.sft_weight, ctx.trainer.takes(REST)) for e in examples]
