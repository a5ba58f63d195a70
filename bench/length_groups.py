"""Micro-batches by length: a training step whose examples mix single answers with whole
conversations, run as one padded micro-batch against the same examples cut by `length_groups`
at several costs per micro-batch. Same run dir, objective, process and steps; the variants take
turns within every step (their order rotating), so a change in the machine's load falls on all.

For each variant it reports the median seconds per step, the padded tokens per step (what the
micro-batches compute) and the micro-batches per step; and, from the one-micro-batch variant's
own calls, a least-squares fit of a forward-backward's seconds against its padded tokens, whose
intercept over slope is what one more micro-batch costs in padded tokens (MICRO_BATCH_COST).

    python bench/length_groups.py runs/beethoven-mixed/config.yaml runs/beethoven-mixed --steps 8
    python bench/length_groups.py runs/beethoven/config.yaml runs/beethoven --steps 12 --costs 160 --only-cut
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from promptdistill import registry, teacher
from promptdistill.backends import make_trainer
from promptdistill.config_file import load_config
from promptdistill.objectives.step import StepContext
from promptdistill.rundir import RunDir
from promptdistill.stages import train as train_stage

ONE = 10**9  # a cost no cut can pay: one micro-batch of the whole step (the loop before length_groups)


def timed_step(ctx, objective, loss, examples, step, cost, calls):
    """One optimiser step of `examples` grouped at `cost`; appends (padded tokens, seconds) per micro-batch."""
    groups = train_stage.length_groups(examples, ctx.cfg.train.batch_size, cost)
    started = time.perf_counter()
    total = sum(e.n_trainable for e in examples)
    for group in groups:
        t0 = time.perf_counter()
        datums = [d.scaled(1.0 / total) for d in objective.datums(ctx, group, step)]
        ctx.trainer.forward_backward(datums, loss).result()
        calls.append((len(group) * max(len(e.tokens) for e in group), time.perf_counter() - t0))
    ctx.trainer.optim_step(1e-5)
    return time.perf_counter() - started, sum(len(g) * max(len(e.tokens) for e in g) for g in groups), len(groups)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("run_dir")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--costs", default="0,64,256", help="costs per micro-batch, in padded tokens, to compare")
    ap.add_argument("--only-cut", action="store_true",
                    help="time only steps that train.MICRO_BATCH_COST cuts (the first --steps of them)")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()

    cfg = load_config(args.config, [f"run_dir={args.run_dir}"])
    run = RunDir(Path(cfg.run_dir))
    t = cfg.train
    splits = train_stage.load_split(cfg, run)
    trainer = make_trainer(cfg.student, cfg.lora, t, cfg.sampling.batch_size)
    rows = train_stage.whole_conversations(splits["train"] + [r for r in splits["dropped"] if r["split"] == "train"])
    examples, _ = train_stage.render_all(trainer.tokenizer, rows, t.max_seq_len)
    objective = registry.load(t.objective)
    ctx = StepContext(cfg, run, trainer, rows={r["id"]: r for r in splits["train"] + rows}, steps=10**6)
    if objective.TEACHER:
        ctx.teacher = teacher.for_training(cfg, trainer, judges_samples=objective.JUDGES_SAMPLES)
    if hasattr(objective, "prepare"):
        objective.prepare(ctx, examples)
    loss = objective.loss(ctx)

    variants = {"one micro-batch": ONE, **{f"cost {c}": int(c) for c in args.costs.split(",")}}
    seconds = {v: [] for v in variants}
    padded = {v: [] for v in variants}
    groups = {v: [] for v in variants}
    calls = {v: [] for v in variants}
    names = list(variants)
    timed_step(ctx, objective, loss, train_stage.step_examples(examples, 0, t), 0, ONE, [])  # warm-up, not counted
    steps = range(train_stage.total_steps(cfg, len(examples)))
    if args.only_cut:
        steps = [s for s in steps if len(train_stage.length_groups(train_stage.step_examples(examples, s, t), t.batch_size)) > 1]
    for step in steps[:args.steps]:
        chosen = train_stage.step_examples(examples, step, t)
        for name in names[step % len(names):] + names[:step % len(names)]:
            s, p, g = timed_step(ctx, objective, loss, chosen, step, variants[name], calls[name])
            seconds[name].append(s), padded[name].append(p), groups[name].append(g)
        print(f"step {step + 1}: " + ", ".join(f"{n} {seconds[n][-1]:.1f}s" for n in names), flush=True)

    xs, ys = zip(*calls["one micro-batch"], *[c for n in names[1:] for c in calls[n]])
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    intercept = my - slope * mx
    out = {"steps": [int(s) for s in steps[:args.steps]], "batch_size": t.batch_size, "objective": t.objective,
           "fit": {"seconds_per_padded_token": slope, "seconds_per_micro_batch": intercept,
                   "micro_batch_cost_in_tokens": intercept / slope, "calls": len(xs)},
           "variants": {n: {"cost": variants[n], "seconds_per_step_median": round(statistics.median(seconds[n]), 2),
                            "seconds_per_step": [round(s, 2) for s in seconds[n]],
                            "padded_tokens_per_step_mean": statistics.mean(padded[n]),
                            "micro_batches_per_step_mean": statistics.mean(groups[n])} for n in names}}
    base = out["variants"]["one micro-batch"]["seconds_per_step_median"]
    print(f"\n{'variant':<18}{'s/step':>8}{'vs one':>8}{'padded/step':>13}{'micro/step':>11}")
    for n, o in out["variants"].items():
        print(f"{n:<18}{o['seconds_per_step_median']:>8}{o['seconds_per_step_median'] / base:>8.2f}"
              f"{o['padded_tokens_per_step_mean']:>13.0f}{o['micro_batches_per_step_mean']:>11.2f}")
    f = out["fit"]
    print(f"fit over {f['calls']} micro-batches: {f['seconds_per_micro_batch']:.3f} s + {f['seconds_per_padded_token'] * 1000:.2f} ms "
          f"per padded token, so one more micro-batch costs {f['micro_batch_cost_in_tokens']:.0f} padded tokens")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
