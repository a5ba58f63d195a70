"""Two students scored on the same test answers, compared turn by turn: numpy only, no promptdistill.

Both run dirs' eval.jsonl must hold the same test answers (the same teacher answers to the same
turns, as when one student's adapter is evaluated in a copy of the other's run dir). For each turn
(1, 2, 3+) and each KL score of eval.jsonl (fidelity_kl: on the teacher's answers; on_policy_kl:
on each model's own; and own_history from eval_conversations.jsonl: each model carrying the
conversation itself, its own earlier answers as the history), retained = 1 - mean KL(student) / mean KL(base) for each student, and the
difference A - B with a 95% CI from a bootstrap over whole conversations (the turns of one
conversation are not independent), the same resamples for both students.

    python bench/paired_students.py runs/beethoven-chats runs/beethoven-chats-single-student
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

TURNS = (("1", lambda t: t == 1), ("2", lambda t: t == 2), ("3+", lambda t: t >= 3))


def eval_rows(run: Path) -> dict[str, dict]:
    with open(run / "eval.jsonl", encoding="utf-8") as f:
        return {r["id"]: r for r in map(json.loads, f)}


def own_history_rows(run: Path) -> dict[str, dict]:
    """eval_conversations.jsonl as eval.jsonl-like rows: one per (conversation, turn), with the
    student's and the base's KL on their own answers after their own histories."""
    out: dict[str, dict] = {}
    with open(run / "eval_conversations.jsonl", encoding="utf-8") as f:
        for r in map(json.loads, f):
            row = out.setdefault(f"{r['conversation']}#{r['turn']}", {"conversation": r["conversation"], "turn": r["turn"],
                                                                       "own_history_kl": {}})
            row["own_history_kl"][r["who"]] = r["reverse_kl"]
    return out


def retained(student: np.ndarray, base: np.ndarray) -> float:
    return float(1 - student.mean() / base.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--resamples", type=int, default=4000)
    args = ap.parse_args()
    ra, rb = eval_rows(args.a), eval_rows(args.b)
    if ra.keys() != rb.keys() or any(ra[i]["teacher"] != rb[i]["teacher"] for i in ra):
        raise SystemExit("the two eval.jsonl files do not hold the same test answers: nothing to pair")
    print(f"A = {args.a.name}, B = {args.b.name}; retained = 1 - KL(student)/KL(base) per turn; "
          f"A - B with a 95% CI over {args.resamples} resamples of whole conversations")
    oa, ob = own_history_rows(args.a), own_history_rows(args.b)
    if oa.keys() != ob.keys():
        raise SystemExit("the two eval_conversations.jsonl files do not hold the same conversations and turns")
    for field, ra, rb in (("fidelity_kl", ra, rb), ("on_policy_kl", ra, rb), ("own_history_kl", oa, ob)):
        for label, at in TURNS:
            ids = sorted(i for i in ra if at(ra[i]["turn"]))
            sa, ba, sb, bb = (np.array([rows[i][field][who] for i in ids])
                              for rows, who in ((ra, "student"), (ra, "base"), (rb, "student"), (rb, "base")))
            conversation = np.array([ra[i]["conversation"] for i in ids])
            members = [np.flatnonzero(conversation == c) for c in sorted(set(conversation))]
            rng = np.random.default_rng(0)
            diffs = []
            for _ in range(args.resamples):
                pick = np.concatenate([members[j] for j in rng.integers(0, len(members), len(members))])
                diffs.append(retained(sa[pick], ba[pick]) - retained(sb[pick], bb[pick]))
            lo, hi = np.quantile(diffs, [0.025, 0.975])
            print(f"{field:14s} turn {label:2s} n={len(ids):2d}  A {retained(sa, ba):.0%}  B {retained(sb, bb):.0%}  "
                  f"A - B {retained(sa, ba) - retained(sb, bb):+.0%} [{lo:+.0%}, {hi:+.0%}]")


if __name__ == "__main__":
    main()
