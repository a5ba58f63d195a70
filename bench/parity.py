"""Training parity: the same runs on two trees, per-step losses and adapters compared.

A restructuring of the training core must not change what it computes. `record` trains a
fixed set of runs (sft, kl over the whole vocabulary, kl top-k, on_policy, a phases schedule)
from fixed teacher answers and stores each run's metrics.jsonl and adapter; run it once with
the old tree on PYTHONPATH and once with the new, then `compare` the two stores.

    PYTHONPATH=/path/to/old python bench/parity.py record --model tiny --out /tmp/parity/old
    python bench/parity.py record --model tiny --out /tmp/parity/new
    python bench/parity.py compare /tmp/parity/old /tmp/parity/new

--model tiny: the pirate tiny model of tests/tiny.py (built once at --work, so both trees read
the same files) and its hand-written answers. --model demo: the embedded SmolLM2 on the demo's
config and the teacher answers of a finished demo run (--from runs/beethoven), 10 steps each.
Only the config, run_stage and RunDir are used, so any tree since the objectives landed runs it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "You are a pirate. Talk like one."

RUNS = {  # name -> train section overrides
    "sft": {"objective": "sft"},
    "kl_whole": {"objective": "kl", "topk": None},
    "kl_topk": {"objective": "kl", "topk": 8},
    "on_policy": {"objective": "on_policy"},
    "phases": {"phases": [{"objective": "sft", "steps": 2}, {"objective": "kl", "steps": 2},
                          {"objective": "on_policy", "steps": 2}], "topk": None},
}


def tiny_config(work: Path) -> tuple[dict, Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import QUESTIONS, save_pirate_tiny

    model = work / "model"
    if not (model / "config.json").exists():
        save_pirate_tiny(model, SYSTEM)
    queries = [{"id": f"q{i:02d}", "query": QUESTIONS[i]} for i in range(16)]
    (work / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    config = {"system_prompt": SYSTEM, "teacher": {"model": str(model)}, "student": {"model": str(model)},
              "queries": {"files": [str(work / "q.jsonl")], "train": 0.5, "val": 0.25, "test": 0.25},
              "sampling": {"max_tokens": 8, "batch_size": 6},
              "train": {"steps": 6, "batch_size": 4, "eval_every": 3, "lr": 1e-2,
                        "on_policy": {"max_tokens": 8}}}
    return config, model


def demo_config(source: Path) -> dict:
    config = yaml.safe_load((ROOT / "examples/beethoven/config.yaml").read_text())
    config["system_prompt_file"] = str(ROOT / "examples/beethoven" / config["system_prompt_file"])
    config["queries"]["files"] = [str(ROOT / "examples/beethoven" / f) for f in config["queries"]["files"]]
    config["train"] = {k: v for k, v in config["train"].items() if k != "epochs"} | {"steps": 10}
    config.pop("tracking", None)
    return config


def record(args) -> None:
    try:
        from promptdistill.config_file import load_config
    except ImportError:  # a tree from before config_file.py
        from promptdistill.config import load_config
    from promptdistill.pipeline import run_stage
    from promptdistill.rundir import RunDir, append_jsonl

    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    base = tiny_config(work)[0] if args.model == "tiny" else demo_config(Path(args.source))
    for name in args.only or RUNS:
        root = work / args.model / name
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        train = base["train"] | RUNS[name]
        if "phases" in train:
            train.pop("steps")
            if args.model == "demo":
                train["phases"] = [{"objective": o, "steps": s} for o, s in (("sft", 3), ("kl", 4), ("on_policy", 3))]
        config = base | {"name": name, "run_dir": str(root / "run"), "train": train}
        (root / "config.yaml").write_text(yaml.safe_dump(config))
        cfg = load_config(root / "config.yaml")
        run = RunDir(cfg.run_path)
        run.root.mkdir(parents=True, exist_ok=True)
        if args.model == "tiny":
            run_stage(cfg, "queries")
            answers(cfg, run, append_jsonl)
        else:  # the finished demo's queries and teacher answers, as they are
            for f in ("queries.jsonl", "teacher.jsonl"):
                shutil.copy(Path(args.source) / f, run.root / f)
        run_stage(cfg, "train")
        dest = out / name
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(run.metrics, dest / "metrics.jsonl")
        shutil.copy(run.student / "adapter_model.safetensors", dest / "adapter_model.safetensors")
        print(f"parity: {name} recorded in {dest}", flush=True)


def answers(cfg, run, append_jsonl) -> None:
    """The tiny run's teacher answers: the pirate lines, by hand (no generation)."""
    from tiny import PIRATE

    try:
        from promptdistill.teacher import teacher_messages
    except ImportError:  # a tree from before teacher.py
        from promptdistill.answerers import teacher_messages
    from promptdistill.stages.generate import row_key

    rows = []
    for i, q in enumerate(json.loads(line) for line in run.queries.read_text().splitlines()):
        rows.append({"id": q["id"], "key": row_key(cfg, q["query"]), "split": q["split"], "model": cfg.teacher.model,
                     "messages": teacher_messages(cfg, q["query"]), "completion": PIRATE[i % len(PIRATE)],
                     "finish_reason": "stop", "tokens": {"prompt": 40, "completion": 9}})
    append_jsonl(run.teacher, rows)


def compare(args) -> int:
    from safetensors.torch import load_file

    old, new, worst = Path(args.old), Path(args.new), 0
    for run in sorted(p.name for p in old.iterdir() if p.is_dir()):
        a = [json.loads(line) for line in (old / run / "metrics.jsonl").read_text().splitlines()]
        b = [json.loads(line) for line in (new / run / "metrics.jsonl").read_text().splitlines()]
        losses = [(x[key], y[key]) for x, y in zip(a, b, strict=True) for key in ("train_loss", "val_loss") if key in x]
        loss_rel = max(abs(x - y) / max(abs(x), 1e-12) for x, y in losses)
        ta, tb = (load_file(str(d / run / "adapter_model.safetensors")) for d in (old, new))
        assert ta.keys() == tb.keys(), f"{run}: the adapters hold different tensors"
        adapter = max(float((ta[k] - tb[k]).abs().max()) for k in ta)
        scale = max(float(ta[k].abs().max()) for k in ta)
        ok = loss_rel <= 1e-6 and adapter <= 1e-6
        worst |= not ok
        print(f"{run:10s} {len(losses):3d} losses, max relative difference {loss_rel:.2e}; "
              f"adapter max |difference| {adapter:.2e} (largest |weight| {scale:.2e})  {'ok' if ok else 'DIFFERS'}")
    return worst


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="verb", required=True)
    r = sub.add_parser("record")
    r.add_argument("--model", choices=("tiny", "demo"), default="tiny")
    r.add_argument("--source", default=str(ROOT / "runs/beethoven"), help="demo: a finished demo run dir")
    r.add_argument("--work", default="/tmp/promptdistill-parity", help="where the runs are trained (fixed: the "
                   "tiny model's files and the runs' paths are the same for both trees)")
    r.add_argument("--out", required=True)
    r.add_argument("--only", nargs="*", choices=list(RUNS))
    c = sub.add_parser("compare")
    c.add_argument("old")
    c.add_argument("new")
    args = p.parse_args()
    return record(args) if args.verb == "record" else compare(args)


if __name__ == "__main__":
    sys.exit(main() or 0)
