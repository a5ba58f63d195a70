"""Stage 3, train: a LoRA student learns to give the teacher's answers WITHOUT the prompt.

One readable loop over Tinker-style primitives (forward_backward, optim_step, save).
Examples are rendered with the student's chat template and no system prompt. Each step's
objective (objectives/) turns the step's examples into datums and names its loss; the loop
weighs every trained token (the answer's tokens and its end-of-turn token) 1/(the step's
trained tokens), so the loss is a token mean over the optimiser step. Validation loss is measured before the first step, so the
untrained model's figure sits in metrics.jsonl beside the trained ones. The data order
is a pure function of (seed, step), so a resumed run sees the same batches.

Under `accelerate launch` / torchrun (WORLD_SIZE > 1) each process trains on every N-th
example of each step's batch and the trainer sums the gradients, so a step is the same
step as with one process (same examples, same 1/total token weights); rank 0 alone
writes metrics, checkpoints and the adapter.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import re
import shutil
import signal
import threading
from typing import Callable, Iterator

from tqdm import tqdm

from .. import distributed, registry, teacher, tracking
from ..backends import make_trainer
from ..config import RunConfig, TrainConfig
from ..loss import CROSS_ENTROPY
from ..objectives.step import StepContext, trained_run_of
from ..render import Datum, Example, RenderError, render_conversation, student_view, to_datum
from ..rundir import (RunDir, StageError, Timer, append_jsonl, atomic_write_text, fingerprint, fmt_seconds,
                      read_jsonl, sha256_text)
from ..conversations import answered_turns, turn_id, turn_identity
from .generate import row_key

SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def training_answer(row: dict) -> str | None:
    """The teacher's answer as the student should learn it. An answer cut off at
    max_tokens is trimmed back to its last full sentence (so the student still learns to
    stop); one with no full sentence in its first half is dropped."""
    text = row["completion"].strip()
    if row.get("finish_reason") != "length":
        return text or None
    ends = [m.end() for m in SENTENCE_END.finditer(text)]
    if not ends or ends[-1] < len(text) / 2:
        return None
    return text[: ends[-1]]


def lr_at(step: int, total: int, peak: float, warmup: int, schedule: str) -> float:
    """Linear warm-up over `warmup` steps, then constant, linear or cosine decay to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return peak * (1 - progress)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def micro_batch(examples: list[Example], step: int, micro: int, batch_size: int, grad_accum: int, seed: int) -> list[Example]:
    """The examples of micro-batch `micro` of optimiser step `step`: walk a fresh seeded
    permutation of the data each epoch, so any step's batch can be recomputed on resume."""
    first = (step * grad_accum + micro) * batch_size
    return [examples[_epoch_order(len(examples), seed, i // len(examples))[i % len(examples)]]
            for i in range(first, first + batch_size)]


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return tuple(order)


def step_examples(examples: list[Example], step: int, t: TrainConfig) -> list[Example]:
    """All examples of optimiser step `step` (its grad_accum micro-batches, in order)."""
    return [e for m in range(t.grad_accum) for e in micro_batch(examples, step, m, t.batch_size, t.grad_accum, t.seed)]


def micro_batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


# What one more micro-batch costs, in padded tokens: the kl demo's forward and backward, teacher
# pass included, on 2 cores in fp32 took 1.32 s + 8.2 ms per padded token (bench/length_groups.py).
# It only decides when a cut pays.
MICRO_BATCH_COST = 160


def length_groups(examples: list[Example], most: int, cost: int = MICRO_BATCH_COST) -> list[list[Example]]:
    """The examples, sorted by length, cut into micro-batches of at most `most` so that the padded
    tokens plus `cost` per micro-batch are fewest: a step mixing single answers with whole
    conversations no longer pads every single answer to the longest conversation. A step's
    gradient is a sum over its examples, so how they are grouped changes its cost, not its value."""
    ordered = sorted(examples, key=lambda e: len(e.tokens))
    best = [0] + [math.inf] * len(ordered)  # best[j]: the cheapest cut of ordered[:j]
    cut = [0] * (len(ordered) + 1)
    for j in range(1, len(ordered) + 1):
        for i in range(max(0, j - most), j):
            price = best[i] + (j - i) * len(ordered[j - 1].tokens) + cost
            if price < best[j]:
                best[j], cut[j] = price, i
    groups, j = [], len(ordered)
    while j:
        groups.append(ordered[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def turn_factors(e: Example, row: dict, weights: list[float]) -> list[float]:
    """train.turn_weights at each target position of `e`: the weight of the answer the position
    trains (a conversation's k-th answer weighs weights[k-1], the last weight every later one), 0
    where nothing is trained. `row`: the example's train row (its messages, its trained turns)."""
    answers = [i for i, m in enumerate(row["messages"]) if m["role"] == "assistant"]
    per_run = [weights[min(answers.index(i), len(weights) - 1)] for i in sorted(row["trained"])]
    return [0.0 if run is None else per_run[run] for run in trained_run_of(e)]


def step_datums(ctx: StepContext, objective, examples: list[Example], step: int) -> tuple[list[list[Datum]], int]:
    """This process's micro-batches of optimiser step `step` and the step's trained tokens (in
    every process). The objective turns each micro-batch of examples (of similar lengths) into
    datums at unit weight; each trained token then weighs 1/total over the whole step: a token
    mean, however the step is split into micro-batches or processes. With train.turn_weights a
    token weighs its turn's weight / the step's summed weights: a weighted token mean."""
    size, weights = ctx.cfg.train.batch_size, ctx.cfg.train.turn_weights
    groups = length_groups(distributed.my_share(examples), size)
    grouped = [objective.datums(ctx, group, step) for group in groups]
    norm = None
    if weights is not None:
        factors = [[turn_factors(e, ctx.rows[e.id], weights) for e in group] for group in groups]
        grouped = [[d.reweighted(f) for d, f in zip(datums, fs, strict=True)] for datums, fs in zip(grouped, factors)]
        norm, = distributed.sum_across([sum(sum(f) for fs in factors for f in fs)])
        if norm == 0:
            raise StageError(f"train.turn_weights {weights}: every answer of step {step + 1} weighs 0")
    total, = distributed.sum_across([sum(d.trained_positions() for datums in grouped for d in datums)])
    norm = total if norm is None else norm
    return [chunk for datums in grouped for chunk in micro_batches([d.scaled(1.0 / norm) for d in datums], size)], int(total)


def validation_loss(trainer, examples: list[Example], batch_size: int) -> float:
    nll = tokens = 0
    for batch in length_groups(distributed.my_share(examples), batch_size):
        result = trainer.forward([to_datum(e) for e in batch], CROSS_ENTROPY)
        nll += result.nll_sum
        tokens += result.tokens
    nll, tokens = distributed.sum_across([nll, tokens])
    return nll / tokens


def load_split(cfg: RunConfig, run: RunDir) -> dict[str, list[dict]]:
    """Teacher rows of the current queries, by split, one per answered turn: its id, the user
    turn ("query"), the conversation the student answers it after ("prompt": the teacher's
    without the system prompt), the answer to learn, what seeds its answers ("identity"), and
    that turn as an example ("messages" ending with the answer, "trained": the answer's index, its
    end-of-turn trained). A turn whose answer has nothing to learn as an ended answer (cut off
    before a full sentence) is in "dropped"."""
    queries = read_jsonl(run.queries)
    by_key = {r["key"]: r for r in read_jsonl(run.teacher)}
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": [], "missing": [], "dropped": []}
    for q in queries:
        for turn in answered_turns(q):
            identity = turn_identity(q, turn)
            row = by_key.get(row_key(cfg, identity))
            if row is None:
                splits["missing"].append({"id": turn_id(q, turn)})
                continue
            answer, prompt = training_answer(row), row["messages"][1:]
            splits[q["split"] if answer is not None else "dropped"].append(
                {"id": turn_id(q, turn), "query": prompt[-1]["content"], "prompt": prompt, "answer": answer,
                 "key": row["key"], "turn": turn + 1, "identity": identity, "conversation": q["id"],
                 "split": q["split"], "written": row["completion"], "ended": row.get("finish_reason") != "length",
                 "messages": prompt + [{"role": "assistant", "content": answer}], "trained": {len(prompt): True},
                 "keys": [row["key"]]})
    return splits


def whole_conversations(turns: list[dict]) -> list[dict]:
    """One training example per conversation, the loss on every answer the teacher gave in it, so
    a conversation's history is read once, not once per later turn. The history holds the teacher's
    answers as it wrote them, as generate gave them to it, and each is learnt as written, its
    end-of-turn only where the teacher ended it (a cut answer's end-of-turn is the template's). Where
    nothing follows, the last answer is learnt as a single query's is: trimmed to its last full
    sentence and ended, or, with no full sentence to trim to, as written. A query asked alone is its
    turn's example, and a turn answered after logged answers (only the last is the teacher's) too.
    `turns`: a split's rows of load_split, its dropped ones among them."""
    by_conversation: dict[str, list[dict]] = {}
    for r in turns:
        by_conversation.setdefault(r["conversation"], []).append(r)
    examples = []
    for rows in by_conversation.values():
        rows.sort(key=lambda r: r["turn"])
        last = rows[-1]
        if len(rows) == 1:
            if last["answer"] is not None:
                examples.append(last)
            continue
        earlier = [i for i, m in enumerate(last["prompt"]) if m["role"] == "assistant"]
        assert len(earlier) == len(rows) - 1, f"{last['id']}: {len(earlier)} earlier answers for {len(rows)} turns"
        ends_last = last["answer"] is not None
        messages = last["prompt"] + [{"role": "assistant", "content": last["answer"] if ends_last else last["written"]}]
        trained = {i: r["ended"] for i, r in zip(earlier, rows) if last["prompt"][i]["content"].strip()}
        if messages[-1]["content"].strip():
            trained[len(last["prompt"])] = ends_last
        if not trained:
            continue
        examples.append({"id": f"{last['conversation']}#1-{last['turn']}", "conversation": last["conversation"],
                         "messages": messages, "trained": trained, "keys": [r["key"] for r in rows]})
    return examples


def render_all(tokenizer, rows: list[dict], max_len: int) -> tuple[list[Example], int]:
    examples, too_long = [], 0
    for r in rows:
        try:
            ex = render_conversation(tokenizer, r["messages"], r["trained"], r["id"])
        except RenderError as e:
            raise StageError(str(e)) from None
        if len(ex.tokens) > max_len:
            too_long += 1
            continue
        examples.append(ex)
    return examples, too_long


# Fields that only shape a distribution-level objective: a run whose objectives never ask the
# teacher leaves them out of its fingerprint, so runs trained before objectives existed keep theirs.
OBJECTIVE_FIELDS = {"objective", "phases", "topk", "sft_weight", "on_policy"}


def asks_teacher(t: TrainConfig) -> bool:
    return any(registry.load(name).TEACHER for name in t.objectives())


def stage_inputs(cfg: RunConfig, run: RunDir) -> dict:
    data = [(r["key"], r["completion"]) for r in read_jsonl(run.teacher) if r.get("split") in ("train", "val")]
    not_trained_by = {"eval_every", "save_every", "keep_checkpoints"}
    if cfg.train.turn_weights is None:  # so the runs trained before turn weights existed keep their fingerprint
        not_trained_by.add("turn_weights")
    if not asks_teacher(cfg.train) and cfg.train.phases is None:
        not_trained_by |= OBJECTIVE_FIELDS
    inputs = {"data": sha256_text(repr(sorted(data)))[:16], "student_model": cfg.student.model,
              "lora": fingerprint(cfg.lora.model_dump()),
              "train": fingerprint(cfg.train.model_dump(exclude=not_trained_by))}
    if asks_teacher(cfg.train):  # what the teacher's distributions depend on
        inputs["teacher"] = {"system_prompt": sha256_text(cfg.system_prompt)[:16], "model": cfg.teacher.model}
    if cfg.student.backend != "local":  # only then, so the runs trained locally keep their fingerprint
        inputs["student_backend"] = f"{cfg.student.backend}:{cfg.student.served_name}"
    return inputs


def trains_on_turns(objective, cfg: RunConfig) -> bool:
    """Whether an objective learns one answered turn at a time (it samples the student's own answer
    to each), not whole conversations."""
    return hasattr(objective, "on_turns") and objective.on_turns(cfg)


def total_steps(cfg: RunConfig, n_train: int) -> int:
    t = cfg.train
    if t.phases is not None:
        return sum(p.steps for p in t.phases)
    if t.steps is not None:
        return t.steps
    return max(1, math.ceil(t.epochs * n_train / (t.batch_size * t.grad_accum)))


def last_checkpoint(run: RunDir, trainer) -> dict | None:
    rows = [r for r in read_jsonl(run.checkpoints_log, repair=True) if trainer.is_checkpoint(run.root / r["path"])]
    return rows[-1] if rows else None


@contextlib.contextmanager
def ctrl_c_at_step_end() -> Iterator[Callable[[], bool]]:
    """Hold a first Ctrl-C until the current step ends; the loop then saves a checkpoint for
    that step and stops, so no finished step is lost (a step cut in half cannot be saved: its
    adapter, optimiser state and metrics would disagree). A second Ctrl-C stops at once, back
    to the last checkpoint. Yields a function telling whether Ctrl-C was pressed."""
    pressed: list[bool] = []

    def hold(signum, frame) -> None:
        if pressed:
            raise KeyboardInterrupt
        pressed.append(True)
        # os.write, not print: a handler that prints while the loop is printing its progress
        # bar to the same stream fails with a "reentrant call" error.
        with contextlib.suppress(OSError):
            os.write(2, b"\ntrain: Ctrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to stop now)\n")

    if threading.current_thread() is not threading.main_thread():
        yield lambda: False  # signal handlers can only be set in the main thread
        return
    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield lambda: bool(pressed)
    finally:  # (None: the handler was not set from Python and cannot be put back; use Python's)
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def run(cfg: RunConfig, run: RunDir) -> str:
    t = cfg.train
    splits = load_split(cfg, run)
    if splits["missing"]:
        raise StageError(f"{len(splits['missing'])} queries have no teacher answer yet; run `distill generate` first")
    world, main = distributed.world_size(), distributed.is_main()
    if world > 1 and cfg.student.backend != "local":
        raise StageError(f"train: {world} processes: data-parallel training needs student.backend 'local', "
                         f"not {cfg.student.backend!r}; run `distill train` as one process")
    if world > t.batch_size * t.grad_accum:
        raise StageError(f"train: {world} processes cannot share a step of train.batch_size * train.grad_accum = "
                         f"{t.batch_size * t.grad_accum} examples; raise train.batch_size or start fewer processes")
    trainer = make_trainer(cfg.student, cfg.lora, t, cfg.sampling.batch_size)
    print("student sees (no system prompt given): " + repr(student_view(trainer.tokenizer)))
    used = {name: registry.load(name) for name in sorted(t.objectives())}
    whole = {name: whole_conversations(splits[name] + [r for r in splits["dropped"] if r["split"] == name])
             for name in ("train", "val")}
    train, too_long = render_all(trainer.tokenizer, whole["train"], t.max_seq_len)
    val, val_too_long = render_all(trainer.tokenizer, whole["val"], t.max_seq_len)
    on_turns = {name for name, objective in used.items() if trains_on_turns(objective, cfg)}
    if t.turn_weights is not None and on_turns:
        raise StageError(f"train.turn_weights weighs the answers of whole conversations; {', '.join(sorted(on_turns))} "
                         f"learns one sampled turn at a time: leave train.turn_weights out for it")
    turns, _ = render_all(trainer.tokenizer, splits["train"], t.max_seq_len) if on_turns else ([], 0)
    examples = {name: turns if name in on_turns else train for name in used}
    if not all(examples.values()):
        cut = sum(r["split"] == "train" for r in splits["dropped"])
        raise StageError(
            f"no training examples: of the train split's answers in {run.teacher}, {cut} were cut off at "
            f"sampling.max_tokens={cfg.sampling.max_tokens} before a full sentence and {too_long} are longer than "
            f"train.max_seq_len={t.max_seq_len}; raise those (a new sampling.max_tokens needs `distill generate --force`)"
        )
    steps = total_steps(cfg, len(examples[t.objective_at(0)]))
    ctx = StepContext(cfg, run, trainer, rows={r["id"]: r for r in splits["train"] + whole["train"]}, steps=steps,
                      my_examples_at=lambda s: distributed.my_share(step_examples(examples[t.objective_at(s)], s, t)))
    named = asks_teacher(t)  # then each metrics row names its objective
    if named:
        ctx.teacher = teacher.for_training(cfg, trainer, judges_samples=any(o.JUDGES_SAMPLES for o in used.values()))
    for name, objective in used.items():
        if hasattr(objective, "prepare"):
            objective.prepare(ctx, examples[name])
    start = 0
    resume = last_checkpoint(run, trainer)
    if resume is not None:
        trainer.load_state(run.root / resume["path"])
        start = resume["step"]
        print(f"train: resuming from {resume['path']} (step {start} of {steps})")
    distributed.barrier()  # every process has found and loaded the checkpoint before rank 0 edits the logs
    tracker = tracking.start(cfg, run, "train", step=start)
    if main and resume is not None:
        kept = [r for r in read_jsonl(run.metrics, repair=True) if r["step"] <= start]
        atomic_write_text(run.metrics, "".join(json.dumps(r) + "\n" for r in kept))
    if main and resume is None:
        run.metrics.unlink(missing_ok=True)
        run.checkpoints_log.unlink(missing_ok=True)

    with Timer() as timer:
        if start == 0 and val:
            first = validation_loss(trainer, val, t.batch_size)
            if main:
                append_jsonl(run.metrics, [{"step": 0, "val_loss": first}])
                tracker.log(tracking.train_values({"val_loss": first}), 0)
        bar = tqdm(range(start, steps), initial=start, total=steps, desc="train", unit="step", dynamic_ncols=True,
                   disable=not main)
        with ctrl_c_at_step_end() as interrupted:
            for step in bar:
                objective = used[t.objective_at(step)]
                loss = objective.loss(ctx)
                batches, total = step_datums(ctx, objective, step_examples(examples[t.objective_at(step)], step, t), step)
                # Every forward_backward and the optim_step are submitted before any result is
                # read: a remote trainer (Tinker) runs them back to back, with no round trip between.
                pending = [trainer.forward_backward(batch, loss) for batch in batches]
                lr = lr_at(step, steps, t.lr, t.warmup_steps, t.schedule)
                info = trainer.optim_step(lr)
                summed, = distributed.sum_across([sum(p.result().nll_sum for p in pending)])
                row = {"step": step + 1, "lr": lr, "train_loss": summed / total, "grad_norm": info["grad_norm"],
                       "tokens": total, "seconds": round(timer.elapsed, 2),
                       **({"objective": t.objective_at(step)} if named else {})}
                if val and ((step + 1) % t.eval_every == 0 or step + 1 == steps):
                    row["val_loss"] = validation_loss(trainer, val, t.batch_size)
                if main:
                    append_jsonl(run.metrics, [row])
                    tracker.log(tracking.train_values(row), row["step"])
                bar.set_postfix(loss=f"{row['train_loss']:.3f}", **({"val": f"{row['val_loss']:.3f}"} if "val_loss" in row else {}))
                # Read once: a Ctrl-C arriving after this is handled a step later. Summed over
                # processes, so all stop after the same step (or the others would wait forever).
                stop = distributed.sum_across([float(interrupted())])[0] > 0
                if main and (stop or ((step + 1) % t.save_every == 0 and step + 1 < steps)):
                    save_checkpoint(trainer, run, step + 1, t.keep_checkpoints)
                if stop:
                    bar.close()
                    print(f"train: stopped after step {step + 1} of {steps}; its checkpoint is saved", flush=True)
                    raise KeyboardInterrupt
        bar.close()
        if main:
            trainer.save(run.student)
        tracker.close()
    metrics = read_jsonl(run.metrics)
    vals = [r["val_loss"] for r in metrics if "val_loss" in r]
    val_text = f"val loss {vals[0]:.3f} -> {vals[-1]:.3f} (step 0 = untrained)" if vals else "no val split"
    answers = len(splits["train"]) + len(splits["val"]) + sum(r["split"] != "test" for r in splits["dropped"])
    dropped = answers - sum(len(r["trained"]) for r in whole["train"] + whole["val"])
    several = sum(len(r["trained"]) > 1 for r in whole["train"])
    return (f"train: {steps - start} steps on {len(train)} examples ({several} conversations of several answers) in "
            f"{fmt_seconds(timer.seconds)}, {val_text}; {dropped} truncated answers dropped, "
            f"{too_long + val_too_long} over max_seq_len")


def save_checkpoint(trainer, run: RunDir, step: int, keep: int) -> None:
    rel = f"student/checkpoints/step-{step:06d}"
    trainer.save_state(run.root / rel)
    append_jsonl(run.checkpoints_log, [{"step": step, "path": rel}])
    # Older checkpoints are superseded; keep the last `keep` (like save_total_limit).
    for old in sorted(run.checkpoints.glob("step-*"))[:-keep]:
        shutil.rmtree(old)
