"""Independent check of eval's label agreement (summary.json's `quality.label_agreement` and
`labels`) from a run dir's eval.jsonl and teacher.jsonl: every answer's label is parsed here
again (plain `re` on the config's checks.labels pattern, the last match; the product's parser is
not imported), the teacher's from its teacher.jsonl row, and each answerer's agreement with it,
its parse failures, student - base, ceiling - base and retained, with their 95% CIs (percentile
bootstrap of the test inputs, the config's eval.bootstrap resamples, numpy seed 0, the same
resamples for every figure), are recomputed and set beside the summary's; then agreement where the
teacher's label is not its commonest (what copying its bias cannot win). When the config's
queries files carry each input's true label (`--truth-field`, default `label`), it also prints
each answerer's accuracy against it: an extra line, not the score.

    python bench/check_labels.py runs/langid

Exit 1 when a figure disagrees."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import yaml

WHO = ("teacher_again", "student", "base")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def parse(text: str, pattern: str, allowed: list[str], case_sensitive: bool) -> tuple[str | None, str | None]:
    """(label, None) or (None, "no_match" | "not_allowed"): the last match's group."""
    found = re.findall(pattern, text, 0 if case_sensitive else re.IGNORECASE)
    if not found:
        return None, "no_match"
    label = found[-1].strip() if case_sensitive else found[-1].strip().lower()
    ok = allowed if case_sensitive else [a.lower() for a in allowed]
    return (label, None) if label in ok else (None, "not_allowed")


def resampled(n_boot: int, *arrays: np.ndarray) -> list[np.ndarray]:
    idx = np.random.default_rng(0).integers(0, arrays[0].size, size=(n_boot, arrays[0].size))
    return [a[idx].mean(axis=1) for a in arrays]


def ci(values: np.ndarray, n_boot: int) -> tuple[float, float, float]:
    lo, hi = np.quantile(resampled(n_boot, values)[0], [0.025, 0.975])
    return float(values.mean()), float(lo), float(hi)


def retained(s: np.ndarray, b: np.ndarray, c: np.ndarray, n_boot: int) -> tuple[float, float, float]:
    """(student - base) / (ceiling - base) of the means, and its CI over the resamples whose
    ceiling and base differ; nan where there is no ratio."""
    value = (s.mean() - b.mean()) / (c.mean() - b.mean()) if c.mean() != b.mean() else np.nan
    sm, bm, cm = resampled(n_boot, s, b, c)
    ok = cm != bm
    if not ok.any():
        return float(value), float("nan"), float("nan")
    lo, hi = np.quantile((sm[ok] - bm[ok]) / (cm[ok] - bm[ok]), [0.025, 0.975])
    return float(value), float(lo), float(hi)


def truth(config: dict, field: str) -> dict[str, str]:
    """Each query id's true label, from the config's queries files where their rows carry `field`."""
    out = {}
    for name in (config.get("queries") or {}).get("files", []):
        path = Path(name)
        if path.suffix == ".jsonl" and path.is_file():
            out |= {str(r["id"]): r[field] for r in read_jsonl(path) if field in r and "id" in r}
    return out


def main(run_dir: Path, truth_field: str) -> int:
    config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    check = config["checks"]["labels"]
    pattern, allowed, case = check["pattern"], check["allowed"], check.get("case_sensitive", False)
    n_boot = (config.get("eval") or {}).get("bootstrap", 2000)
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    rows = read_jsonl(run_dir / "eval.jsonl")
    teacher_rows = {r["id"]: r for r in read_jsonl(run_dir / "teacher.jsonl")}
    # the teacher's answer as generate recorded it, not eval.jsonl's copy
    parsed = {"teacher": [parse(teacher_rows[r["id"]]["completion"], pattern, allowed, case) for r in rows]}
    parsed |= {who: [parse(r[who], pattern, allowed, case) for r in rows] for who in WHO}
    teacher = [p[0] for p in parsed["teacher"]]
    keep = np.array([t is not None for t in teacher])
    agree = {who: np.array([p[0] == t for p, t in zip(parsed[who], teacher)], dtype=float)[keep] for who in WHO}

    print(f"{run_dir}: {len(rows)} test inputs, the teacher labelled {int(keep.sum())}; pattern {pattern!r}")
    bad = 0
    theirs = summary["labels"]["answerers"]
    print(f"{'answerer':<14} {'labelled':>8} {'no match':>9} {'not allowed':>12}   summary.json")
    for who in ("teacher", *WHO):
        mine = (sum(p[0] is not None for p in parsed[who]), sum(p[1] == "no_match" for p in parsed[who]),
                sum(p[1] == "not_allowed" for p in parsed[who]))
        stored = (theirs[who]["labelled"], theirs[who]["parse_failures"]["no_match"], theirs[who]["parse_failures"]["not_allowed"])
        bad += mine != stored
        print(f"{who:<14} {mine[0]:>8} {mine[1]:>9} {mine[2]:>12}   {stored}" + ("" if mine == stored else " !"))

    q = summary["quality"]["label_agreement"]
    s, b, c = agree["student"], agree["base"], agree["teacher_again"]
    figures = {"student": ("student", ci(s, n_boot)), "base": ("base", ci(b, n_boot)),
               "ceiling (teacher again)": ("ceiling", ci(c, n_boot)),
               "student - base": ("student_minus_base", ci(s - b, n_boot)),
               "ceiling - base": ("ceiling_minus_base", ci(c - b, n_boot)),
               "retained": ("retained", retained(s, b, c, n_boot))}
    print(f"\nlabel agreement with the teacher, n={int(keep.sum())} (summary.json: n={q['n']})")
    bad += int(keep.sum()) != q["n"]
    for name, (key, (m, lo, hi)) in figures.items():
        stored = tuple(np.nan if x is None else x for x in (q[key]["mean"], *q[key]["ci95"]))  # null: no ratio
        same = np.allclose((m, lo, hi), stored, atol=1e-9, equal_nan=True)
        bad += not same
        print(f"  {name:<24} {m:7.1%} [{lo:7.1%}, {hi:7.1%}]   summary.json {stored[0]:7.1%} "
              f"[{stored[1]:7.1%}, {stored[2]:7.1%}]" + ("" if same else " !"))

    # Agreement where the teacher gave other than its commonest label: a student that learnt the
    # format and the teacher's bias alone agrees on none of these, one that learnt its judgement does.
    commonest = Counter(t for t in teacher if t is not None).most_common(1)
    rare = np.array([t is not None and t != commonest[0][0] for t in teacher])[keep] if commonest else keep[:0]
    if rare.any():
        print(f"\nagreement where the teacher's label is not its commonest ({commonest[0][0]}), n={int(rare.sum())} "
              "(not the score):")
        for who in WHO:
            m, lo, hi = ci(agree[who][rare], n_boot)
            print(f"  {who:<14} {m:6.1%} [{lo:6.1%}, {hi:6.1%}]")

    truths = truth(config, truth_field)
    if truths and all(r["id"] in truths for r in rows):
        print(f"\naccuracy against the queries' `{truth_field}` (not the score; parse failures count as wrong):")
        for who in ("teacher", *WHO):
            right = np.array([p[0] == truths[r["id"]] for p, r in zip(parsed[who], rows)], dtype=float)
            m, lo, hi = ci(right, n_boot)
            print(f"  {who:<14} {m:6.1%} [{lo:6.1%}, {hi:6.1%}]")
    print("\nall figures agree with summary.json" if not bad else f"\nDISAGREE: {bad} figures differ (marked !)")
    return 1 if bad else 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--truth-field", default="label", help="the queries files' field holding each input's true label")
    args = ap.parse_args()
    sys.exit(main(args.run_dir, args.truth_field))
