"""An LLM judge (`eval.judge`): which of two answers follows the system prompt better?

For each test query the judge sees the system prompt, the query and two answers, the
teacher's and a candidate's (the student's, then the base's), in a random order seeded
by the query; then it is asked again with the order swapped, so its position bias shows
and cancels. Each ask is a row of judge.jsonl: the order, the raw reply, the parsed
verdict (A, B, tie, or null when the reply names none) and what it means for the
candidate (win, tie, loss). A reply that cannot be parsed, or a request that failed, is
a row with a null verdict, never a crash.

The summary per candidate: its win-or-tie rate against the teacher over the parsed asks
(a per-query mean, bootstrap 95% CI over queries), and the judge's self-agreement: the
share of queries whose two asks, both parsed, say the same about the candidate.
Calls go through the OpenAI backend, so any OpenAI-compatible server can judge.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np

from . import scores
from .backends import make_sampler
from .backends.base import SamplingParams
from .config import JudgeConfig, RunConfig
from .rundir import RunDir, atomic_write_text, json_safe

DEFAULT_RUBRIC = Path(__file__).with_name("judge_rubric.md")
JUDGE_FILE = "judge.jsonl"
CANDIDATES = ("student", "base")

# What a reply may say, strongest first: "Verdict: B"; a reply that is just "A" / "B." / "Tie";
# "Answer A is better"; a tie in words.
_VERDICT_LINE = re.compile(r"verdict\s*[:=\-]?\s*\**\s*(answer\s+)?(A|B|tie)\b", re.IGNORECASE)
_BARE = re.compile(r"^\W*(A|B|tie)\W*$", re.IGNORECASE)
_BARE_FIRST = re.compile(r"^\W*(A|B)(?:[.:),\-]|\s+(?:is|was)\b)", re.IGNORECASE)  # "B) ...", "A. ...", not "A pirate"
_NAMED = re.compile(r"\b(?i:answer|response|option)\s+\**(A|B)\b")  # the letter in capitals: "option a" is not one
_BETTER = re.compile(r"\b(?:answer|response|option)\s+\**(A|B)\**\s+(?:is|was)\s+(?:much\s+|clearly\s+|slightly\s+)?"
                     r"(?:better|the better|preferable|more faithful|closer)", re.IGNORECASE)
_TIE = re.compile(r"\b(tie|equally|both (?:answers )?(?:are )?(?:equally )?(?:good|bad|fine)|neither)\b", re.IGNORECASE)


def parse_verdict(reply: str) -> str | None:
    """'A', 'B', 'tie' or None (the reply names no verdict, or names both without preferring one)."""
    text = reply.strip()
    m = _VERDICT_LINE.search(text)
    if m:
        return m.group(2).upper() if m.group(2).lower() != "tie" else "tie"
    first = text.splitlines()[0] if text else ""
    m = _BARE.match(first) or _BARE_FIRST.match(first)
    if m:
        return m.group(1).upper() if m.group(1).lower() != "tie" else "tie"
    m = _BETTER.search(text)
    if m:
        return m.group(1).upper()
    named = {x.upper() for x in _NAMED.findall(text)}
    if len(named) == 1:
        return named.pop()
    if _TIE.search(text):
        return "tie"
    return None


def outcome(verdict: str | None, candidate_is: str) -> str | None:
    """What a verdict means for the candidate placed at `candidate_is` ('A' or 'B')."""
    if verdict is None:
        return None
    if verdict == "tie":
        return "tie"
    return "win" if verdict == candidate_is else "loss"


def judge_messages(rubric: str, system_prompt: str, query: str, a: str, b: str) -> list[dict]:
    user = (f"System prompt:\n<<<\n{system_prompt}\n>>>\n\nQuery:\n<<<\n{query}\n>>>\n\n"
            f"Answer A:\n<<<\n{a}\n>>>\n\nAnswer B:\n<<<\n{b}\n>>>\n\n"
            "Which answer follows the system prompt better? Reply with one line: Verdict: A, Verdict: B or Verdict: tie.")
    return [{"role": "system", "content": rubric}, {"role": "user", "content": user}]


def asks(test: list[dict], texts: dict[str, list[str]], seed: int) -> list[dict]:
    """Two asks per (query, candidate): a seeded random order, then the same pair swapped."""
    out = []
    for i, r in enumerate(test):
        for cand in CANDIDATES:
            first = random.Random(f"{seed}:{r['id']}:{cand}").choice("AB")  # where the candidate goes first
            for ask, pos in ((1, first), (2, "B" if first == "A" else "A")):
                out.append({"id": r["id"], "candidate": cand, "ask": ask, "candidate_is": pos,
                            "query": r["query"], "candidate_answer": texts[cand][i], "teacher_answer": r["teacher"]})
    return out


def tally(rows: list[dict], n_boot: int) -> dict:
    """Per candidate: win/tie/loss/unparsed counts, win-or-tie rate with its CI over
    queries, self-agreement under swapping, and how often position A was chosen."""
    out = {}
    for cand in CANDIDATES:
        mine = [r for r in rows if r["candidate"] == cand]
        by_query: dict[str, list[str | None]] = {}
        for r in mine:
            by_query.setdefault(r["id"], []).append(r["outcome"])
        per_query = [np.mean([o in ("win", "tie") for o in os if o]) for os in by_query.values() if any(os)]
        mean, lo, hi = scores.bootstrap_ci(np.array(per_query), n_boot=n_boot)
        both = [os for os in by_query.values() if len(os) == 2 and all(os)]
        named = [r for r in mine if r["verdict"] in ("A", "B")]
        counts = {k: sum(r["outcome"] == k for r in mine) for k in ("win", "tie", "loss")}
        out[cand] = {"win_or_tie": {"mean": mean, "ci95": [lo, hi]}, "queries": len(per_query),
                     **counts, "unparsed": sum(r["outcome"] is None for r in mine), "asks": len(mine),
                     "self_agreement": (float(np.mean([a == b for a, b in both])) if both else None),
                     "self_agreement_n": len(both),
                     "chose_position_a": (float(np.mean([r["verdict"] == "A" for r in named])) if named else None)}
    return out


def run(cfg: RunConfig, run_dir: RunDir, test: list[dict], texts: dict[str, list[str]]) -> dict:
    """Judge every test query's student and base answers against the teacher's; writes
    judge.jsonl and returns summary.json's "judge" section."""
    j: JudgeConfig = cfg.eval.judge
    rubric = Path(j.rubric_file or DEFAULT_RUBRIC).read_text(encoding="utf-8")
    todo = asks(test, texts, j.seed)
    convs = []
    for a in todo:
        pair = (a["candidate_answer"], a["teacher_answer"])
        convs.append(judge_messages(rubric, cfg.system_prompt, a["query"], *(pair if a["candidate_is"] == "A" else pair[::-1])))
    sampler = make_sampler(j.model, len(convs))
    params = SamplingParams(temperature=0, max_tokens=j.max_tokens, seed=j.seed)
    replies = sampler.sample(convs, params, [j.seed] * len(convs))
    rows = []
    for a, c in zip(todo, replies):
        verdict = parse_verdict(c.text) if c.finish_reason != "error" else None
        rows.append({"id": a["id"], "candidate": a["candidate"], "ask": a["ask"], "candidate_is": a["candidate_is"],
                     "reply": c.text, "verdict": verdict, "outcome": outcome(verdict, a["candidate_is"]),
                     **({"error": c.error} if c.finish_reason == "error" else {})})
    atomic_write_text(run_dir.root / JUDGE_FILE, "".join(json.dumps(json_safe(r), ensure_ascii=False) + "\n" for r in rows))
    return {"model": j.model.served_name, "rubric": str(j.rubric_file or DEFAULT_RUBRIC.name),
            **tally(rows, cfg.eval.bootstrap)}

