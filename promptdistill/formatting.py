"""Numbers, 95% CIs and markdown tables as text, for the report, `distill compare` and the
terminal: a missing or NaN number prints as "n/a" wherever it stands, never as a crash."""

from __future__ import annotations

import math

NA = "n/a"


def finite(x) -> bool:
    """A number that prints: an int or a float, not NaN or infinite (and not a bool)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def lookup(d, *path):
    """d[path[0]][path[1]]..., or None where any step is missing."""
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def num(x, fmt: str = ".3f") -> str:
    return format(x, fmt) if finite(x) else NA


def pct(fraction, digits: int = 0) -> str:
    """0.55 -> '55%'."""
    return f"{100 * fraction:.{digits}f}%" if finite(fraction) else NA


def pct_points(x, digits: int = 1) -> str:
    """A value already in percent: 93.899 -> '93.9%'."""
    return f"{x:.{digits}f}%" if finite(x) else NA


def tok(x) -> str:
    """A mean token count: '648' or '647.5'."""
    if not finite(x):
        return NA
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.1f}"


def money(x, currency: str = "") -> str:
    if not finite(x):
        return NA
    a = abs(x)
    text = f"{x:,.0f}" if a >= 1000 else f"{x:,.2f}" if a >= 1 else f"{x:.3g}" if a > 0 else "0"
    return f"{text} {currency}".strip()


def count(x) -> str:
    """A break-even query count: whole queries, rounded up, with thousands separators."""
    return f"{math.ceil(x):,}" if finite(x) else NA


def duration_ms(ms) -> str:
    if not finite(ms):
        return NA
    return f"{ms / 1000:.2f} s" if ms >= 1000 else f"{ms:.0f} ms"


def ratio(r) -> str:
    if not finite(r):
        return NA
    if r == 1:
        return "1.00x (same)"
    return f"{r:.2f}x ({abs(1 - r):.0%} {'faster' if r < 1 else 'slower'})"


def mean_ci(d, fmt: str = ".3f") -> str:
    mean, ci = lookup(d, "mean"), lookup(d, "ci95") or [None, None]
    return f"{num(mean, fmt)} [{num(ci[0], fmt)}, {num(ci[1], fmt)}]"


def absolute(q: dict, fmt: str = ".3f") -> str:
    """A quality score by its means alone, for one that cannot tell (its retained ratio has no
    denominator to speak of): 'student 0.731, base 0.699, ceiling 0.753'."""
    return ", ".join(f"{who} {num(lookup(q, who, 'mean'), fmt)}" for who in ("student", "base", "ceiling"))


def pct_ci(d) -> str:
    mean, ci = lookup(d, "mean"), lookup(d, "ci95") or [None, None]
    return f"{pct(mean)} [{pct(ci[0])}, {pct(ci[1])}]"


def cell(text) -> str:
    """Text safe inside a markdown table cell: no pipes, no newlines."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", " ")


def table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return out

