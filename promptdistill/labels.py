"""Label checks: a task prompt whose answer ends in a label from a fixed set ("Final Answer: fr"),
parsed from the answer text, and eval's label agreement.

`checks.labels` gives a regex with one capture group (the label) and the allowed labels. An
answer's label is the group of the pattern's LAST match in it: a model that restates or corrects
itself ends with its conclusion, the one a caller reading the answer would act on. An answer
with no match, or whose label is not allowed, has no label (a parse failure, counted by kind).
Everything is validated when the config loads, so a bad pattern is an error naming the field.

Label agreement asks whether an answerer gives the TEACHER's label, right or wrong: it has power
even with a weak teacher, and needs no true labels. Pure: no model.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .scores import summarise

# What stops an answer having a label: the pattern does not occur, or its group is not allowed.
NO_MATCH, NOT_ALLOWED = "no_match", "not_allowed"
AGAINST = ("teacher_again", "student", "base")  # the answerers compared with the teacher's label


class LabelCheck(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    pattern: str = Field(description="a regex with one capture group, the label; searched in the answer, the last "
                                     "match counts, e.g. 'Final Answer:\\s*([a-z]{2})'")
    allowed: list[str] = Field(min_length=2, description="the labels an answer may give; any other is a parse failure")
    case_sensitive: bool = Field(False, description="match the pattern and compare labels with case; else both "
                                                    "ignore it and labels are reported in lower case")

    @field_validator("allowed")
    @classmethod
    def _distinct_labels(cls, allowed: list[str]) -> list[str]:
        if not all(isinstance(a, str) and a.strip() for a in allowed):
            raise ValueError("every allowed label must be a non-empty string")
        twice = sorted({a for a in allowed if allowed.count(a) > 1})
        if twice:
            raise ValueError(f"{twice[0]!r} is listed twice")
        return allowed

    @model_validator(mode="after")
    def _one_group(self) -> "LabelCheck":
        try:
            compiled = re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"pattern is not a valid regex ({e}): {self.pattern!r}") from None
        if compiled.groups != 1:
            raise ValueError(f"pattern needs exactly one capture group, the label (it has {compiled.groups}; "
                             f"write other groups as (?:...)): {self.pattern!r}")
        if not self.case_sensitive and len({a.casefold() for a in self.allowed}) < len(self.allowed):
            raise ValueError("allowed: two labels differ only in case; set case_sensitive: true to tell them apart")
        return self

    def parse(self, answer: str) -> tuple[str | None, str | None]:
        """(label, None), or (None, NO_MATCH | NOT_ALLOWED) for an answer without one."""
        flags = 0 if self.case_sensitive else re.IGNORECASE
        matches = list(re.finditer(self.pattern, answer, flags))
        if not matches:
            return None, NO_MATCH
        label = (matches[-1].group(1) or "").strip()
        if not self.case_sensitive:
            label = label.casefold()
        allowed = self.allowed if self.case_sensitive else [a.casefold() for a in self.allowed]
        return (label, None) if label in allowed else (None, NOT_ALLOWED)


def agreement_values(teacher: list[str | None], other: list[str | None]) -> np.ndarray:
    """Per query: 1 when `other` gives the teacher's label, 0 when it gives another or none
    (a parse failure disagrees), nan where the teacher gave none (nothing to agree with)."""
    return np.array([np.nan if t is None else float(o == t) for t, o in zip(teacher, other)])


def agreement(check: LabelCheck, answers: dict[str, list[str]], n_boot: int,
              groups: np.ndarray | None = None) -> tuple[dict, dict, list[dict]]:
    """Eval's label agreement: `answers` holds the test answers of teacher (teacher.jsonl's, the
    reference), teacher_again, student and base. Returns (the score in scores.summarise's shape:
    per query whether the answerer's label equals the teacher's, floor base, ceiling the teacher
    answering again; summary.json's `labels` section: parse failures by kind, label counts and
    agreement per answerer; per query, each answerer's label and failure)."""
    parsed = {who: [check.parse(a) for a in texts] for who, texts in answers.items()}
    label = {who: [p[0] for p in ps] for who, ps in parsed.items()}
    agree = {who: agreement_values(label["teacher"], label[who]) for who in AGAINST}
    score = summarise(agree["student"], agree["base"], agree["teacher_again"], n_boot, groups) | {"ceiling_is": "teacher_again"}
    given = Counter(t for t in label["teacher"] if t is not None)
    majority, count = given.most_common(1)[0] if given else (None, 0)
    section = {"pattern": check.pattern, "allowed": check.allowed,
               "teacher_labelled": sum(given.values()), "n": len(label["teacher"]),
               # what an answerer always giving the teacher's commonest label would agree: a skewed
               # teacher makes agreement cheap, and this says how cheap
               "teacher_majority": {"label": majority, "agreement": count / sum(given.values()) if given else None},
               "answerers": {who: {"labelled": sum(p[0] is not None for p in ps),
                                   "parse_failures": {kind: sum(p[1] == kind for p in ps) for kind in (NO_MATCH, NOT_ALLOWED)},
                                   "labels": dict(Counter(p[0] for p in ps if p[0] is not None).most_common())}
                             for who, ps in parsed.items()}}
    rows = [{"labels": {who: label[who][i] for who in parsed},
             "label_agreement": {who: None if np.isnan(agree[who][i]) else int(agree[who][i]) for who in AGAINST},
             **({"label_failures": fails} if (fails := {who: ps[i][1] for who, ps in parsed.items() if ps[i][1]}) else {})}
            for i in range(len(label["teacher"]))]
    return score, section, rows
