"""What every PNG of ours shares (the report's, `distill compare`'s, `distill inspect`'s):
one figure size and resolution, the teacher / student / base colours, a figure made
without pyplot and a PNG written atomically. matplotlib is imported only by `figure`."""

from __future__ import annotations

import os
from pathlib import Path

FIGSIZE = (6, 3.5)
DPI = 100
COLORS = {"teacher": "#1f77b4", "student": "#ff7f0e", "base": "#7f7f7f"}


def figure(ncols: int = 1, width_ratios: list[float] | None = None):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    axes = fig.subplots(1, ncols, width_ratios=width_ratios)
    return fig, axes


def save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, format="png", dpi=DPI)
    os.replace(tmp, path)

