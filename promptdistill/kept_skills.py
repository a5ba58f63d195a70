"""Kept skills: did training without the prompt cost the student what the base model could
already do? Short questions with checkable answers (arithmetic, facts, spelling, unit
conversions, simple reasoning), each with its accepted answers as regular expressions, are
answered by base and student WITHOUT the prompt and by the teacher WITH it, greedily; an
answer is correct when any of its question's patterns occurs in it (case-insensitive).

The shipped set is `kept_skills.jsonl` beside this module (written for this project; its
items also carry an `example` answer and a `near_miss` the tests check the patterns on);
`eval.skills` names a user's own JSONL or CSV instead, or `none`. A bad row is an error
naming the file and line, raised before any model is loaded.

Pure: no model, no torch. The stage that asks the models is stages/evaluate_skills.py.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .rundir import StageError, iter_jsonl
from .scores import bootstrap_ci

BUILTIN = Path(__file__).with_name("kept_skills.jsonl")
ANSWERERS = ("base", "student", "teacher")  # base and student WITHOUT the prompt, the teacher WITH it
# A short answer's room: the questions ask for a number or a word. On the shipped set the base model
# scored 46.9% at 32 tokens and 46.2% with its answers cut at 24, which decode 14% fewer tokens.
MAX_TOKENS = 24


@dataclass(frozen=True)
class Item:
    question: str
    answers: tuple[str, ...]  # the accepted answers' patterns, as written
    category: str
    source: str  # file:line

    def correct(self, text: str) -> bool:
        return any(re.search(p, text, re.IGNORECASE) for p in self.answers)


def items_path(spec: str) -> Path | None:
    """The file `eval.skills` names: the shipped set for `builtin`, None for `none`."""
    return None if spec == "none" else BUILTIN if spec == "builtin" else Path(spec)


def load(spec: str) -> list[Item]:
    """The items `eval.skills` names, every row checked; a bad row is a StageError naming file and line."""
    path = items_path(spec)
    if path is None:
        return []
    if not path.is_file():
        raise StageError(f"eval.skills: {path} not found (use builtin, none, or a .jsonl/.csv file)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise StageError(f"eval.skills: {path}: not UTF-8 text (byte {e.start})") from None
    if path.suffix.lower() == ".csv":
        rows = _csv_rows(path, text)
    elif path.suffix.lower() == ".jsonl":
        rows = list(iter_jsonl(path))
    else:
        raise StageError(f"eval.skills: {path}: expected a .jsonl or .csv file")
    items = [_item(path, line, row) for line, row in rows]
    if not items:
        raise StageError(f"eval.skills: {path} holds no questions (use `none` to skip kept skills)")
    return items


def _csv_rows(path: Path, text: str) -> list[tuple[int, dict]]:
    """Rows of a CSV with a header (question, answers, optional category); several accepted
    patterns in one cell are separated by ` || `. Line numbers are the file's own."""
    reader = csv.DictReader(io.StringIO(text))
    missing = {"question", "answers"} - set(reader.fieldnames or [])
    if missing:
        raise StageError(f"{path}:1: the header needs the columns question and answers (missing: {', '.join(sorted(missing))})")
    rows = []
    for row in reader:
        if not any((v or "").strip() for v in row.values()):
            continue
        answers = row.get("answers") or ""
        rows.append((reader.line_num, {**row, "answers": [a.strip() for a in answers.split(" || ")] if answers.strip() else ""}))
    return rows


def _item(path: Path, line: int, row: dict) -> Item:
    where = f"{path}:{line}"
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise StageError(f"{where}: field question is missing or empty")
    answers = row.get("answers")
    patterns = [answers] if isinstance(answers, str) else answers
    if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) and p.strip() for p in patterns):
        raise StageError(f"{where}: field answers must be a pattern or a list of patterns, none of them empty")
    for p in patterns:
        try:
            compiled = re.compile(p, re.IGNORECASE)
        except re.error as e:
            raise StageError(f"{where}: field answers: invalid regular expression {p!r} ({e})") from None
        if compiled.search(""):
            raise StageError(f"{where}: field answers: {p!r} matches an empty answer, so every answer would pass")
    category = row.get("category") or "all"
    if not isinstance(category, str):
        raise StageError(f"{where}: field category must be text")
    return Item(question.strip(), tuple(patterns), category.strip() or "all", where)


def fingerprint_source(spec: str) -> str | None:
    """What eval's inputs hold of the set: its file's text (a changed item re-runs eval)."""
    path = items_path(spec)
    return path.read_text(encoding="utf-8") if path is not None and path.is_file() else None


def summarise(correct: dict[str, np.ndarray], categories: list[str], n_boot: int) -> dict:
    """The summary's kept_skills section from per-question 0/1 correctness of each answerer (same
    questions, same order): each accuracy with its 95% CI, student - base paired (the CI of the
    per-question differences), `lost` when that CI lies wholly below 0; overall and per category.
    Every CI comes from the same resamples (scores.bootstrap_ci, seed 0)."""
    cats = np.array(categories)
    out = _section(correct, n_boot)
    out["per_category"] = {c: _section({who: v[cats == c] for who, v in correct.items()}, n_boot)
                           for c in sorted(set(categories))}
    return out


def _section(correct: dict[str, np.ndarray], n_boot: int) -> dict:
    out = {}
    for who, values in correct.items():
        mean, lo, hi = bootstrap_ci(values, n_boot=n_boot)
        out[who] = {"accuracy": mean, "ci95": [lo, hi]}
    mean, lo, hi = bootstrap_ci(correct["student"] - correct["base"], n_boot=n_boot)
    out["student_minus_base"] = {"mean": mean, "ci95": [lo, hi]}
    out["lost"] = bool(hi < 0)
    out["n"] = int(len(correct["base"]))
    return out


def lost_categories(section: dict) -> list[str]:
    """The categories whose student - base CI lies wholly below 0."""
    return [c for c, s in section.get("per_category", {}).items() if s["lost"]]
