"""Training on conversations: one example per answered turn (each re-reading its history) against
one example per conversation (the loss on all its answers), same run dir, same objective, same
process, interleaved.

For each form it builds the train split's examples as `distill train` builds them (per turn:
load_split's rows, the form before conversations were whole; per conversation: whole_conversations),
then times optimiser steps of the run's objective from the same adapter, in rounds that alternate
the forms (so a change in the machine's load falls on both), and reports per form: examples and
tokens per epoch, steps per epoch at its batch size, the median seconds per step, and so the
seconds per epoch. The weights move between rounds; a step's cost does not depend on them.

    python bench/conversation_steps.py examples/beethoven/chats.yaml runs/beethoven-chats-whole \
        --turn-batch 8 --conversation-batch 3 --rounds 3 --steps 3
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
from promptdistill.stages.train import (load_split, lr_at, render_all, step_datums, step_examples,
                                        whole_conversations)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("run_dir")
    ap.add_argument("--turn-batch", type=int, default=8)
    ap.add_argument("--conversation-batch", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="steps per form per round")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()

    cfg = load_config(args.config, [f"run_dir={args.run_dir}"])
    run = RunDir(Path(cfg.run_dir))
    splits = load_split(cfg, run)
    t = cfg.train
    trainer = make_trainer(cfg.student, cfg.lora, t, cfg.sampling.batch_size)
    turns, _ = render_all(trainer.tokenizer, splits["train"], t.max_seq_len)
    whole_rows = whole_conversations(splits["train"] + [r for r in splits["dropped"] if r["split"] == "train"])
    whole, _ = render_all(trainer.tokenizer, whole_rows, t.max_seq_len)
    objective = registry.load(t.objective)
    ctx = StepContext(cfg, run, trainer, rows={r["id"]: r for r in splits["train"] + whole_rows}, steps=10**6)
    if objective.TEACHER:
        ctx.teacher = teacher.for_training(cfg, trainer, judges_samples=objective.JUDGES_SAMPLES)
    forms = {"per turn": (turns, args.turn_batch), "per conversation": (whole, args.conversation_batch)}
    for examples, _ in forms.values():
        if hasattr(objective, "prepare"):
            objective.prepare(ctx, examples)
    seconds: dict[str, list[float]] = {name: [] for name in forms}
    padded: dict[str, list[int]] = {name: [] for name in forms}
    step_of = {name: 0 for name in forms}
    loss = objective.loss(ctx)
    for r in range(args.rounds):
        for name, (examples, batch) in forms.items():
            tc = t.model_copy(update={"batch_size": batch, "grad_accum": 1})
            for _ in range(args.steps):
                step = step_of[name]
                chosen = step_examples(examples, step, tc)
                started = time.perf_counter()
                batches, _ = step_datums(ctx, objective, chosen, step)
                pending = [trainer.forward_backward(b, loss) for b in batches]
                trainer.optim_step(lr_at(step, 100, t.lr, 0, "constant"))
                [p.result() for p in pending]
                seconds[name].append(time.perf_counter() - started)
                padded[name].append(len(chosen) * max(len(e.tokens) for e in chosen))
                step_of[name] += 1
            print(f"round {r + 1}: {name}: {statistics.median(seconds[name][-args.steps:]):.2f} s/step", flush=True)

    out = {}
    for name, (examples, batch) in forms.items():
        per_step = statistics.median(seconds[name])
        steps_per_epoch = len(examples) / batch
        out[name] = {"examples": len(examples), "batch": batch, "tokens_per_epoch": sum(len(e.tokens) for e in examples),
                     "trained_tokens_per_epoch": sum(e.n_trainable for e in examples),
                     "padded_tokens_per_step_mean": statistics.mean(padded[name]),
                     "steps_per_epoch": round(steps_per_epoch, 1), "seconds_per_step_median": round(per_step, 2),
                     "seconds_per_step": [round(s, 2) for s in seconds[name]],
                     "seconds_per_epoch": round(per_step * steps_per_epoch, 1)}
    a, b = out["per turn"], out["per conversation"]
    print(f"\n{'form':<18}{'examples':>9}{'batch':>6}{'tokens/epoch':>13}{'trained/epoch':>14}{'s/step':>8}"
          f"{'steps/epoch':>12}{'s/epoch':>9}")
    for name, o in out.items():
        print(f"{name:<18}{o['examples']:>9}{o['batch']:>6}{o['tokens_per_epoch']:>13}{o['trained_tokens_per_epoch']:>14}"
              f"{o['seconds_per_step_median']:>8}{o['steps_per_epoch']:>12}{o['seconds_per_epoch']:>9}")
    print(f"per conversation / per turn, seconds per epoch: {b['seconds_per_epoch'] / a['seconds_per_epoch']:.2f}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
