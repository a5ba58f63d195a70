"""`distill inspect PATH`: what is in a queries file, a teacher file or a run dir.

Counts, splits, duplicates, length distributions in characters and in tokens of the
configured teacher and student tokenizers (no weights loaded), the system prompt's size
in tokens, answer lengths and how many hit max_tokens. Prints a readable summary; writes
it as JSON with a histogram PNG beside it (into a run dir by default, for a file only
with --json).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import RunConfig

from .config_file import load_config
from .plots import COLORS, figure, save
from .render import encode
from .rundir import RunDir, StageError, atomic_write_json, iter_jsonl, read_jsonl
from .scores import normalise_text
from .conversations import answered_turns, turn_count
from .stages.queries import load_queries
from .validate import Report, load_tokenizers


def distribution(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    v = np.asarray(values, dtype=np.float64)
    return {"n": int(v.size), "min": float(v.min()), "p50": float(np.median(v)), "mean": round(float(v.mean()), 1),
            "p90": float(np.quantile(v, 0.9)), "max": float(v.max())}


def duplicates(rows: list[dict], text_key: str) -> dict:
    """Ids used more than once, and groups of ids whose texts are the same once normalised."""
    ids: dict[str, int] = {}
    texts: dict[str, list[str]] = {}
    for r in rows:
        ids[r["id"]] = ids.get(r["id"], 0) + 1
        texts.setdefault(normalise_text(str(r.get(text_key, ""))), []).append(r["id"])
    return {"ids": sorted(i for i, n in ids.items() if n > 1), "texts": [g for g in texts.values() if len(g) > 1]}


def splits(rows: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        if "split" in r:
            out[r["split"]] = out.get(r["split"], 0) + 1
    return out


def token_lengths(texts: list[str], toks: dict) -> dict:
    return {role: distribution([len(encode(t.tokenizer, x)) for x in texts]) for role, t in toks.items()}


def describe_queries(rows: list[dict], toks: dict) -> dict:
    """The queries (a conversation counted once, by its first user turn) and, when some rows are
    conversations, how many user turns they hold (simulated follow-ups included) and how many
    turns the teacher answers."""
    texts = [r["query"] for r in rows]
    out = {"count": len(rows), "splits": splits(rows), "duplicates": duplicates(rows, "query"),
           "chars": distribution([len(x) for x in texts]), "tokens": token_lengths(texts, toks)}
    chats = [r for r in rows if turn_count(r) > 1]
    if chats:
        out["conversations"] = {"count": len(chats), "user_turns": distribution([turn_count(r) for r in chats]),
                                "carried_on_by_a_simulated_user": sum("follow_ups" in r for r in chats),
                                "answered_turns": sum(len(answered_turns(r)) for r in rows)}
    return out


def describe_answers(rows: list[dict], toks: dict, max_tokens: int | None) -> dict:
    texts = [str(r.get("completion", "")) for r in rows]
    reasons: dict[str, int] = {}
    for r in rows:
        reasons[str(r.get("finish_reason"))] = reasons.get(str(r.get("finish_reason")), 0) + 1
    recorded = [r["tokens"]["completion"] for r in rows if isinstance(r.get("tokens"), dict) and "completion" in r["tokens"]]
    return {"count": len(rows), "splits": splits(rows), "duplicates": duplicates(rows, "completion"),
            "empty": sum(not t.strip() for t in texts), "finish_reasons": reasons,
            "hit_max_tokens": reasons.get("length", 0), "max_tokens": max_tokens,
            "chars": distribution([len(t) for t in texts]),
            # The teacher's own count (what it generated) when recorded; else our tokenizers'.
            "tokens": {"teacher_recorded": distribution(recorded)} if recorded else token_lengths(texts, toks)}


def system_prompt_size(prompt: str, toks: dict) -> dict:
    return {"chars": len(prompt), "tokens": {role: len(encode(t.tokenizer, prompt)) for role, t in toks.items()}}


def _is_teacher_file(path: Path) -> bool:
    if path.suffix != ".jsonl":
        return False
    first = next(iter_jsonl(path), None)
    return first is not None and "completion" in first[1]


def inspect_path(path: Path, config: str | None = None, json_path: Path | None = None) -> dict:
    """Describe `path`, print it, and write the JSON (+ PNG) where the docstring says."""
    if not path.exists():
        raise StageError(f"{path}: no such file or run dir")
    if path.is_dir():
        config = config or str(path)
        json_path = json_path or path / "inspect.json"
    cfg: RunConfig | None = load_config(config) if config else None
    notes = Report()
    toks = load_tokenizers(cfg, notes) if cfg else {}
    if cfg is None:
        notes.notes.append("no config given (--config): lengths in characters only")
    out: dict = {"path": str(path), "tokenizers": {role: t.tokenizer.name_or_path for role, t in toks.items()}}
    max_tokens = cfg.sampling.max_tokens if cfg else None
    queries: list[dict] | None = None
    answers: list[dict] | None = None
    if path.is_dir():
        out["kind"] = "run"
        queries, answers = read_jsonl(RunDir(path).queries), read_jsonl(RunDir(path).teacher)
        prompt = cfg.system_prompt
    elif _is_teacher_file(path):
        out["kind"] = "teacher"
        answers = read_jsonl(path)
        system = [m["content"] for m in answers[0].get("messages", []) if m.get("role") == "system"]
        prompt = cfg.system_prompt if cfg else (system[0] if system else None)
    else:
        out["kind"] = "queries"
        queries = load_queries(path)
        prompt = cfg.system_prompt if cfg else None
    if queries is not None:
        out["queries"] = describe_queries(queries, toks)
    if answers is not None:
        out["answers"] = describe_answers(answers, toks, max_tokens)
    if prompt is not None:
        out["system_prompt"] = system_prompt_size(prompt, toks)
    out["notes"] = notes.notes
    print(summary_text(out))
    if json_path is not None:
        png = json_path.with_name(json_path.stem + "_lengths.png")
        png.parent.mkdir(parents=True, exist_ok=True)
        panels = []
        if queries is not None:
            panels.append(("queries", [r["query"] for r in queries], None))
        if answers is not None:
            panels.append(("teacher answers", [str(r.get("completion", "")) for r in answers], max_tokens))
        if plot_lengths(panels, toks, png):
            out["histogram"] = str(png)
        atomic_write_json(json_path, out)
        print(f"wrote {json_path}" + (f" and {png}" if "histogram" in out else ""))
    return out


# --------------------------------------------------------------------------- printing


def _dist(d: dict, unit: str) -> str:
    if not d.get("n"):
        return "none"
    return f"median {d['p50']:g}, mean {d['mean']:g}, p90 {d['p90']:g}, min {d['min']:g}, max {d['max']:g} {unit}"


def _section(title: str, d: dict) -> list[str]:
    lines = [f"{title}: {d['count']}" + (f" ({', '.join(f'{k} {v}' for k, v in sorted(d['splits'].items()))})"
                                        if d["splits"] else "")]
    dup = d["duplicates"]
    lines.append(f"  duplicates: {len(dup['ids'])} repeated ids, {len(dup['texts'])} groups of identical texts"
                 + (f" (e.g. {', '.join(dup['texts'][0])})" if dup["texts"] else ""))
    lines.append(f"  length: {_dist(d['chars'], 'chars')}")
    for role, dist in d["tokens"].items():
        lines.append(f"  tokens ({role.replace('_', ' ')}): {_dist(dist, 'tokens')}")
    return lines


def summary_text(out: dict) -> str:
    lines = [f"{out['path']} ({out['kind']})"]
    if "system_prompt" in out:
        sp = out["system_prompt"]
        sizes = ", ".join(f"{n} {role} tokens" for role, n in sp["tokens"].items())
        lines.append(f"system prompt: {sp['chars']} chars" + (f", {sizes}" if sizes else ""))
    if "queries" in out:
        lines += _section("queries", out["queries"])
        if chats := out["queries"].get("conversations"):
            lines.append(f"  conversations: {chats['count']}, user turns {_dist(chats['user_turns'], '')}; "
                         f"{chats['answered_turns']} turns for the teacher to answer"
                         + (f"; {chats['carried_on_by_a_simulated_user']} carried on by a simulated user"
                            if chats["carried_on_by_a_simulated_user"] else ""))
    if "answers" in out:
        a = out["answers"]
        lines += _section("teacher answers", a)
        if a["count"]:
            cap = f"max_tokens={a['max_tokens']}" if a["max_tokens"] else "max_tokens"
            lines.append(f"  hit {cap}: {a['hit_max_tokens']} of {a['count']} ({a['hit_max_tokens'] / a['count']:.0%}); "
                         f"empty: {a['empty']}; finish reasons: {a['finish_reasons']}")
    lines += [f"note: {n}" for n in out["notes"]]
    return "\n".join(lines)


# --------------------------------------------------------------------------- plot


def plot_lengths(panels: list[tuple[str, list[str], int | None]], toks: dict, png: Path) -> bool:
    """One histogram per (title, texts, max_tokens) panel, in teacher tokens where a tokenizer
    is loaded, else characters; False if matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    fig, axes = figure(len(panels))
    axes = np.atleast_1d(axes)
    role = "teacher" if "teacher" in toks else next(iter(toks), None)  # max_tokens counts teacher tokens
    for ax, (title, texts, cap) in zip(axes, panels):
        if role is not None:
            lengths, unit = [len(encode(toks[role].tokenizer, t)) for t in texts], f"{role} tokens"
        else:
            lengths, unit = [len(t) for t in texts], "characters"
        ax.hist(lengths, bins=30, color=COLORS["teacher" if "answers" in title else "student"])
        if cap and role is not None:
            ax.axvline(cap, color=COLORS["base"], linestyle="--", label=f"max_tokens {cap}")
            ax.legend(fontsize=8)
        ax.set_title(f"{title} ({len(texts)})", fontsize=10)
        ax.set_xlabel(unit)
    axes[0].set_ylabel("count")
    save(fig, png)
    return True
