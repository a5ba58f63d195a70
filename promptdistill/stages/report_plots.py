"""The report's four PNGs beside report.md: training loss, quality retained with its 95% CIs,
tokens and cost per query, and median latency; each says "n/a" (or why not) where a number
is missing rather than failing."""

from __future__ import annotations

from pathlib import Path

from ..formatting import NA, finite, lookup, money, num, pct_points, tok
from ..plots import COLORS, figure, save
from ..verdict import tells

PLOTS = ("loss.png", "quality.png", "tokens_cost.png", "latency.png")
TURNS_PLOT = "turns.png"  # with a test split of conversations: retained against the turn


def _na(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_loss(metrics: list[dict], path: Path) -> None:
    fig, ax = figure()
    train = [(m["step"], m["train_loss"]) for m in metrics if finite(m.get("train_loss"))]
    val = [(m["step"], m["val_loss"]) for m in metrics if finite(m.get("val_loss"))]
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
    save(fig, path)


def plot_quality(summary: dict, path: Path) -> None:
    """Quality retained, with its 95% CI, of the scores that can tell, on an axis that fits them;
    the scores that cannot tell have no retained share to draw (its denominator is noise), so a
    panel beside it lists their absolute values. Bars run sideways: the names stay readable
    however many scores there are."""
    quality = summary.get("quality") or {}
    told = [name for name, q in quality.items() if tells(q)]
    mute = [name for name in quality if name not in told]
    fig, axes = figure(2, width_ratios=[3, 1.3]) if mute else figure()
    ax = axes[0] if mute else axes
    lo_lim, hi_lim = -10.0, 115.0  # base and ceiling, and their labels, always in view
    labels = []  # (row, retained %, the right end of its bar or CI)
    for i, name in enumerate(told):
        r = quality[name].get("retained") or {}
        mean, ci = r.get("mean"), r.get("ci95") or [None, None]
        if not finite(mean):
            ax.text(50, i, "n/a", ha="center", va="center", color="grey")
            continue
        m = 100 * mean
        lo = 100 * ci[0] if finite(ci[0]) else m
        hi = 100 * ci[1] if finite(ci[1]) else m
        ax.barh(i, m, height=0.5, color=COLORS["student"], alpha=0.8)
        # The interval is drawn as it is, not as error bars around the mean: a ratio's bootstrap
        # CI need not contain its point estimate when the base's divergence is near zero.
        ax.hlines(i, lo, hi, color="black", lw=1)
        ax.vlines([lo, hi], i - 0.1, i + 0.1, color="black", lw=1)
        labels.append((i, m, max(m, hi)))
        lo_lim, hi_lim = min(lo_lim, lo - 10, m - 10), max(hi_lim, hi + 25, m + 25)  # room for the value's label
    clipped = lo_lim < -300 or hi_lim > 400  # one wide CI must not flatten the rest
    lo_lim, hi_lim = max(lo_lim, -300), min(hi_lim, 400)
    for i, m, right in labels:  # beside the CI's end, or inside the axis's edge when that is clipped
        x, dx, ha = (right, 3, "left") if right + 25 <= hi_lim + 1e-6 else (hi_lim, -3, "right")
        ax.annotate(f"{m:.0f}%", (x, i), textcoords="offset points", xytext=(dx, 4 if ha == "right" else 0), ha=ha,
                    va="bottom" if ha == "right" else "center", fontsize=8)
    if not told:
        _na(ax, "no score can tell\non this run")
    else:
        ax.axvline(0, color=COLORS["base"], lw=1, ls="--")
        ax.axvline(100, color=COLORS["teacher"], lw=1, ls="--")
        ax.text(0, 1.0, "base", transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=8,
                color=COLORS["base"])
        ax.text(100, 1.0, "ceiling", transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=8,
                color=COLORS["teacher"])
        ax.set_yticks(range(len(told)), [n.replace("_", " ") for n in told], fontsize=8)
        ax.set_ylim(len(told) - 0.5, -0.5)  # the first score on top
        ax.set_xlim(lo_lim, hi_lim)
        ax.set_xlabel("quality retained (%)")
        ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"Quality retained, 95% CI (n={summary.get('n_test', NA)})" + (" (axis clipped)" if clipped else ""),
                 fontsize=10, pad=14)
    if mute:
        _mute_panel(axes[1], {name: quality[name] for name in mute})
    save(fig, path)


def _mute_panel(ax, mute: dict) -> None:
    """The scores that cannot tell, by their means: their ceiling is within noise of their base."""
    ax.axis("off")
    ax.text(0.0, 1.0, "Cannot tell on this run", transform=ax.transAxes, va="bottom", ha="left", fontsize=9)
    lines = ["(ceiling within noise", "of base): means", ""]
    for name, q in mute.items():
        lines += [name, *(f"  {who} {num(lookup(q, who, 'mean'), '.3f')}" for who in ("student", "base", "ceiling"))]
    ax.text(0.0, 0.97, "\n".join(lines), transform=ax.transAxes, va="top", ha="left", fontsize=7, family="monospace")


def scored_by_turn(summary: dict) -> dict[str, dict]:
    """The quality scores measured per turn (a test split of conversations): name -> per_turn."""
    return {name: q["per_turn"] for name, q in (summary.get("quality") or {}).items() if q.get("per_turn")}


def plot_turns(summary: dict, path: Path) -> None:
    """Quality retained against the turn of the conversation, one line per score, 95% CIs."""
    fig, ax = figure()
    low, high, points = -25.0, 125.0, []
    for k, (name, turns) in enumerate(scored_by_turn(summary).items()):
        x = [i + (k - 0.5) * 0.08 for i in range(len(turns))]  # side by side, not on top of each other
        means = [100 * t["retained"]["mean"] if finite(t["retained"]["mean"]) else float("nan") for t in turns.values()]
        lo = [100 * t["retained"]["ci95"][0] if finite(t["retained"]["ci95"][0]) else m for t, m in zip(turns.values(), means)]
        hi = [100 * t["retained"]["ci95"][1] if finite(t["retained"]["ci95"][1]) else m for t, m in zip(turns.values(), means)]
        ax.plot(x, means, marker="o", label=name, color=("C0", "C1", "C2")[k % 3])
        ax.vlines(x, lo, hi, color=("C0", "C1", "C2")[k % 3], lw=1)
        ax.set_xticks(range(len(turns)), [f"turn {t}" for t in turns])
        shown = [v for v in lo + hi + means if finite(v)]
        low, high = min([low, *shown]) - 10, max([high, *shown]) + 10
        points += [(xi, m, ("C0", "C1", "C2")[k % 3]) for xi, m in zip(x, means) if finite(m)]
    clipped = low < -300 or high > 400  # a ratio whose base sits on its ceiling must not flatten the rest
    bottom, top = max(low, -300), min(high, 400)
    ax.set_ylim(bottom, top)
    for xi, m, color in points:  # a mean beyond the clipped axis: a marker at its edge (the report's table has it)
        if not bottom <= m <= top:
            ax.plot([xi], [top if m > top else bottom], marker="^" if m > top else "v", color=color, clip_on=False)
    ax.axhline(0, color=COLORS["base"], lw=1, ls="--")
    ax.axhline(100, color=COLORS["teacher"], lw=1, ls="--")
    ax.text(1.0, 0, " base 0%", transform=ax.get_yaxis_transform(), va="center", fontsize=8, color=COLORS["base"])
    ax.text(1.0, 100, " ceiling\n 100%", transform=ax.get_yaxis_transform(), va="center", fontsize=8,
            color=COLORS["teacher"])
    ax.set_ylabel("quality retained (%)")
    ax.set_title("Quality retained by turn of the conversation, 95% CI"
                 + (" (axis clipped: ▲▼ lie beyond it)" if clipped else ""), fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    save(fig, path)


def _bar_pairs(ax, groups: list[str], teacher: list, student: list, fmt) -> None:
    width = 0.38
    for offset, who, values in ((-width / 2, "teacher", teacher), (width / 2, "student", student)):
        xs = [i + offset for i in range(len(groups))]
        ys = [v if finite(v) else 0 for v in values]
        bars = ax.bar(xs, ys, width, color=COLORS[who], label=f"{who} ({'with' if who == 'teacher' else 'no'} prompt)")
        for b, v in zip(bars, values):
            ax.annotate(fmt(v), (b.get_x() + b.get_width() / 2, b.get_height()), textcoords="offset points",
                        xytext=(0, 2), ha="center", fontsize=7)
    ax.set_xticks(range(len(groups)), groups)
    ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3)


def plot_tokens_cost(summary: dict, path: Path) -> None:
    fig, (left, right) = figure(2)
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
    save(fig, path)


def plot_latency(summary: dict, path: Path) -> None:
    fig, ax = figure()
    lat = summary.get("latency") or {}
    teacher = [lookup(lat, "teacher", "ttft_ms_median"), lookup(lat, "teacher", "total_ms_median")]
    student = [lookup(lat, "student", "ttft_ms_median"), lookup(lat, "student", "total_ms_median")]
    values = [v for v in teacher + student if finite(v)]
    if not values:
        _na(ax, "no latency measured")
    else:
        scale, unit = (1000, "s") if max(values) >= 1000 else (1, "ms")
        _bar_pairs(ax, ["time to first token", "total per query"],
                   [v / scale if finite(v) else None for v in teacher], [v / scale if finite(v) else None for v in student],
                   lambda v: num(v, ".2f" if unit == "s" else ".0f"))
        ax.set_ylabel(f"median ({unit})")
        ax.legend(fontsize=7)
    q = lookup(lat, "teacher", "queries")
    ax.set_title(f"Median latency on this machine ({q if q is not None else NA} queries)", fontsize=10)
    save(fig, path)


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
    if scored_by_turn(summary):
        plot_turns(summary, root / TURNS_PLOT)
        return [*PLOTS, TURNS_PLOT]
    return list(PLOTS)
