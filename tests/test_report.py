"""stages/report.py: report.md and its four plots from a finished run's files; no model
is loaded, so a hand-written run dir stands in for a real one."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from promptdistill.config import ModelConfig, Price, PricingConfig, QueriesConfig, RunConfig, TrainConfig
from promptdistill.rundir import RunDir, StageError
from promptdistill.stages import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VERDICT = ("The distillation worked: without the prompt, the student is clearly closer to the prompted teacher than "
           "the base model on every score (quality retained: similarity 62%, likelihood 71%, persona 80%); it reads "
           "93% fewer input tokens per query.")


def score(base, student, ceiling, retained, lo, hi, n=6, can_tell=True):
    """One quality score as eval writes it; the paired differences' CIs 0.02 either side."""
    return {"base": {"mean": base, "ci95": [base - 0.05, base + 0.05]},
            "student": {"mean": student, "ci95": [student - 0.05, student + 0.05]},
            "ceiling": {"mean": ceiling, "ci95": [ceiling - 0.05, ceiling + 0.05]},
            "student_minus_base": {"mean": student - base, "ci95": [student - base - 0.02, student - base + 0.02]},
            "ceiling_minus_base": {"mean": ceiling - base, "ci95": [ceiling - base - 0.02, ceiling - base + 0.02]},
            "retained": {"mean": retained, "ci95": [lo, hi]}, "n": n, "can_tell": can_tell, "won": True}


# Prices: teacher 2.00 in / 8.00 out, student 0.50 in / 1.00 out per 1M tokens. Per 1M
# queries: teacher 600*2 + 50*8 = 1600, student 40*0.5 + 48*1 = 68, saving 95.75%.
# One-time 10 + 2.5 = 12.5; saving per query (1600 - 68) / 1e6 -> break-even 8159.3 queries.
SUMMARY = {
    "run": "tiny", "n_test": 6,
    "models": {"teacher": "teacher-model", "student": "student-model"},
    "quality": {
        "similarity": score(0.40, 0.60, 0.72, 0.62, 0.41, 0.83),
        "likelihood": score(2.50, 1.80, 1.51, 0.71, 0.55, 0.88),
        "persona": dict(score(0.0, 0.8, 1.0, 0.80, 0.5, 1.0),
                        classifier={"heldout_accuracy": 0.9, "heldout_n": 24, "train_n": 96}),
    },
    "tokens": {"teacher_input": 600, "student_input": 40, "teacher_output": 50, "student_output": 48,
               "input_reduction_pct": 93.33333333333333, "total_reduction_pct": 86.46153846153847,
               "student_truncated": 1, "teacher_truncated": 0},
    "latency": {"teacher": {"ttft_ms_median": 850.0, "total_ms_median": 2400.0, "queries": 6},
                "student": {"ttft_ms_median": 120.0, "total_ms_median": 1600.0, "queries": 6},
                "ttft_ratio": 120 / 850, "total_ratio": 1600 / 2400},
    "cost": {"currency": "USD", "source": "https://prices.example/llm", "date": "2025-01-31",
             "per_1m_queries": {"teacher": 1600.0, "student": 68.0},
             "saving_pct": 95.75,
             "one_time": {"generation": 10.0, "training": 2.5, "total": 12.5, "trained_tokens": 1250000},
             "break_even_queries": 12.5 / ((1600 - 68) / 1e6)},
    "training": {"steps": 3, "val_loss_untrained": 2.8, "val_loss_final": 2.1, "train_examples": 80,
                 "dropped_truncated": 4},
    "verdict": VERDICT,
}

# Student similarity per row; sorted best first: q3 .9, q1 .8, q6 .7, q2 .6, q5 .5, q4 .4.
SIMS = {"q1": 0.8, "q2": 0.6, "q3": 0.9, "q4": 0.4, "q5": 0.5, "q6": 0.7}


def eval_rows() -> list[dict]:
    return [{"id": i, "query": f"Question {i}?", "teacher": f"Teacher says {i} | with a pipe\nand a second line",
             "teacher_again": f"Again {i}", "student": f"Student says {i}", "base": f"Base says {i}",
             "similarity": {"teacher_again": 0.7, "student": s, "base": 0.3},
             "persona_prob": {"teacher_again": 0.9, "student": 0.8, "base": 0.1},
             "nll": {"student": 1.8, "base": 2.5, "base_with_prompt": 1.5}} for i, s in SIMS.items()]


def config(root: Path, pricing: bool = True) -> RunConfig:
    prices = PricingConfig(source="https://prices.example/llm", date="2025-01-31",
                           teacher=Price(input_per_1m=2.0, output_per_1m=8.0),
                           student=Price(input_per_1m=0.5, output_per_1m=1.0), training_per_1m_tokens=2.0)
    return RunConfig(name="tiny", run_dir=str(root), system_prompt="You are Beethoven.",
                     teacher=ModelConfig(model="teacher-model"), student=ModelConfig(model="student-model"),
                     queries=QueriesConfig(files=["queries.jsonl"]), train=TrainConfig(steps=3),
                     pricing=prices if pricing else None)


def make_run(root: Path, summary: dict | None = SUMMARY, metrics: list[dict] | None = None) -> tuple[RunConfig, RunDir]:
    root.mkdir(parents=True, exist_ok=True)
    cfg = config(root, pricing=bool(summary and summary.get("cost")))
    (root / "config.yaml").write_text(cfg.to_yaml())
    if summary is not None:
        (root / "summary.json").write_text(json.dumps(summary, indent=2))  # NaN is written as NaN, like eval does
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_rows()))
    if metrics is None:
        metrics = [{"step": 0, "val_loss": 2.8}] + [
            {"step": s, "lr": 1e-4, "train_loss": 2.6 - 0.2 * s, "grad_norm": 1.0, "tokens": 100, "seconds": 1.5 * s}
            for s in (1, 2, 3)]
        metrics[-1]["val_loss"] = 2.1
    (root / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    stages = {name: {"inputs": {}, "started": "2025-01-31T10:00:00+00:00", "finished": "2025-01-31T10:01:00+00:00",
                     "seconds": secs, "seconds_total": secs, "summary": f"{name}: done", "outputs": {}}
              for name, secs in (("queries", 0.1), ("generate", 42.0), ("train", 75.5), ("eval", 130.0))}
    (root / "manifest.json").write_text(json.dumps({"stages": stages}))
    return cfg, RunDir(root)


def render(tmp_path: Path, summary: dict | None = SUMMARY, **kw) -> tuple[str, str]:
    cfg, run = make_run(tmp_path / "run", summary, **kw)
    line = report.run(cfg, run)
    return line, (run.root / "report.md").read_text(encoding="utf-8")


def first_para(md: str) -> str:
    return md.split("\n\n")[1]


def section(md: str, title: str) -> str:
    return md.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def assert_pngs(root: Path) -> None:
    for name in report.PLOTS:
        data = (root / name).read_bytes()
        assert data[:8] == PNG_MAGIC, name
        assert len(data) > 1024, name


def test_report_of_a_finished_run(tmp_path):
    line, md = render(tmp_path)
    root = tmp_path / "run"
    assert line.startswith(f"report: {root / 'report.md'} + 4 plots")
    assert md.startswith("# Distillation report: tiny\n")

    para = first_para(md)
    assert para.startswith(VERDICT)
    for text in ("62% on similarity (95% CI 41% to 83%)", "71% on likelihood (95% CI 55% to 88%)",
                 "80% on persona (95% CI 50% to 100%)", "from 600", "to 40", "93.3% fewer",
                 "95.8% less per query", "12.50 USD", "8,160 queries", "850 ms for the teacher vs 120 ms for the student"):
        assert text in para, text

    quality = section(md, "Quality")
    assert ("| similarity | higher = closer | 0.400 [0.350, 0.450] | 0.600 [0.550, 0.650] | 0.720 [0.670, 0.770] "
            "| 0.200 [0.180, 0.220] | 0.320 [0.300, 0.340] | 62% [41%, 83%] | 6 | won |") in quality
    assert "| likelihood | lower = closer |" in quality
    assert "classifier held-out accuracy 90% on 24 answers (trained on 96)" in quality
    assert "(student - base) / (ceiling - base)" in quality
    assert "**can tell** when the CI of ceiling - base excludes 0" in quality

    tokens = section(md, "Tokens")
    assert "| Input tokens | 600 | 40 | -93.3% |" in tokens
    assert "| Input + output | 650 | 88 | -86.5% |" in tokens
    assert "| Answers cut off at max_tokens | 0 of 6 | 1 of 6 |  |" in tokens

    cost = section(md, "Cost")
    assert "| Per 1M queries | 1,600 USD | 68.00 USD |" in cost
    assert "| Saving per query |  | 95.8% |" in cost
    assert "| One-time total | 12.50 USD |  |" in cost
    assert "| Break-even |  | after 8,160 queries |" in cost
    assert "1,250,000 trained tokens" in cost
    assert "https://prices.example/llm, read on 2025-01-31" in cost

    latency = section(md, "Latency")
    assert "| Time to first token | 850 ms | 120 ms | 0.14x (86% faster) |" in latency
    assert "| Total time | 2.40 s | 1.60 s | 0.67x (33% faster) |" in latency

    training = section(md, "Training")
    assert "| Optimiser steps | 3 |" in training
    assert "2.800 → 2.100 (-25.0%)" in training
    assert "| Training examples | 80 |" in training

    timings = section(md, "Stage timings")
    assert "| train | 1m15s | train: done |" in timings
    assert "| total | 4m07s |  |" in timings

    examples = section(md, "Example answers")
    assert len(re.findall(r"^### Example \d of 5", examples, flags=re.M)) == 5
    for name in report.PLOTS:
        assert f"]({name})" in md
    assert_pngs(root)


def test_examples_spread_over_student_similarity_and_keep_answers_readable(tmp_path):
    picked = report.pick_examples(eval_rows())
    assert [(label, r["id"]) for label, r in picked] == [
        ("best", "q3"), ("upper quartile", "q1"), ("median", "q2"), ("lower quartile", "q5"), ("worst", "q4")]
    assert report.pick_examples(list(reversed(eval_rows()))) == picked  # order-independent
    _, md = render(tmp_path)
    examples = section(md, "Example answers")
    assert "q6" not in examples
    assert "> Teacher says q3 | with a pipe\n> and a second line" in examples  # every line stays in the quote
    assert report.cell("a | b\nc") == "a \\| b c"


def test_run_without_pricing_says_how_to_add_it(tmp_path):
    line, md = render(tmp_path, dict(SUMMARY, cost=None))
    assert "+ 4 plots" in line
    assert "no cost figures because the config has no pricing section" in first_para(md)
    cost = section(md, "Cost")
    assert "no pricing section in the config" in cost
    assert "distill eval" in cost and "examples/pricing.md" in cost
    snippet = cost.split("```yaml\n", 1)[1].split("```", 1)[0]
    PricingConfig.model_validate(yaml.safe_load(snippet)["pricing"])  # the snippet is a valid pricing section
    assert "cost: n/a (no pricing section in the config)" in report.headline(dict(SUMMARY, cost=None))
    assert_pngs(tmp_path / "run")


def test_nan_and_missing_numbers_print_na(tmp_path):
    summary = copy.deepcopy(SUMMARY)
    summary["quality"]["similarity"]["retained"] = {"mean": float("nan"), "ci95": [float("nan"), float("nan")]}
    summary["cost"]["break_even_queries"] = None
    summary["latency"]["student"]["ttft_ms_median"] = None
    summary["latency"]["ttft_ratio"] = None
    summary["training"].update(val_loss_untrained=None, val_loss_final=None)
    metrics = [{"step": s, "lr": 1e-4, "train_loss": 2.0, "grad_norm": 1.0, "tokens": 10, "seconds": s} for s in (1, 2)]
    _, md = render(tmp_path, summary, metrics=metrics)  # no val split: no val_loss anywhere
    assert not re.search(r"\bnan\b", md, flags=re.I)
    assert "n/a on similarity (95% CI n/a to n/a)" in first_para(md)
    assert "| similarity |" in md and "| n/a [n/a, n/a] |" in section(md, "Quality")
    assert "| Break-even |  | never (the student is not cheaper per query) |" in section(md, "Cost")
    assert "| Time to first token | 850 ms | n/a | n/a |" in section(md, "Latency")
    assert "n/a (no validation split)" in section(md, "Training")
    assert_pngs(tmp_path / "run")


def test_a_ci_that_misses_its_point_estimate_still_plots(tmp_path):
    # A ratio's percentile bootstrap CI can lie wholly on one side of the ratio of means when
    # the base's score is near the ceiling; CI met one such run on a tiny model.
    summary = copy.deepcopy(SUMMARY)
    summary["quality"]["likelihood"]["retained"] = {"mean": 0.30, "ci95": [0.45, 0.90]}
    _, md = render(tmp_path, summary)
    assert "30% [45%, 90%]" in section(md, "Quality")
    assert_pngs(tmp_path / "run")


def test_missing_summary_asks_for_eval(tmp_path):
    cfg, run = make_run(tmp_path / "run", summary=None)
    with pytest.raises(StageError, match=r"summary\.json.*run `distill eval` first"):
        report.run(cfg, run)
    assert not (run.root / "report.md").exists()


def test_first_paragraph_and_headline_for_the_cli():
    para = report.first_paragraph(SUMMARY)
    assert para.startswith(VERDICT) and "\n" not in para
    lines = report.headline(SUMMARY)
    assert all(isinstance(s, str) and "\n" not in s for s in lines) and 3 <= len(lines) <= 6
    text = "\n".join(lines)
    assert "similarity 62% [41%, 83%]" in text
    assert "600 -> 40 (-93.3%)" in text
    assert "1,600 USD -> 68.00 USD" in text and "break-even after 8,160 queries" in text
    assert "850 ms -> 120 ms (0.14x)" in text


def test_a_score_that_cannot_tell_shows_its_values_never_a_ratio(tmp_path):
    # The demo's compliance: the ceiling within noise of the base, so its ratio is all noise.
    summary = copy.deepcopy(SUMMARY)
    summary["quality"]["compliance"] = score(0.699, 0.731, 0.753, 4.0, -9.0, 8.0, can_tell=False)
    summary["quality"]["compliance"]["won"] = False
    _, md = render(tmp_path, summary)
    for text in (first_para(md), "\n".join(report.headline(summary)), section(md, "Headline")):
        assert "compliance (student 0.731, base 0.699, ceiling 0.753)" in text
        assert "400%" not in text and "-900%" not in text and "on compliance" not in text
    assert "similarity 62% [41%, 83%]" in "\n".join(report.headline(summary))
    quality = section(md, "Quality")
    assert "| 0.032 [0.012, 0.052] | 0.054 [0.034, 0.074] | cannot tell | 6 | **cannot tell on this run** |" in quality
    assert "400%" not in quality
    assert_pngs(tmp_path / "run")


def test_a_summary_from_before_the_paired_rule_still_reports(tmp_path):
    # Old run dirs have no paired differences and no won: their ratios show as they did, n/a for the rest.
    summary = copy.deepcopy(SUMMARY)
    for q in summary["quality"].values():
        for key in ("student_minus_base", "ceiling_minus_base", "can_tell", "won"):
            del q[key]
    _, md = render(tmp_path, summary)
    assert "62% on similarity (95% CI 41% to 83%)" in first_para(md)
    assert "| 0.720 [0.670, 0.770] | n/a [n/a, n/a] | n/a [n/a, n/a] | 62% [41%, 83%] | 6 | n/a |" in section(md, "Quality")
    assert_pngs(tmp_path / "run")
