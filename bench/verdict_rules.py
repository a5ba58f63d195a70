"""A finished run's verdict under the old, unpaired rule and the paired rule, side by side.

Reads the run dir only (eval.jsonl, eval_conversations.jsonl, summary.json, config.yaml), no
model. Each score's per-query values are rebuilt from eval.jsonl as eval computed them (fidelity
and on-policy KLs, NLLs, similarities, persona probabilities >= 0.5, compliance re-checked on
the answer texts with the config's rules; own-history KLs from eval_conversations.jsonl), then:

- old rule (eval before the paired rule): can tell when the ceiling's own 95% CI does not
  overlap the base's; won when the student's own CI lies wholly on the ceiling's side of the base's;
- paired rule (scores.summarise): can tell when the 95% CI of the per-query differences
  ceiling - base excludes 0; won when that of student - base excludes 0 on the ceiling's side.

The old rule is applied to the CIs summary.json recorded; the rebuilt means and CIs are set
beside them first (max abs difference), so the paired figures are of the same data. The two
verdict sentences come from the same wording (promptdistill.verdict) fed each rule's flags.

    python bench/verdict_rules.py /work/main/runs/beethoven-chats [--summary-out new_summary.json]
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np

from promptdistill import rules, scores
from promptdistill.config_file import load_config
from promptdistill.rundir import read_jsonl
from promptdistill.verdict import verdict


def column(rows: list[dict], field: str, who: str) -> np.ndarray:
    return np.array([np.nan if (r.get(field) or {}).get(who) is None else r[field][who] for r in rows], dtype=float)


def per_query(run: Path) -> tuple[dict[str, tuple], np.ndarray | None]:
    """{score: ((student, base, ceiling) per query, groups)} as eval built them."""
    rows = read_jsonl(run / "eval.jsonl")
    groups = (np.array([r["conversation"] for r in rows]) if any(r.get("turn", 1) > 1 for r in rows) else None)
    zero = np.zeros(len(rows))
    out = {}
    if rows[0].get("fidelity_kl"):
        out["fidelity"] = ((column(rows, "fidelity_kl", "student"), column(rows, "fidelity_kl", "base"), zero), groups)
    if rows[0].get("on_policy_kl"):
        out["on_policy_fidelity"] = ((column(rows, "on_policy_kl", "student"), column(rows, "on_policy_kl", "base"), zero),
                                     groups)
    own = read_jsonl(run / "eval_conversations.jsonl") if (run / "eval_conversations.jsonl").is_file() else []
    if own:
        by = {who: [r for r in own if r["who"] == who] for who in ("student", "base")}
        kl = {who: np.array([r["reverse_kl"] for r in rs], dtype=float) for who, rs in by.items()}
        out["own_history_fidelity"] = ((kl["student"], kl["base"], np.zeros(len(kl["student"]))),
                                       np.array([r["conversation"] for r in by["student"]]))
    out["likelihood"] = ((column(rows, "nll", "student"), column(rows, "nll", "base"), column(rows, "nll", "base_with_prompt")),
                         groups)
    out["similarity"] = ((column(rows, "similarity", "student"), column(rows, "similarity", "base"),
                          column(rows, "similarity", "teacher_again")), groups)
    if rows[0].get("persona_prob"):
        out["persona"] = (tuple((column(rows, "persona_prob", who) >= 0.5).astype(float)
                                for who in ("student", "base", "teacher_again")), groups)
    cfg = load_config(run)
    if cfg.checks.rules:
        queries = [r["query"] for r in rows]
        m = {who: rules.pass_matrix(cfg.checks.rules, queries, [r[who] for r in rows]) for who in ("student", "base", "teacher")}
        out["compliance"] = (tuple(rules.per_query_compliance(m[who]) for who in ("student", "base", "teacher")), groups)
    return out, cfg.eval.bootstrap


def old_flags(q: dict) -> dict:
    """The unpaired rule eval used before, on one score's recorded CIs."""
    (bl, bh), (cl, ch), (sl, sh) = q["base"]["ci95"], q["ceiling"]["ci95"], q["student"]["ci95"]
    can_tell = None not in (bl, bh, cl, ch) and (ch < bl or cl > bh)
    return {"can_tell": bool(can_tell), "won": bool(sl > bh if q["ceiling"]["mean"] >= q["base"]["mean"] else sh < bl)}


def ci(d: dict) -> str:
    return f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--summary-out", type=Path, help="write the run's summary.json with the paired figures and verdict here")
    args = ap.parse_args()
    summary = json.loads((args.run / "summary.json").read_text())
    data, n_boot = per_query(args.run)
    old, new = copy.deepcopy(summary), copy.deepcopy(summary)
    print(f"{args.run}: {summary['n_test']} test answers, {n_boot} resamples\n")
    print("| score | n | rebuilt vs recorded (max abs diff of means, CI ends) | old: can tell / won | "
          "paired: can tell / won | student - base (paired) | ceiling - base (paired) |")
    print("|---|---|---|---|---|---|---|")
    for name, recorded in summary["quality"].items():
        arrays, groups = data[name]
        fresh = scores.summarise(*arrays, n_boot, groups=groups)
        gap = max(abs(fresh[w]["mean"] - recorded[w]["mean"]) for w in ("student", "base", "ceiling"))
        gap_ci = max(abs(a - b) for w in ("student", "base", "ceiling") for a, b in zip(fresh[w]["ci95"], recorded[w]["ci95"]))
        old["quality"][name].update(old_flags(recorded))
        new["quality"][name] = {**recorded, **{k: v for k, v in fresh.items() if k != "per_turn"}}
        o, p = old["quality"][name], new["quality"][name]
        print(f"| {name} | {fresh['n']} | {gap:.2g}, {gap_ci:.2g} | {'yes' if o['can_tell'] else 'no'} / "
              f"{'yes' if o['won'] else 'no'} | {'yes' if p['can_tell'] else 'no'} / {'yes' if p['won'] else 'no'} | "
              f"{ci(p['student_minus_base'])} | {ci(p['ceiling_minus_base'])} |")
    print(f"\nrecorded verdict: {summary['verdict']}")
    print(f"\nold rule:    {verdict(old)}")
    new["verdict"] = verdict(new)
    print(f"\npaired rule: {new['verdict']}")
    if args.summary_out:
        args.summary_out.write_text(json.dumps(new, indent=2))
        print(f"\nwrote {args.summary_out}")


if __name__ == "__main__":
    main()
