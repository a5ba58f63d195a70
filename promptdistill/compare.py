"""`distill compare RUN_DIR...`: every headline number of several finished runs side by side.

Reads each run's summary.json (quality, tokens, latency, cost, training), manifest.json
(seconds per stage), metrics.jsonl (final train loss) and config.yaml (the fields that
differ between the runs), prints one table per section and writes them as markdown with a
PNG beside it: quality retained per score and run, with 95% CI error bars. Scores are read
from summary["quality"] whatever their names, extra fields included; a number one run has
and another lacks is a blank cell, never a crash. No model is loaded, no torch imported.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import yaml

from .formatting import finite, mean_ci, pct_ci, table
from .plots import figure, save
from .rundir import RunDir, StageError, atomic_write_text, read_jsonl, sha256_text
from .tracking import flatten
from .verdict import tells

# the shape every summary["quality"] entry shares; the paired differences only from runs evaluated since they were added
PARTS = ("retained", "student", "base", "ceiling", "student_minus_base", "ceiling_minus_base", "n")
SECTIONS = ("tokens", "cost", "latency", "training")  # of summary.json, shown key by key
IGNORED_CONFIG = ("name", "run_dir")  # differ between any two runs, say nothing
MAX_CELL = 48  # characters of a long text value (a system prompt) shown in a cell
QUALITY = "Quality (retained: 0% = base, 100% = ceiling; mean [95% CI])"


def load_run(path: Path) -> dict:
    """One finished run's files; a dir that is not one is an error naming it and what is missing."""
    if not path.is_dir():
        raise StageError(f"{path}: no such run directory")
    run = RunDir(path)
    missing = [p.name for p in (run.config, run.root / "summary.json", run.manifest_path) if not p.is_file()]
    if missing:
        raise StageError(f"{path}: not a finished run (no {', '.join(missing)}); finish it with `distill run {path}`")
    return {"path": path, "summary": _json(run.root / "summary.json"), "manifest": _json(run.manifest_path),
            "metrics": read_jsonl(run.metrics), "config": _yaml(run.config)}


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StageError(f"{path}: not valid JSON ({e})") from None


def _yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise StageError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise StageError(f"{path}: expected a mapping of config fields")
    return data


def labels(runs: list[dict]) -> list[str]:
    """Column headings: the run names, or the paths where names repeat."""
    names = [str(r["summary"].get("run") or r["path"].name) for r in runs]
    return names if len(set(names)) == len(names) else [str(r["path"]) for r in runs]


def show(value) -> str:
    """One value in a cell: null as n/a, floats to 4 significant digits, long text cut (with a
    hash of the whole, so two prompts that differ only past the cut still look different)."""
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format(value, ".4g") if finite(value) else "n/a"
    if isinstance(value, list):
        return "[" + ", ".join(show(v) for v in value) + "]"
    text = str(value).replace("\n", " ")
    return text if len(text) <= MAX_CELL else f"{text[:MAX_CELL]}… (sha256 {sha256_text(str(value))[:8]})"


def _rows(key_values: list[dict]) -> list[list[str]]:
    """One row per key any run has, in first-seen order; blank where a run lacks it."""
    keys = list(dict.fromkeys(k for kv in key_values for k in kv))
    return [[k] + [show(kv[k]) if k in kv else "" for kv in key_values] for k in keys]


def quality_rows(runs: list[dict]) -> list[list[str]]:
    """Per score: retained (or "cannot tell": a ratio over a gap within noise says nothing), student,
    base, ceiling, the paired differences (mean [95% CI]), n, then its extra fields."""
    scores = list(dict.fromkeys(name for r in runs for name in (r["summary"].get("quality") or {})))
    rows = []
    for name in scores:
        entries = [(r["summary"].get("quality") or {}).get(name) for r in runs]
        for part in PARTS:
            cells = []
            for q in entries:
                if not isinstance(q, dict) or part not in q:
                    cells.append("")
                elif part == "retained":
                    cells.append(pct_ci(q[part]) if tells(q) else "cannot tell")
                elif part == "n":
                    cells.append(show(q[part]))
                else:
                    cells.append(mean_ci(q[part], ".4g"))
            if any(cells):
                rows.append([f"{name} {part}"] + cells)
        extras = [flatten({k: v for k, v in q.items() if k not in (*PARTS, "per_turn")}) if isinstance(q, dict) else {}
                  for q in entries]
        rows += [[f"{name} {r[0]}"] + r[1:] for r in _rows(extras)]
    return rows


def turn_rows(runs: list[dict]) -> list[list[str]]:
    """Per score measured per turn of a conversation, and per turn: retained (mean [95% CI]) and n."""
    per_turn = [{name: q["per_turn"] for name, q in (r["summary"].get("quality") or {}).items()
                 if isinstance(q, dict) and q.get("per_turn")} for r in runs]
    rows = []
    for name in dict.fromkeys(n for p in per_turn for n in p):
        for turn in dict.fromkeys(t for p in per_turn for t in p.get(name, {})):
            at = [p.get(name, {}).get(turn) for p in per_turn]
            rows.append([f"{name} turn {turn} retained"]
                        + [("" if not q else pct_ci(q["retained"]) if tells(q) else "cannot tell") for q in at])
            rows.append([f"{name} turn {turn} n"] + [show(q["n"]) if q else "" for q in at])
    return rows


def skills_rows(runs: list[dict]) -> list[list[str]]:
    """Kept skills (summary["kept_skills"]), overall and per category: base, student and teacher
    accuracy, student - base (mean [95% CI], paired) and whether the student lost them."""
    sections = [r["summary"].get("kept_skills") or {} for r in runs]
    groups = ["all", *dict.fromkeys(c for ks in sections for c in ks.get("per_category", {}))]
    rows = []
    for group in groups:
        at = [ks if group == "all" else ks.get("per_category", {}).get(group) for ks in sections]
        for who in ("base", "student", "teacher"):
            rows.append([f"{group} {who}"] + [pct_ci({"mean": s[who]["accuracy"], "ci95": s[who]["ci95"]}) if s else ""
                                              for s in at])
        rows.append([f"{group} student - base"] + [pct_ci(s["student_minus_base"]) if s else "" for s in at])
        rows.append([f"{group} lost"] + [("yes" if s["lost"] else "no") if s else "" for s in at])
    return rows if any(sections) else []


def numbers(run: dict) -> dict:
    """The run's other headline numbers, flattened: summary sections, train loss, stage seconds."""
    s = run["summary"]
    out = {"n_test": s.get("n_test"), **{f"models.{k}": v for k, v in (s.get("models") or {}).items()}}
    for section in SECTIONS:
        value = s.get(section)
        out |= flatten(value, f"{section}.") if isinstance(value, dict) else {section: value}
    losses = [m["train_loss"] for m in run["metrics"] if "train_loss" in m]
    out["training.train_loss_final"] = losses[-1] if losses else None
    stages = (run["manifest"].get("stages") or {})
    seconds = {name: rec.get("seconds_total", rec.get("seconds")) for name, rec in stages.items() if "finished" in rec}
    out |= {f"seconds.{name}": secs for name, secs in seconds.items()}
    out["seconds.total"] = round(sum(v for v in seconds.values() if finite(v)), 2)
    return out


def config_diff(runs: list[dict]) -> list[list[str]]:
    """The config fields (flattened) whose values are not the same in every run."""
    # A null is an unset field: blank, like a section (pricing, tracking) another run does not have.
    flat = [{k: v for k, v in flatten(r["config"]).items() if k.split(".")[0] not in IGNORED_CONFIG and v is not None}
            for r in runs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    differ = {k for k in keys if len({json.dumps(f.get(k, "<absent>"), sort_keys=True) for f in flat}) > 1}
    return _rows([{k: v for k, v in f.items() if k in differ} for f in flat])


def build(runs: list[dict]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The sections: (title, header, rows)."""
    head = [""] + labels(runs)
    by_turn = turn_rows(runs)  # runs tested on conversations
    return [
        ("Runs", head, [["path"] + [str(r["path"]) for r in runs]]),
        (QUALITY, head, quality_rows(runs)),
        *([("By turn of the conversation", head, by_turn)] if by_turn else []),
        *([("Kept skills (accuracy WITHOUT the prompt, the teacher WITH it; mean [95% CI])", head, skills)]
          if (skills := skills_rows(runs)) else []),
        ("Tokens, cost, latency, training, seconds per stage", head, _rows([numbers(r) for r in runs])),
        ("Config fields that differ", head, config_diff(runs) or [["(none)"] + [""] * len(runs)]),
        ("Verdicts", ["run", "verdict"], [[n, r["summary"].get("verdict", "")] for n, r in zip(labels(runs), runs)]),
    ]


def text_table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    return lines + ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]


def plot_retained(runs: list[dict], path: Path) -> None:
    """Quality retained per score (x) and run (bars), with 95% CI error bars."""
    fig, ax = figure()
    names = list(dict.fromkeys(n for r in runs for n in (r["summary"].get("quality") or {})))
    width = 0.8 / len(runs)
    for j, (label, r) in enumerate(zip(labels(runs), runs)):
        xs, ys, err = [], [], [[], []]
        for i, name in enumerate(names):
            q = (r["summary"].get("quality") or {}).get(name) or {}
            ret = q.get("retained") or {}
            mean, ci = ret.get("mean"), ret.get("ci95") or [None, None]
            x = i - 0.4 + width * (j + 0.5)
            if not finite(mean) or not tells(q):
                ax.text(x, 50, "n/a" if tells(q) else "cannot tell", ha="center", va="center", color="grey", fontsize=7,
                        rotation=0 if tells(q) else 90)  # upright, it fits the bar it stands for
                continue
            m = 100 * mean
            xs.append(x)
            ys.append(m)
            # a ratio's bootstrap percentiles need not straddle its point estimate (a base near
            # the ceiling): a bar then reaches its CI's edge, never past its own top
            err[0].append(max(0.0, m - 100 * ci[0]) if finite(ci[0]) else 0)
            err[1].append(max(0.0, 100 * ci[1] - m) if finite(ci[1]) else 0)
        ax.bar(xs, ys, width * 0.9, yerr=err, capsize=3, label=label, color=f"C{j}", alpha=0.85)
    ax.axhline(0, color="grey", lw=1, ls="--")
    ax.axhline(100, color="grey", lw=1, ls=":")
    ax.set_xticks(range(len(names)), [textwrap.fill(n.replace("_", " "), 10) for n in names], fontsize=8)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_ylabel("quality retained (%): 0 = base, 100 = ceiling")
    low, high = ax.get_ylim()
    clipped = low < -300 or high > 400  # one wild CI (a ceiling on its floor) must not flatten the rest
    ax.set_ylim(max(low, -300), min(high, 400))
    ax.set_title("Quality retained per score, 95% CI" + (" (axis clipped)" if clipped else ""), fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    save(fig, path)


def compare(paths: list[Path], out: Path) -> str:
    """Print the comparison, write it to `out` (markdown) and its plot beside it; returns a summary line."""
    runs = [load_run(Path(p)) for p in paths]
    png = out.with_suffix(".png")
    sections = build(runs)
    for title, header, rows in sections:
        print(f"\n{title}\n" + "\n".join(text_table(header, rows)))
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_retained(runs, png)
    md = [f"# Comparing {len(runs)} runs", ""]
    for title, header, rows in sections:
        md += [f"## {title}", ""] + table(header, rows) + [""]
        if title == QUALITY:
            md += [f"![Quality retained per score and run]({png.name})", ""]
    atomic_write_text(out, "\n".join(md))
    return f"compare: {len(runs)} runs; wrote {out} and {png}"
