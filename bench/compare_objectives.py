"""The objectives compared on one budget: sft, kl, on_policy, jsd and kl then on_policy, trained
on the same teacher answers of a finished run, each evaluated, then one `distill compare` table.

    python bench/compare_objectives.py [--from runs/beethoven] [--budget steps,wall] [--only sft,kl,...]

Every variant gets its own run dir under runs/objectives/, seeded with the source run's
config, queries and teacher answers (so no variant pays for generation again, and all
learn from the very same answers), then `distill train` and `distill eval` as separate
processes, one at a time. Budgets:
  steps  every objective gets the optimiser steps the source run took (else its config's);
  wall   every objective gets as many steps as fit in the sft variant's training seconds,
         at the seconds per step it showed in the steps budget (run steps first).
The table goes to bench/results/objectives-<budget>.md (and its plot beside it).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DISTILL = [sys.executable, "-m", "promptdistill.cli"]
SEEDED = ("config.yaml", "queries.jsonl", "queries_stats.json", "teacher.jsonl")


def variants(steps: int) -> dict[str, list[str]]:
    """--set overrides per objective at `steps` optimiser steps."""
    first = max(1, round(steps * 2 / 3))
    budget = ["train.epochs=null", f"train.steps={steps}"]
    return {
        "sft": ["train.objective=sft", *budget],
        "kl": ["train.objective=kl", *budget],
        "on_policy": ["train.objective=on_policy", *budget],
        # the stored alternatives of the two: top-256 soft labels scored once (plus the rest of the
        # vocabulary as one bin), and the student's answers of 8 steps sampled in one decode
        "kl_top256": ["train.objective=kl", "train.topk=256", *budget],
        "on_policy_ahead8": ["train.objective=on_policy", "train.on_policy.sample_ahead=8", *budget],
        # GKD's generalised JSD between the two KLs (beta 0.5), on the teacher's answers and on the student's own
        "jsd": ["train.objective=jsd", "train.jsd.beta=0.5", *budget],
        "jsd_on_policy": ["train.objective=jsd", "train.jsd.beta=0.5", "train.jsd.on_policy=true", *budget],
        "kl_then_on_policy": ["train.epochs=null", "train.steps=null",
                              f"train.phases=[{{objective: kl, steps: {first}}}, "
                              f"{{objective: on_policy, steps: {max(1, steps - first)}}}]"],
    }


def seed_run(source: Path, dest: Path) -> None:
    """A run dir holding the source's queries and teacher answers, its manifest cut to those
    two stages (so they count as done), and any soft-label targets already computed."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in SEEDED:
        if (source / name).exists():
            shutil.copy2(source / name, dest / name)
    manifest = json.loads((source / "manifest.json").read_text())
    manifest["stages"] = {k: v for k, v in manifest.get("stages", {}).items() if k in ("queries", "generate")}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if (source / "teacher_topk").exists() and not (dest / "teacher_topk").exists():
        shutil.copytree(source / "teacher_topk", dest / "teacher_topk")


def step_rows(run: Path) -> list[dict]:
    """metrics.jsonl's optimiser-step rows (the step-0 validation row has no lr); [] when absent."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [m for m in (json.loads(line) for line in path.read_text().splitlines() if line.strip()) if "lr" in m]


def run_variant(source: Path, dest: Path, overrides: list[str]) -> dict:
    if not (dest / "summary.json").exists():
        seed_run(source, dest)
        sets = [a for o in overrides for a in ("--set", o)]
        for verb in ("train", "eval"):
            started = time.perf_counter()
            subprocess.run(DISTILL + [verb, str(dest), *sets], check=True, cwd=ROOT)
            print(f"objectives: {dest.name} {verb} in {time.perf_counter() - started:.0f} s", flush=True)
            if verb == "train":  # with model loading and any soft labels scored before the first step
                (dest / "train_wall_s").write_text(f"{time.perf_counter() - started:.1f}\n")
    steps = step_rows(dest)
    wall = dest / "train_wall_s"
    return {"dir": dest, "steps": len(steps), "train_seconds": steps[-1]["seconds"] if steps else None,
            "seconds_per_step": steps[-1]["seconds"] / len(steps) if steps else None,
            "train_wall": float(wall.read_text()) if wall.exists() else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="source", default="runs/beethoven", help="a run dir with teacher answers")
    ap.add_argument("--budget", default="steps,wall", help="steps, wall, or both")
    ap.add_argument("--only", default=None, help="comma list of variants (default: all)")
    ap.add_argument("--tag", default="", help="report name suffix: bench/results/objectives-<budget>-<tag>.md")
    ap.add_argument("--out", default=str(ROOT / "runs" / "objectives"))
    args = ap.parse_args()
    source, out = (ROOT / args.source).resolve(), Path(args.out).resolve()
    if not (source / "teacher.jsonl").exists():
        sys.exit(f"{source}: no teacher.jsonl; run `distill run examples/beethoven/config.yaml` (or `make demo`) first")
    config = (source / "config.yaml").read_text()
    import yaml

    train = yaml.safe_load(config)["train"]
    ran = step_rows(source)  # the steps the source run took (its truncated answers are not trained)
    if ran:
        steps = ran[-1]["step"]
    else:
        n_train = sum(json.loads(line)["split"] == "train" for line in (source / "queries.jsonl").read_text().splitlines())
        steps = train.get("steps") or math.ceil(train["epochs"] * n_train / (train["batch_size"] * train.get("grad_accum", 1)))
    chosen = args.only.split(",") if args.only else list(variants(steps))
    results = {}
    for budget in args.budget.split(","):
        dirs = []
        for name in chosen:
            if budget == "steps":
                overrides = variants(steps)[name]
            else:  # as many steps as fit in sft's training seconds, at this objective's own pace
                sft, mine = results[("steps", "sft")], results[("steps", name)]
                fit = max(1, int(sft["train_seconds"] / mine["seconds_per_step"]))
                overrides = variants(fit)[name]
            results[(budget, name)] = run_variant(source, out / f"{budget}-{name}", overrides)
            dirs.append(str(results[(budget, name)]["dir"]))
            if (name == "kl" and not (source / "teacher_topk").exists()  # top-k targets: computed once, reused
                    and (out / f"{budget}-{name}" / "teacher_topk").exists()):  # (kl over the whole vocabulary stores none)
                shutil.copytree(out / f"{budget}-{name}" / "teacher_topk", source / "teacher_topk")
        report = BENCH / "results" / f"objectives-{budget}{'-' + args.tag if args.tag else ''}.md"
        subprocess.run(DISTILL + ["compare", *dirs, "--out", str(report)], check=True, cwd=ROOT)
        print(f"objectives: {budget} budget table in {report}", flush=True)
        for name in chosen:
            r = results[(budget, name)]
            print(f"  {name}: {r['steps']} steps, {r['train_seconds']:.0f} s of training, "
                  f"{r['seconds_per_step']:.2f} s/step"
                  + (f", train stage {r['train_wall']:.0f} s wall" if r.get("train_wall") else ""), flush=True)


if __name__ == "__main__":
    main()
