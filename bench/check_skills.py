"""Independent check of eval's kept skills (summary.json's `kept_skills`) from a run dir's
skills.jsonl alone: every stored answer is re-checked against its question's patterns here
(plain `re`, case-insensitive; the product's scorer is not imported), and each answerer's
accuracy, student - base and their 95% CIs (percentile bootstrap of the questions, the
config's eval.bootstrap resamples, numpy seed 0) are recomputed, overall and per category,
and set beside the summary's.

    python bench/check_skills.py runs/beethoven

Exit 1 when a figure or a stored verdict disagrees."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import yaml

WHO = ("base", "student", "teacher")


def bootstrap(values: np.ndarray, n_boot: int) -> tuple[float, float, float]:
    idx = np.random.default_rng(0).integers(0, len(values), size=(n_boot, len(values)))
    lo, hi = np.quantile(values[idx].mean(axis=1), [0.025, 0.975])
    return float(values.mean()), float(lo), float(hi)


def main(run_dir: Path) -> int:
    rows = [json.loads(line) for line in (run_dir / "skills.jsonl").read_text(encoding="utf-8").splitlines() if line]
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))["kept_skills"]
    n_boot = (yaml.safe_load((run_dir / "config.yaml").read_text()).get("eval") or {}).get("bootstrap", 2000)
    correct = {who: np.array([any(re.search(p, r[who]["text"], re.IGNORECASE) for p in r["answers"]) for r in rows],
                             dtype=float) for who in WHO}
    stored_mismatch = sum(bool(correct[who][i]) != r[who]["correct"] for who in WHO for i, r in enumerate(rows))
    print(f"{len(rows)} questions; stored verdicts that the patterns do not reproduce: {stored_mismatch}")
    categories = np.array([r["category"] for r in rows])
    bad = stored_mismatch
    print(f"{'group':<12} {'n':>4}  " + "  ".join(f"{w:>24}" for w in (*WHO, "student - base")))
    for group in ["all", *sorted(set(categories))]:
        mask = np.ones(len(rows), bool) if group == "all" else categories == group
        stored = summary if group == "all" else summary["per_category"][group]
        figures = {who: bootstrap(correct[who][mask], n_boot) for who in WHO}
        figures["student - base"] = bootstrap(correct["student"][mask] - correct["base"][mask], n_boot)
        theirs = {who: (stored[who]["accuracy"], *stored[who]["ci95"]) for who in WHO}
        theirs["student - base"] = (stored["student_minus_base"]["mean"], *stored["student_minus_base"]["ci95"])
        cells = []
        for name, (m, lo, hi) in figures.items():
            same = np.allclose((m, lo, hi), theirs[name], atol=1e-9)
            bad += not same
            sign = "+" if name == "student - base" else ""
            mark = "" if same else " !"
            cells.append(f"{m:{sign}.1%} [{lo:{sign}.1%}, {hi:{sign}.1%}]{mark}".rjust(24))
        print(f"{group:<12} {int(mask.sum()):>4}  " + "  ".join(cells))
    print("all figures agree with summary.json" if not bad else f"DISAGREE: {bad} figures or verdicts differ (marked !)")
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1])))
