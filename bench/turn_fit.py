"""Fit or generalisation? Per turn, fidelity on answers the student was TRAINED on beside the same
score on the test answers.

Scores, as bench/check_turns.py does (plain transformers + peft, its helpers), the forward KL
(teacher WITH the prompt || model WITHOUT it) per token of the teacher's answer after the teacher's
conversation, for the student and the base, on the first `--conversations` train conversations of a
finished run; then prints per turn (1, 2, 3+) the mean KLs and retained = 1 - KL(student) / KL(base)
on those train answers, beside eval's summary.json on the test answers. A turn whose train figure
is far better than its test figure is short of generalisation (more or other data); one whose
train figure is no better is short of fit (what and how the loss learns).

    python bench/turn_fit.py runs/beethoven-convs [--conversations 32]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parent))
from check_turns import answer_kl, load_run  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--conversations", type=int, default=32, help="train conversations scored (the first in queries.jsonl)")
    p.add_argument("--out", default=None, help="write the figures as JSON here too")
    args = p.parse_args()
    run = Path(args.run_dir)
    config, tokenizer, model = load_run(run)
    train = [q["id"] for q in map(json.loads, (run / "queries.jsonl").read_text().splitlines())
             if q["split"] == "train"][: args.conversations]
    teacher_rows = [json.loads(line) for line in (run / "teacher.jsonl").read_text().splitlines()]
    picked = [r for r in teacher_rows if r.get("conversation", r["id"]) in set(train)]
    kl: dict[int, dict[str, list[float]]] = {}
    for t in picked:
        kls = answer_kl(model, tokenizer, config["system_prompt"], t)
        for who, value in (kls or {}).items():
            kl.setdefault(min(t.get("turn", 1), 3), {}).setdefault(who, []).append(value)
    per_turn = json.loads((run / "summary.json").read_text())["quality"]["fidelity"].get("per_turn", {})
    out = {}
    for turn in sorted(kl):
        label = "3+" if turn == 3 else str(turn)
        s, b = (sum(kl[turn][w]) / len(kl[turn][w]) for w in ("student", "base"))
        test = per_turn.get(label, {})
        out[label] = {"train": {"n": len(kl[turn]["student"]), "student": s, "base": b, "retained": 1 - s / b},
                      "test": {"n": test.get("n"), "student": test.get("student", {}).get("mean"),
                               "base": test.get("base", {}).get("mean"), "retained": test.get("retained", {}).get("mean")}}
        te = out[label]["test"]
        print(f"turn {label}: train {len(kl[turn]['student'])} answers: KL student {s:.4f}, base {b:.4f}, retained "
              f"{1 - s / b:.1%} | test {te['n']} answers: student {te['student']:.4f}, base {te['base']:.4f}, "
              f"retained {te['retained']:.1%}")
    if args.out:
        Path(args.out).write_text(json.dumps({"run": str(run), "conversations": len(train), "per_turn": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
