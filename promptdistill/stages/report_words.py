"""A finished run in plain words, from its summary.json: the first paragraph (the verdict,
then one sentence of key numbers) and the headline lines. report.md opens with both, and
`distill run` prints both when it ends."""

from __future__ import annotations

from ..formatting import NA, absolute, count, duration_ms, finite, lookup, money, num, pct, pct_ci, pct_points, tok
from ..verdict import tells


def _retained_phrase(name: str, q: dict) -> str:
    ret = q.get("retained") or {}
    ci = ret.get("ci95") or [None, None]
    return f"{pct(ret.get('mean'))} on {name} (95% CI {pct(ci[0])} to {pct(ci[1])})"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def mute_words(quality: dict) -> str:
    """The scores that cannot tell, by their absolute values: 'likelihood (student 1.996, base
    2.035, ceiling 1.930), ...'; '' when every score can tell."""
    return ", ".join(f"{name} ({absolute(q)})" for name, q in quality.items() if not tells(q))


def first_paragraph(summary: dict) -> str:
    """Plain words: did it work (the verdict), then one sentence with the key numbers."""
    verdict = summary.get("verdict") or "No verdict was recorded for this run."
    quality = summary.get("quality") or {}
    tokens = summary.get("tokens") or {}
    n = summary.get("n_test")
    parts = []
    told = [_retained_phrase(k, v) for k, v in quality.items() if tells(v)]
    if told:
        few = f"; with only {n} test queries the intervals are wide" if finite(n) and n < 20 else ""
        parts.append(f"quality retained is {_join(told)}{few}")
    if mute_words(quality):
        parts.append(f"cannot tell on this run, so shown as they are: {mute_words(quality)}")
    parts.append(f"input tokens per query drop from {tok(tokens.get('teacher_input'))} (teacher with the prompt) "
                 f"to {tok(tokens.get('student_input'))} (student without it), {pct_points(tokens.get('input_reduction_pct'))} fewer")
    cost = summary.get("cost")
    if cost:
        saving = cost.get("saving_pct")
        more_less = "less" if not finite(saving) or saving >= 0 else "more"
        be = cost.get("break_even_queries")
        payback = (f"the one-time generation + training cost of {money(lookup(cost, 'one_time', 'total'), cost.get('currency', ''))} "
                   + (f"is paid back after {count(be)} queries" if finite(be) else "is never paid back"))
        parts.append(f"at the configured prices the student costs {pct_points(abs(saving) if finite(saving) else None)} "
                     f"{more_less} per query and {payback}")
    else:
        parts.append("there are no cost figures because the config has no pricing section")
    lat = summary.get("latency") or {}
    teacher, student = duration_ms(lookup(lat, 'teacher', 'ttft_ms_median')), duration_ms(lookup(lat, 'student', 'ttft_ms_median'))
    parts.append(f"the median time to first token is {teacher} for the teacher (over streaming from its endpoint) vs "
                 f"{student} for the student (on this machine)" if streamed(summary) else
                 f"the median time to first token, measured on this machine, is {teacher} for the teacher vs "
                 f"{student} for the student")
    where = f"over {n} test queries" if finite(n) else "on the test split"
    sentence = f"In numbers, {where}: " + "; ".join(parts[:-1]) + "; and " + parts[-1] + "."
    return f"{verdict.strip()} {sentence}"


def streamed(summary: dict) -> bool:
    """The teacher's latency was timed over streaming from its endpoint, not on this machine."""
    return bool(lookup(summary, "models", "teacher_endpoint"))


def headline(summary: dict) -> list[str]:
    """A few lines of key numbers, for the terminal at the end of `distill run`."""
    lines = []
    quality = summary.get("quality") or {}
    told = [f"{k} {pct_ci(v.get('retained'))}" for k, v in quality.items() if tells(v)]
    if told:
        lines.append(f"quality retained (0% = base model, 100% = teacher ceiling; n={summary.get('n_test', NA)}): "
                     + ", ".join(told))
    if mute_words(quality):
        lines.append(f"cannot tell on this run (ceiling within noise of base): {mute_words(quality)}")
    t = summary.get("tokens") or {}
    lines.append(f"input tokens per query: {tok(t.get('teacher_input'))} -> {tok(t.get('student_input'))} "
                 f"(-{pct_points(t.get('input_reduction_pct'))}); input+output: -{pct_points(t.get('total_reduction_pct'))}")
    cost = summary.get("cost")
    if cost:
        cur = cost.get("currency", "")
        per = cost.get("per_1m_queries") or {}
        be = cost.get("break_even_queries")
        lines.append(f"cost per 1M queries: {money(per.get('teacher'), cur)} -> {money(per.get('student'), cur)} "
                     f"(saving {pct_points(cost.get('saving_pct'))}); one-time {money(lookup(cost, 'one_time', 'total'), cur)}; "
                     + (f"break-even after {count(be)} queries" if finite(be) else "never breaks even"))
    else:
        lines.append("cost: n/a (no pricing section in the config)")
    lat = summary.get("latency") or {}
    where = "(the teacher's over streaming from its endpoint)" if streamed(summary) else "on this machine"
    lines.append(f"median latency {where}: time to first token {duration_ms(lookup(lat, 'teacher', 'ttft_ms_median'))} -> "
                 f"{duration_ms(lookup(lat, 'student', 'ttft_ms_median'))} ({num(lat.get('ttft_ratio'), '.2f')}x), "
                 f"total {duration_ms(lookup(lat, 'teacher', 'total_ms_median'))} -> "
                 f"{duration_ms(lookup(lat, 'student', 'total_ms_median'))} ({num(lat.get('total_ratio'), '.2f')}x)")
    return lines

