"""Stage 5, report: turn a finished run into something a person can read.

Reads summary.json, eval.jsonl, metrics.jsonl and manifest.json from the run dir (no
model is loaded, no torch imported) and writes report.md beside them: a first paragraph
that says in plain words whether the distillation worked, then tables for quality,
tokens, cost, latency, training and stage timings, five side-by-side example answers,
and four small PNG plots (loss, quality, tokens_cost, latency).

`first_paragraph(summary)` and `headline(summary)` (in report_words.py) are what the CLI
prints at the end of `distill run`. Missing or NaN numbers print as "n/a"; a run without a
pricing section gets a note on how to add one instead of a cost table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..config import RunConfig
from ..formatting import (NA, cell, count, duration_ms, finite, lookup, money, num, pct, pct_ci, pct_points,
                          ratio, table, tok)
from ..rundir import RunDir, StageError, Timer, atomic_write_text, fmt_seconds, read_jsonl, sha256_file
from .report_plots import PLOTS, TURNS_PLOT, write_plots
from .report_quality import compliance_section, labels_section, quality_section, skills_section
from .report_words import first_paragraph, headline, streamed

# summary.json's `sources`: what each names, in the report's words.
SOURCES = {"teacher": "Teacher", "teacher_answers": "Teacher's answers (the reference)",
           "teacher_again": "Teacher again", "fidelity": "Fidelity", "on_policy_fidelity": "On-policy fidelity",
           "likelihood": "Likelihood", "teacher_tokens": "Teacher's token counts", "teacher_latency": "Teacher's latency",
           "student": "Student and base (answers, scores, tokens, latency)"}

PRICING_EXAMPLE = """\
pricing:   # example numbers: use your provider's, with source and date (see examples/pricing.md)
  source: "https://your-provider.example/pricing"
  date: "2026-01-31"
  currency: USD
  teacher: {input_per_1m: 0.63, output_per_1m: 1.54}   # per 1M tokens, the prompted teacher
  student: {input_per_1m: 0.63, output_per_1m: 1.54}   # per 1M tokens, the distilled student
  training_per_1m_tokens: 1.54                         # one-time, per 1M trained tokens"""


# --------------------------------------------------------------------------- examples


def quote(text) -> list[str]:
    """An answer as a markdown blockquote, every line kept."""
    text = (text or "").replace("\r", "").strip()
    if not text:
        return ["> *(empty answer)*"]
    return [f"> {line}" if line.strip() else ">" for line in text.split("\n")]


def pick_examples(rows: list[dict], k: int = 5) -> list[tuple[str, dict]]:
    """Up to k rows spread over the student's similarity to the teacher: best, upper
    quartile, median, lower quartile, worst (deterministic: ties broken by id)."""
    def sim(r):
        s = lookup(r, "similarity", "student")
        return s if finite(s) else -math.inf

    ranked = sorted(rows, key=lambda r: (-sim(r), str(r.get("id", ""))))
    n = len(ranked)
    if n == 0:
        return []
    if n <= k:
        return [(f"rank {i + 1} of {n} by similarity", r) for i, r in enumerate(ranked)]
    labels = ["best", "upper quartile", "median", "lower quartile", "worst"] if k == 5 else [None] * k
    out, used = [], set()
    for j in range(k):
        i = int(j * (n - 1) / (k - 1) + 0.5)
        while i in used:
            i += 1
        used.add(i)
        out.append((labels[j] or f"rank {i + 1} of {n}", ranked[i]))
    return out


def example_blocks(rows: list[dict]) -> list[str]:
    picked = pick_examples(rows)
    out = []
    for j, (label, r) in enumerate(picked, 1):
        sims = r.get("similarity") or {}
        query = " ".join(str(r.get("query", "")).split())
        out += [f"### Example {j} of {len(picked)}: {label} (student similarity {num(sims.get('student'), '.2f')}) · `{r.get('id', '?')}`",
                "", f"**Query:** {query}", "",
                "**Teacher** (with the system prompt):", *quote(r.get("teacher")), "",
                f"**Student** (no prompt; similarity to teacher {num(sims.get('student'), '.2f')}):", *quote(r.get("student")), "",
                f"**Base** (no prompt, no adapter; similarity {num(sims.get('base'), '.2f')}):", *quote(r.get("base")), ""]
        worst = r.get("divergent_tokens")
        if worst:
            out += ["Where the student's next-token distribution strays furthest from the prompted teacher's on the "
                    "teacher's answer (KL per token; the answer's text before it, then the teacher's token):", ""]
            out += table(["KL", "Before", "Teacher's token"],
                         [[num(w.get("kl")), f"`…{cell(w.get('before', '')).strip()}`", f"`{cell(w.get('token', ''))}`"]
                          for w in worst])
            out += [""]
    return out


# --------------------------------------------------------------------------- markdown


def build_markdown(summary: dict, rows: list[dict], metrics: list[dict], manifest: dict,
                   cfg: RunConfig | None = None, plots: list[str] = PLOTS) -> str:
    models = summary.get("models") or {}
    n = summary.get("n_test", NA)
    md = [f"# Distillation report: {summary.get('run', '?')}", "", first_paragraph(summary), "",
          f"Teacher `{models.get('teacher', '?')}` answers WITH the system prompt; student `{models.get('student', '?')}` "
          f"+ LoRA adapter answers WITHOUT it; base = the student model with no adapter and no prompt. "
          f"All scores are on {n} held-out test queries.", ""]
    md += [f"- Note: {note}" for note in summary.get("notes") or []] + ([""] if summary.get("notes") else [])
    md += sources_section(summary)

    md += ["## Headline", ""]
    pairs = [line.split(": ", 1) for line in headline(summary)]
    md += table(["What", "Value"], [[what[:1].upper() + what[1:], value] for what, value in pairs])
    md += [""]

    md += quality_section(summary, "quality.png" in plots)
    md += compliance_section(summary) + labels_section(summary) + skills_section(summary) + judge_section(summary)
    md += tokens_section(summary, "tokens_cost.png" in plots)
    md += cost_section(summary, cfg)
    md += latency_section(summary, "latency.png" in plots)
    md += training_section(summary, metrics, "loss.png" in plots)
    md += timings_section(manifest)
    md += ["## Example answers", ""]
    if len(rows) > 5:
        md += [f"Five of the {len(rows)} test queries, spread over how close the student's answer is to the teacher's "
               "(best, upper quartile, median, lower quartile and worst by semantic similarity), each answered by the "
               "teacher (with the prompt), the student and the base model (both without it).", ""]
    elif rows:
        md += [f"All {len(rows)} test queries, from the student's best to its worst by semantic similarity to the teacher, "
               "each answered by the teacher (with the prompt), the student and the base model (both without it).", ""]
    md += example_blocks(rows) or ["No per-query rows in eval.jsonl.", ""]
    if plots:
        md += ["## Plots", ""] + [f"- [{p}]({p})" for p in plots] + [""]
    else:
        md += ["## Plots", "", "No plots: matplotlib is not installed (`pip install matplotlib`, then re-run `distill report`).", ""]
    return "\n".join(md).rstrip() + "\n"


def sources_section(summary: dict) -> list[str]:
    """Where each figure came from: the teacher's weights here, or its endpoint."""
    found = summary.get("sources")
    if not found:
        return []
    return (["## Where the numbers come from", ""]
            + table(["Figure", "From"], [[SOURCES.get(k, k), v] for k, v in found.items()]) + [""])


def judge_section(summary: dict) -> list[str]:
    j = summary.get("judge")
    if not j:
        return []
    md = ["## LLM judge", "",
          f"`{j['model']}` compared each test answer with the teacher's, in a random order and again swapped "
          f"(rubric: {j['rubric']}). Win-or-tie = share of parsed verdicts where the answer was judged at least as "
          "faithful to the system prompt as the teacher's; self-agreement = share of queries whose two orders gave "
          "the same verdict.", ""]
    rows = [[who, pct_ci(r["win_or_tie"]), f"{r['win']}/{r['tie']}/{r['loss']}", f"{r['unparsed']} of {r['asks']}",
             f"{pct(r['self_agreement'])} of {r['self_agreement_n']}", pct(r["chose_position_a"])]
            for who, r in j.items() if isinstance(r, dict)]
    return md + table(["Answer", "Win or tie vs teacher", "Win/tie/loss", "Unparsed", "Self-agreement",
                       "Chose position A"], rows) + [""]


def tokens_section(summary: dict, plot: bool) -> list[str]:
    t = summary.get("tokens") or {}
    n = summary.get("n_test", NA)

    def change(a, b):
        return f"{100 * (b / a - 1):+.1f}%" if finite(a) and finite(b) and a else NA

    ti, si, to, so = (t.get(k) for k in ("teacher_input", "student_input", "teacher_output", "student_output"))
    tt = ti + to if finite(ti) and finite(to) else None
    st = si + so if finite(si) and finite(so) else None
    md = ["## Tokens", "", "Mean tokens per test query, counted with the real tokenizers (input includes the chat template).", ""]
    md += table(["Per query", "Teacher (with prompt)", "Student (no prompt)", "Change"], [
        ["Input tokens", tok(ti), tok(si), f"-{pct_points(t.get('input_reduction_pct'))}" if finite(t.get("input_reduction_pct")) else NA],
        ["Output tokens", tok(to), tok(so), change(to, so)],
        ["Input + output", tok(tt), tok(st), f"-{pct_points(t.get('total_reduction_pct'))}" if finite(t.get("total_reduction_pct")) else NA],
        ["Answers cut off at max_tokens", f"{t.get('teacher_truncated', NA)} of {n}", f"{t.get('student_truncated', NA)} of {n}", ""],
    ])
    md += [""]
    if plot:
        md += ["![Tokens per query, and cost per 1M queries](tokens_cost.png)", ""]
    return md


def cost_section(summary: dict, cfg: RunConfig | None) -> list[str]:
    cost = summary.get("cost")
    md = ["## Cost", ""]
    if not cost:
        return md + ["No cost figures: there is no pricing section in the config. To add one, put a `pricing` section "
                     "like this in the run's config.yaml (with your provider's real prices) and re-run "
                     "`distill eval RUN_DIR --force`:", "", "```yaml", PRICING_EXAMPLE, "```", ""]
    cur = cost.get("currency", "")
    per = cost.get("per_1m_queries") or {}
    one = cost.get("one_time") or {}
    be = cost.get("break_even_queries")
    trained = one.get("trained_tokens")
    md += table(["", "Teacher (with prompt)", "Student (no prompt)"], [
        ["Per 1M queries", money(per.get("teacher"), cur), money(per.get("student"), cur)],
        ["Saving per query", "", pct_points(cost.get("saving_pct"))],
        ["One-time: generating the teacher's answers", money(one.get("generation"), cur), ""],
        [f"One-time: training ({f'{trained:,}' if finite(trained) else NA} trained tokens)", "", money(one.get("training"), cur)],
        ["One-time total", money(one.get("total"), cur), ""],
        ["Break-even", "", f"after {count(be)} queries" if finite(be) else "never (the student is not cheaper per query)"],
    ])
    md += ["", f"Prices: {cost.get('source') or NA}, read on {cost.get('date') or NA} ({cur})."]
    p = cfg.pricing if cfg is not None else None
    if p is not None:
        md[-1] += (f" Teacher {p.teacher.input_per_1m:g} in / {p.teacher.output_per_1m:g} out, student "
                   f"{p.student.input_per_1m:g} in / {p.student.output_per_1m:g} out per 1M tokens; training "
                   f"{p.training_per_1m_tokens:g} per 1M trained tokens.")
    md += ["Break-even = one-time total / saving per query: after that many queries the student has paid for itself.", ""]
    return md


def latency_section(summary: dict, plot: bool) -> list[str]:
    lat = summary.get("latency") or {}
    q = lookup(lat, "teacher", "queries")
    md = ["## Latency", "",
          f"Median per query, measured during `distill eval` ({q if q is not None else NA} test queries, one at a time, "
          "greedy decoding, each paying its own prefill), "
          + ("the teacher's over streaming from its endpoint (to its first text chunk and its end, as this client sees "
             "them: the network and the server's load included), the student's on this machine. "
             if streamed(summary) else "on this machine. ")
          + "Small samples on a busy machine are noisy.", ""]
    md += table(["Median per query", "Teacher (with prompt)", "Student (no prompt)", "Student / teacher"], [
        ["Time to first token", duration_ms(lookup(lat, "teacher", "ttft_ms_median")),
         duration_ms(lookup(lat, "student", "ttft_ms_median")), ratio(lat.get("ttft_ratio"))],
        ["Total time", duration_ms(lookup(lat, "teacher", "total_ms_median")),
         duration_ms(lookup(lat, "student", "total_ms_median")), ratio(lat.get("total_ratio"))],
    ])
    md += [""]
    if plot:
        md += ["![Median latency, teacher vs student](latency.png)", ""]
    return md


def training_section(summary: dict, metrics: list[dict], plot: bool) -> list[str]:
    tr = summary.get("training") or {}
    before, after = tr.get("val_loss_untrained"), tr.get("val_loss_final")
    if finite(before) and finite(after):
        val = f"{before:.3f} → {after:.3f} ({100 * (after / before - 1):+.1f}%)"
    else:
        val = "n/a (no validation split)"
    train_losses = [m["train_loss"] for m in metrics if finite(m.get("train_loss"))]
    seconds = max((m["seconds"] for m in metrics if finite(m.get("seconds"))), default=None)
    md = ["## Training", ""]
    md += table(["", "Value"], [
        ["Optimiser steps", tr.get("steps", NA)],
        ["Val loss, untrained (step 0) → final", val],
        ["Train loss, first → last step", f"{train_losses[0]:.3f} → {train_losses[-1]:.3f}" if train_losses else NA],
        ["Training examples", tr.get("train_examples", NA)],
        ["Teacher answers dropped (cut off with no full sentence to keep)", tr.get("dropped_truncated", NA)],
        ["Training time (last session)", fmt_seconds(seconds) if seconds is not None else NA],
    ])
    md += [""]
    if plot:
        md += ["![Training and validation loss](loss.png)", ""]
    return md


def timings_section(manifest: dict) -> list[str]:
    stages = (manifest or {}).get("stages") or {}
    md = ["## Stage timings", ""]
    if not stages:
        return md + ["No manifest.json in the run dir.", ""]
    rows, total = [], 0.0
    for name, rec in stages.items():
        secs = rec.get("seconds_total", rec.get("seconds"))
        if "finished" in rec and finite(secs):
            total += secs
            rows.append([name, fmt_seconds(secs), rec.get("summary", "")])
        else:
            rows.append([name, "not finished", ""])
    rows.append(["total", fmt_seconds(total), ""])
    return md + table(["Stage", "Time", "Summary"], rows) + [""]


# --------------------------------------------------------------------------- stage


def load_summary(run: RunDir) -> dict:
    path = run.root / "summary.json"
    if not path.is_file():
        raise StageError(f"{path}: not found; the report needs a finished evaluation, run `distill eval` first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise StageError(f"{path}: malformed JSON ({e.msg}); re-run `distill eval --force`") from None


def stage_inputs(cfg: RunConfig, run: RunDir) -> dict:
    path = run.root / "summary.json"
    return {"summary": sha256_file(path)[:16] if path.is_file() else None}


def outputs(run: RunDir) -> list[Path]:
    return [run.root / "report.md"] + [run.root / p for p in (*PLOTS, TURNS_PLOT)]  # turns.png only with conversations


def run(cfg: RunConfig, run: RunDir) -> str:
    with Timer() as t:
        summary = load_summary(run)
        rows = read_jsonl(run.root / "eval.jsonl")
        metrics = read_jsonl(run.metrics)
        manifest = run.read_manifest()
        plots = write_plots(run.root, summary, metrics)
        report = run.root / "report.md"
        atomic_write_text(report, build_markdown(summary, rows, metrics, manifest, cfg, plots))
    extra = f" + {len(plots)} plots" if plots else " (no plots: matplotlib not installed)"
    return f"report: {report}{extra} in {fmt_seconds(t.seconds)}"
