"""Stage 5, report: turn a finished run into something a person can read.

Reads summary.json, eval.jsonl, metrics.jsonl and manifest.json from the run dir (no
model is loaded, no torch imported) and writes report.md beside them: a first paragraph
that says in plain words whether the distillation worked, then tables for quality,
tokens, cost, latency, training and stage timings, five side-by-side example answers,
and four small PNG plots (loss, quality, tokens_cost, latency).

`first_paragraph(summary)` and `headline(summary)` are what the CLI prints at the end of
`distill run`. Missing or NaN numbers print as "n/a"; a run without a pricing section
gets a note on how to add one instead of a cost table.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..config import RunConfig
from ..rundir import RunDir, StageError, Timer, atomic_write_text, fmt_seconds, read_jsonl, sha256_file

NA = "n/a"
PLOTS = ("loss.png", "quality.png", "tokens_cost.png", "latency.png")
FIGSIZE = (6, 3.5)
DPI = 100
COLORS = {"teacher": "#1f77b4", "student": "#ff7f0e", "base": "#7f7f7f"}

# What each quality score measures, what its floor and ceiling are, and its direction.
SCORES = {
    "fidelity": ("mean forward KL(teacher WITH the prompt || model WITHOUT it) per token of the teacher's held-out answers",
                 "0, the prompted teacher itself", "lower"),
    "on_policy_fidelity": ("mean reverse KL(model WITHOUT the prompt || teacher WITH it) per token of the model's own "
                           "answers, sampled as it will be served", "0, the prompted teacher itself", "lower"),
    "similarity": ("cosine similarity of MiniLM sentence embeddings to the teacher's answer",
                   "the teacher answering again (another seed)", "higher"),
    "likelihood": ("mean negative log-likelihood per token of the teacher's answer under the student model",
                   "the base model WITH the system prompt", "lower"),
    "persona": ("share of answers a classifier calls teacher-style (vs base-style)",
                "the teacher answering again (another seed)", "higher"),
}

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


# --------------------------------------------------------------------------- formatting


def _ok(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _get(d, *path):
    """d[path[0]][path[1]]..., or None where any step is missing."""
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def num(x, fmt: str = ".3f") -> str:
    return format(x, fmt) if _ok(x) else NA


def pct(fraction, digits: int = 0) -> str:
    """0.55 -> '55%'."""
    return f"{100 * fraction:.{digits}f}%" if _ok(fraction) else NA


def tok(x) -> str:
    """A mean token count: '648' or '647.5'."""
    if not _ok(x):
        return NA
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.1f}"


def money(x, currency: str = "") -> str:
    if not _ok(x):
        return NA
    a = abs(x)
    text = f"{x:,.0f}" if a >= 1000 else f"{x:,.2f}" if a >= 1 else f"{x:.3g}" if a > 0 else "0"
    return f"{text} {currency}".strip()


def count(x) -> str:
    """A break-even query count: whole queries, rounded up, with thousands separators."""
    return f"{math.ceil(x):,}" if _ok(x) else NA


def duration_ms(ms) -> str:
    if not _ok(ms):
        return NA
    return f"{ms / 1000:.2f} s" if ms >= 1000 else f"{ms:.0f} ms"


def ratio(r) -> str:
    if not _ok(r):
        return NA
    if r == 1:
        return "1.00x (same)"
    return f"{r:.2f}x ({abs(1 - r):.0%} {'faster' if r < 1 else 'slower'})"


def mean_ci(d, fmt: str = ".3f") -> str:
    mean, ci = _get(d, "mean"), _get(d, "ci95") or [None, None]
    return f"{num(mean, fmt)} [{num(ci[0], fmt)}, {num(ci[1], fmt)}]"


def pct_ci(d) -> str:
    mean, ci = _get(d, "mean"), _get(d, "ci95") or [None, None]
    return f"{pct(mean)} [{pct(ci[0])}, {pct(ci[1])}]"


def cell(text) -> str:
    """Text safe inside a markdown table cell: no pipes, no newlines."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", " ")


def table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return out


def quote(text) -> list[str]:
    """An answer as a markdown blockquote, every line kept."""
    text = (text or "").replace("\r", "").strip()
    if not text:
        return ["> *(empty answer)*"]
    return [f"> {line}" if line.strip() else ">" for line in text.split("\n")]


# --------------------------------------------------------------------------- words


def _retained_phrase(name: str, q: dict) -> str:
    ret = q.get("retained") or {}
    ci = ret.get("ci95") or [None, None]
    return f"{pct(ret.get('mean'))} on {name} (95% CI {pct(ci[0])} to {pct(ci[1])})"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def first_paragraph(summary: dict) -> str:
    """Plain words: did it work (the verdict), then one sentence with the key numbers."""
    verdict = summary.get("verdict") or "No verdict was recorded for this run."
    quality = summary.get("quality") or {}
    tokens = summary.get("tokens") or {}
    n = summary.get("n_test")
    parts = []
    if quality:
        few = f"; with only {n} test queries the intervals are wide" if _ok(n) and n < 20 else ""
        parts.append(f"quality retained is {_join([_retained_phrase(k, v) for k, v in quality.items()])}{few}")
    parts.append(f"input tokens per query drop from {tok(tokens.get('teacher_input'))} (teacher with the prompt) "
                 f"to {tok(tokens.get('student_input'))} (student without it), {pct_points(tokens.get('input_reduction_pct'))} fewer")
    cost = summary.get("cost")
    if cost:
        saving = cost.get("saving_pct")
        more_less = "less" if not _ok(saving) or saving >= 0 else "more"
        be = cost.get("break_even_queries")
        payback = (f"the one-time generation + training cost of {money(_get(cost, 'one_time', 'total'), cost.get('currency', ''))} "
                   + (f"is paid back after {count(be)} queries" if _ok(be) else "is never paid back"))
        parts.append(f"at the configured prices the student costs {pct_points(abs(saving) if _ok(saving) else None)} "
                     f"{more_less} per query and {payback}")
    else:
        parts.append("there are no cost figures because the config has no pricing section")
    lat = summary.get("latency") or {}
    teacher, student = duration_ms(_get(lat, 'teacher', 'ttft_ms_median')), duration_ms(_get(lat, 'student', 'ttft_ms_median'))
    parts.append(f"the median time to first token is {teacher} for the teacher (over streaming from its endpoint) vs "
                 f"{student} for the student (on this machine)" if streamed(summary) else
                 f"the median time to first token, measured on this machine, is {teacher} for the teacher vs "
                 f"{student} for the student")
    where = f"over {n} test queries" if _ok(n) else "on the test split"
    sentence = f"In numbers, {where}: " + "; ".join(parts[:-1]) + "; and " + parts[-1] + "."
    return f"{verdict.strip()} {sentence}"


def streamed(summary: dict) -> bool:
    """The teacher's latency was timed over streaming from its endpoint, not on this machine."""
    return bool(_get(summary, "models", "teacher_endpoint"))


def pct_points(x, digits: int = 1) -> str:
    """A value already in percent: 93.899 -> '93.9%'."""
    return f"{x:.{digits}f}%" if _ok(x) else NA


def headline(summary: dict) -> list[str]:
    """A few lines of key numbers, for the terminal at the end of `distill run`."""
    lines = []
    quality = summary.get("quality") or {}
    if quality:
        parts = [f"{k} {pct_ci(v.get('retained'))}" for k, v in quality.items()]
        lines.append(f"quality retained (0% = base model, 100% = teacher ceiling; n={summary.get('n_test', NA)}): "
                     + ", ".join(parts))
    t = summary.get("tokens") or {}
    lines.append(f"input tokens per query: {tok(t.get('teacher_input'))} -> {tok(t.get('student_input'))} "
                 f"(-{pct_points(t.get('input_reduction_pct'))}); input+output: -{pct_points(t.get('total_reduction_pct'))}")
    cost = summary.get("cost")
    if cost:
        cur = cost.get("currency", "")
        per = cost.get("per_1m_queries") or {}
        be = cost.get("break_even_queries")
        lines.append(f"cost per 1M queries: {money(per.get('teacher'), cur)} -> {money(per.get('student'), cur)} "
                     f"(saving {pct_points(cost.get('saving_pct'))}); one-time {money(_get(cost, 'one_time', 'total'), cur)}; "
                     + (f"break-even after {count(be)} queries" if _ok(be) else "never breaks even"))
    else:
        lines.append("cost: n/a (no pricing section in the config)")
    lat = summary.get("latency") or {}
    where = "(the teacher's over streaming from its endpoint)" if streamed(summary) else "on this machine"
    lines.append(f"median latency {where}: time to first token {duration_ms(_get(lat, 'teacher', 'ttft_ms_median'))} -> "
                 f"{duration_ms(_get(lat, 'student', 'ttft_ms_median'))} ({num(lat.get('ttft_ratio'), '.2f')}x), "
                 f"total {duration_ms(_get(lat, 'teacher', 'total_ms_median'))} -> "
                 f"{duration_ms(_get(lat, 'student', 'total_ms_median'))} ({num(lat.get('total_ratio'), '.2f')}x)")
    return lines


# --------------------------------------------------------------------------- examples


def pick_examples(rows: list[dict], k: int = 5) -> list[tuple[str, dict]]:
    """Up to k rows spread over the student's similarity to the teacher: best, upper
    quartile, median, lower quartile, worst (deterministic: ties broken by id)."""
    def sim(r):
        s = _get(r, "similarity", "student")
        return s if _ok(s) else -math.inf

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
    md += compliance_section(summary) + judge_section(summary)
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


def quality_section(summary: dict, plot: bool) -> list[str]:
    quality = summary.get("quality") or {}
    md = ["## Quality", "",
          "Quality retained = (student - base) / (ceiling - base), per score: 0% means the student is no closer to "
          "the prompted teacher than the untouched base model (the distillation failed), 100% means it is as close "
          "as the teacher is to itself (the ceiling). Below 0% the student got worse than the base, above 100% it "
          "beat the ceiling. Means with bootstrap 95% CIs in brackets.", ""]
    rows = []
    for name, q in quality.items():
        better = SCORES.get(name, ("", "", ""))[2]
        check = ""
        clf = q.get("classifier")
        if clf:
            check = (f"classifier held-out accuracy {pct(clf.get('heldout_accuracy'))} on {clf.get('heldout_n', NA)} answers "
                     f"(trained on {clf.get('train_n', NA)})")
        if q.get("source"):
            check = f"from the {q['source']}"
        power = {True: "yes", False: "**cannot tell on this run**"}.get(q.get("can_tell"), NA)
        rows.append([name, better + " = closer" if better else NA, mean_ci(q.get("base")), mean_ci(q.get("student")),
                     mean_ci(q.get("ceiling")), pct_ci(q.get("retained")), q.get("n", NA), power, check])
    md += table(["Score", "Direction", "Base", "Student", "Ceiling", "Quality retained", "n", "Can tell", "Check"], rows)
    md += ["", "A score can tell when its ceiling's 95% CI does not overlap the base's; one that cannot is left out "
           "of the verdict (even a perfect student could not be told from the base by it).", ""]
    for name in quality:
        if name in SCORES:
            what, ceiling, _ = SCORES[name]
            md.append(f"- **{name}**: {what}; ceiling = {ceiling}.")
    acc = _get(quality, "persona", "classifier", "heldout_accuracy")
    if _ok(acc) and acc < 0.7:
        md.append(f"- The persona classifier is only {pct(acc)} accurate on held-out answers (50% = chance): "
                  "the two styles are hard to tell apart, so the persona score means little.")
    md += [""]
    if plot:
        md += ["![Quality retained per score, with 95% CIs](quality.png)", ""]
    return md


def compliance_section(summary: dict) -> list[str]:
    """Per rule of checks.rules: who follows it on the test queries it applies to, and
    what best-of-N selection did to the teacher data; nothing without rules."""
    c = summary.get("compliance")
    if not c:
        return []
    md = ["## Rule compliance", "",
          "Each rule of `checks.rules`, checked on the answer text: the share of answers following it, on the test "
          "queries it applies to (95% CIs). Teacher = its answers in teacher.jsonl (the data the student learnt from, "
          "chosen by best-of-N when `sampling.best_of` is on) and the ceiling; teacher again = one fresh draw. "
          "Reach = student / teacher; a rule the teacher follows at least half the time has transferred when the "
          "reach is at least 70%.", ""]
    rows = [[name, r["kind"], r["applies"], pct_ci(r["teacher"]), pct_ci(r["teacher_again"]), pct_ci(r["student"]),
             pct_ci(r["base"]), pct_ci(r["retained"]), pct(r["reach"]),
             {True: "yes", False: "**missed**", None: "not judged"}[r["transferred"]]] for name, r in c["rules"].items()]
    md += table(["Rule", "Kind", "Applies", "Teacher", "Teacher again", "Student", "Base", "Retained", "Reach",
                 "Transferred"], rows) + [""]
    data = c.get("teacher_data")
    if data:
        md += [f"Teacher data: all {data['answers']} answers of teacher.jsonl, {data['tries_drawn']} tries drawn; "
               f"{data['all_pass']['first_try']} first tries and {data['all_pass']['kept']} kept answers follow every "
               "rule that applies.", ""]
        md += table(["Rule", "Applies", "First try", "Kept"],
                    [[n, r["applies"], pct(r["first_try"]), pct(r["kept"])] for n, r in data["rules"].items()]) + [""]
    return md


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
        return f"{100 * (b / a - 1):+.1f}%" if _ok(a) and _ok(b) and a else NA

    ti, si, to, so = (t.get(k) for k in ("teacher_input", "student_input", "teacher_output", "student_output"))
    tt = ti + to if _ok(ti) and _ok(to) else None
    st = si + so if _ok(si) and _ok(so) else None
    md = ["## Tokens", "", "Mean tokens per test query, counted with the real tokenizers (input includes the chat template).", ""]
    md += table(["Per query", "Teacher (with prompt)", "Student (no prompt)", "Change"], [
        ["Input tokens", tok(ti), tok(si), f"-{pct_points(t.get('input_reduction_pct'))}" if _ok(t.get("input_reduction_pct")) else NA],
        ["Output tokens", tok(to), tok(so), change(to, so)],
        ["Input + output", tok(tt), tok(st), f"-{pct_points(t.get('total_reduction_pct'))}" if _ok(t.get("total_reduction_pct")) else NA],
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
        [f"One-time: training ({f'{trained:,}' if _ok(trained) else NA} trained tokens)", "", money(one.get("training"), cur)],
        ["One-time total", money(one.get("total"), cur), ""],
        ["Break-even", "", f"after {count(be)} queries" if _ok(be) else "never (the student is not cheaper per query)"],
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
    q = _get(lat, "teacher", "queries")
    md = ["## Latency", "",
          f"Median per query, measured during `distill eval` ({q if q is not None else NA} test queries, one at a time, "
          "greedy decoding, each paying its own prefill), "
          + ("the teacher's over streaming from its endpoint (to its first text chunk and its end, as this client sees "
             "them: the network and the server's load included), the student's on this machine. "
             if streamed(summary) else "on this machine. ")
          + "Small samples on a busy machine are noisy.", ""]
    md += table(["Median per query", "Teacher (with prompt)", "Student (no prompt)", "Student / teacher"], [
        ["Time to first token", duration_ms(_get(lat, "teacher", "ttft_ms_median")),
         duration_ms(_get(lat, "student", "ttft_ms_median")), ratio(lat.get("ttft_ratio"))],
        ["Total time", duration_ms(_get(lat, "teacher", "total_ms_median")),
         duration_ms(_get(lat, "student", "total_ms_median")), ratio(lat.get("total_ratio"))],
    ])
    md += [""]
    if plot:
        md += ["![Median latency, teacher vs student](latency.png)", ""]
    return md


def training_section(summary: dict, metrics: list[dict], plot: bool) -> list[str]:
    tr = summary.get("training") or {}
    before, after = tr.get("val_loss_untrained"), tr.get("val_loss_final")
    if _ok(before) and _ok(after):
        val = f"{before:.3f} → {after:.3f} ({100 * (after / before - 1):+.1f}%)"
    else:
        val = "n/a (no validation split)"
    train_losses = [m["train_loss"] for m in metrics if _ok(m.get("train_loss"))]
    seconds = max((m["seconds"] for m in metrics if _ok(m.get("seconds"))), default=None)
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
        if "finished" in rec and _ok(secs):
            total += secs
            rows.append([name, fmt_seconds(secs), rec.get("summary", "")])
        else:
            rows.append([name, "not finished", ""])
    rows.append(["total", fmt_seconds(total), ""])
    return md + table(["Stage", "Time", "Summary"], rows) + [""]


# --------------------------------------------------------------------------- plots


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, format="png", dpi=DPI)
    os.replace(tmp, path)


def _figure(ncols: int = 1):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, axes


def _na(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_loss(metrics: list[dict], path: Path) -> None:
    fig, ax = _figure()
    train = [(m["step"], m["train_loss"]) for m in metrics if _ok(m.get("train_loss"))]
    val = [(m["step"], m["val_loss"]) for m in metrics if _ok(m.get("val_loss"))]
    if not train and not val:
        _na(ax, "no training metrics")
    if train:
        ax.plot(*zip(*train), color=COLORS["student"], lw=1.2, label="train loss")
    if val:
        ax.plot(*zip(*val), "o--", color=COLORS["teacher"], ms=4, lw=1, label="val loss")
        untrained = [v for s, v in val if s == 0]
        if untrained:
            ax.plot([0], untrained, marker="*", ms=12, color="black", ls="none", label="untrained (step 0)")
            ax.annotate(f"untrained {untrained[0]:.3f}", (0, untrained[0]), textcoords="offset points",
                        xytext=(10, -4), fontsize=8, va="top")
    elif train:
        ax.text(0.98, 0.95, "no val split", ha="right", va="top", transform=ax.transAxes, fontsize=8, color="grey")
    if train or val:
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("loss (NLL per answer token)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax.set_title("Training loss", fontsize=10)
    _save(fig, path)


def plot_quality(summary: dict, path: Path) -> None:
    fig, ax = _figure()
    quality = summary.get("quality") or {}
    names = list(quality)
    lo_lim, hi_lim, clipped = -25.0, 125.0, False
    for i, name in enumerate(names):
        r = quality[name].get("retained") or {}
        mean, ci = r.get("mean"), r.get("ci95") or [None, None]
        if not _ok(mean):
            ax.text(i, 50, "n/a", ha="center", va="center", color="grey")
            continue
        m = 100 * mean
        lo = 100 * ci[0] if _ok(ci[0]) else m
        hi = 100 * ci[1] if _ok(ci[1]) else m
        ax.bar(i, m, width=0.5, color=COLORS["student"], alpha=0.8)
        # The interval is drawn as it is, not as error bars around the mean: a ratio's bootstrap
        # CI need not contain its point estimate when the base's divergence is near zero.
        ax.vlines(i, lo, hi, color="black", lw=1)
        ax.hlines([lo, hi], i - 0.06, i + 0.06, color="black", lw=1)
        ax.annotate(f"{m:.0f}%", (i + 0.26, m), textcoords="offset points", xytext=(2, 0), fontsize=8, va="center")
        lo_lim, hi_lim = min(lo_lim, lo - 10, m - 10), max(hi_lim, hi + 10, m + 10)
    if lo_lim < -300 or hi_lim > 400:
        clipped = True
        lo_lim, hi_lim = max(lo_lim, -300), min(hi_lim, 400)
    ax.axhline(0, color=COLORS["base"], lw=1, ls="--")
    ax.axhline(100, color=COLORS["teacher"], lw=1, ls="--")
    ax.text(1.0, 0, " base 0%", transform=ax.get_yaxis_transform(), va="center", fontsize=8, color=COLORS["base"])
    ax.text(1.0, 100, " ceiling\n 100%", transform=ax.get_yaxis_transform(), va="center", fontsize=8, color=COLORS["teacher"])
    ax.set_xticks(range(len(names)), names)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylim(lo_lim, hi_lim)
    ax.set_ylabel("quality retained (%)")
    ax.set_title(f"Quality retained, 95% CI (n={summary.get('n_test', NA)})" + (" (axis clipped)" if clipped else ""),
                 fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def _bar_pairs(ax, groups: list[str], teacher: list, student: list, fmt) -> None:
    width = 0.38
    for offset, who, values in ((-width / 2, "teacher", teacher), (width / 2, "student", student)):
        xs = [i + offset for i in range(len(groups))]
        ys = [v if _ok(v) else 0 for v in values]
        bars = ax.bar(xs, ys, width, color=COLORS[who], label=f"{who} ({'with' if who == 'teacher' else 'no'} prompt)")
        for b, v in zip(bars, values):
            ax.annotate(fmt(v), (b.get_x() + b.get_width() / 2, b.get_height()), textcoords="offset points",
                        xytext=(0, 2), ha="center", fontsize=7)
    ax.set_xticks(range(len(groups)), groups)
    ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3)


def plot_tokens_cost(summary: dict, path: Path) -> None:
    fig, (left, right) = _figure(2)
    t = summary.get("tokens") or {}
    _bar_pairs(left, ["input", "output"], [t.get("teacher_input"), t.get("teacher_output")],
               [t.get("student_input"), t.get("student_output")], tok)
    left.set_ylabel("tokens per query (mean)")
    left.set_title("Tokens per query", fontsize=10)
    left.legend(fontsize=7)
    cost = summary.get("cost")
    if cost:
        cur = cost.get("currency", "")
        per = cost.get("per_1m_queries") or {}
        _bar_pairs(right, ["per 1M queries"], [per.get("teacher")], [per.get("student")], lambda v: money(v, cur))
        right.set_ylabel(f"cost ({cur})")
        right.set_title(f"Cost (saving {pct_points(cost.get('saving_pct'))})", fontsize=10)
    else:
        _na(right, "no pricing section\nin the config")
        right.set_title("Cost", fontsize=10)
    _save(fig, path)


def plot_latency(summary: dict, path: Path) -> None:
    fig, ax = _figure()
    lat = summary.get("latency") or {}
    teacher = [_get(lat, "teacher", "ttft_ms_median"), _get(lat, "teacher", "total_ms_median")]
    student = [_get(lat, "student", "ttft_ms_median"), _get(lat, "student", "total_ms_median")]
    values = [v for v in teacher + student if _ok(v)]
    if not values:
        _na(ax, "no latency measured")
    else:
        scale, unit = (1000, "s") if max(values) >= 1000 else (1, "ms")
        _bar_pairs(ax, ["time to first token", "total per query"],
                   [v / scale if _ok(v) else None for v in teacher], [v / scale if _ok(v) else None for v in student],
                   lambda v: num(v, ".2f" if unit == "s" else ".0f"))
        ax.set_ylabel(f"median ({unit})")
        ax.legend(fontsize=7)
    q = _get(lat, "teacher", "queries")
    ax.set_title(f"Median latency on this machine ({q if q is not None else NA} queries)", fontsize=10)
    _save(fig, path)


def write_plots(root: Path, summary: dict, metrics: list[dict]) -> list[str]:
    """The four PNGs beside report.md; [] if matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return []
    plot_loss(metrics, root / "loss.png")
    plot_quality(summary, root / "quality.png")
    plot_tokens_cost(summary, root / "tokens_cost.png")
    plot_latency(summary, root / "latency.png")
    return list(PLOTS)


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
    return [run.root / "report.md"] + [run.root / p for p in PLOTS]


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
