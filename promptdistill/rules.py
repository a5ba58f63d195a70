"""Rule checks: what the system prompt demands of an answer, checked on its text.

A rule (`checks.rules` in the config) is declarative: a name, a kind, a value, and an
optional `applies_to` pattern on the query (e.g. only questions about injuries). Each
kind is one small function on the answer text; `outcomes` says, per rule, passed (True),
failed (False) or does not apply (None). Everything is validated when the config loads,
so a bad regex or an unknown kind is an error naming the field, never a crash mid-run.

Used by generate (best-of-N selection of the teacher's answers), validate (a rule the
teacher data rarely follows cannot be learnt) and eval (compliance per rule and overall).
"""

from __future__ import annotations

import re
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .scores import bootstrap_ci, summarise

TEXT_KINDS = ("ends_with", "starts_with", "contains", "not_contains")
REGEX_KINDS = ("regex", "not_regex")
COUNT_KINDS = ("max_sentences", "max_words")
KINDS = TEXT_KINDS + REGEX_KINDS + COUNT_KINDS + ("no_emoji", "forbidden_words")

# A sentence ends at . ! or ? (runs of them, and closing quotes or brackets) followed by
# whitespace or the end; "e.g." or "3.5" may split wrongly, a price paid for having no model.
SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)")
# Pictographs, dingbats, flags, variation selector and zero-width joiner: what renders as emoji.
EMOJI = re.compile("[\U0001F000-\U0001FAFF\U00002600-\U000027BF\U0001F1E6-\U0001F1FF\U00002B00-\U00002BFF"
                   "\U0000FE0F\U0000200D\U00003030\U0000303D\U00003297\U00003299]")


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str = Field(min_length=1, description="what reports call it, e.g. sign_off")
    kind: Literal[KINDS] = Field(description=", ".join(KINDS))
    value: str | list[str] | int | None = Field(
        None, description="the text (or list: any of them) for ends_with/starts_with/contains, none of them for "
                          "not_contains; a pattern for regex/not_regex; a number for max_sentences/max_words; "
                          "the words for forbidden_words; unused by no_emoji")
    applies_to: str | None = Field(None, description="a regex on the query (searched, case-insensitive); "
                                                     "unset: every query")
    case_sensitive: bool = Field(False, description="text, regex and word kinds: match case exactly")

    @model_validator(mode="after")
    def _value_fits_kind(self) -> "Rule":
        v, k = self.value, self.kind
        if k in COUNT_KINDS:
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"rule {self.name!r}: {k} needs value: a whole number >= 1")
        elif k == "no_emoji":
            if v is not None:
                raise ValueError(f"rule {self.name!r}: no_emoji takes no value")
        else:
            texts = [v] if isinstance(v, str) else v
            if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
                raise ValueError(f"rule {self.name!r}: {k} needs value: a non-empty string or list of strings")
            if k in REGEX_KINDS:
                for t in texts:
                    _compile(t, self, "value")
        if self.applies_to is not None:
            _compile(self.applies_to, self, "applies_to", flags=re.IGNORECASE)
        return self

    @property
    def texts(self) -> list[str]:
        return [self.value] if isinstance(self.value, str) else list(self.value or [])


def _compile(pattern: str, rule: Rule, field: str, flags: int = 0) -> re.Pattern:
    try:
        return re.compile(pattern, flags)
    except re.error as e:
        raise ValueError(f"rule {rule.name!r}: {field} is not a valid regex ({e}): {pattern!r}") from None


def _fold(text: str, rule: Rule) -> str:
    return text if rule.case_sensitive else text.casefold()


def count_sentences(text: str) -> int:
    """Sentences in `text`; trailing words without an end mark count as one more."""
    text = text.strip()
    if not text:
        return 0
    ends = list(SENTENCE_END.finditer(text))
    tail = text[ends[-1].end():].strip() if ends else text
    return len(ends) + bool(tail)


def passes(rule: Rule, answer: str) -> bool:
    """Does `answer` follow `rule` (whether the rule applies to its query is `applies`'s business)?"""
    k = rule.kind
    if k in ("ends_with", "starts_with", "contains", "not_contains"):
        text, wanted = _fold(answer.strip(), rule), [_fold(t, rule) for t in rule.texts]
        if k == "ends_with":
            return any(text.endswith(w) for w in wanted)
        if k == "starts_with":
            return any(text.startswith(w) for w in wanted)
        found = any(w in text for w in wanted)
        return found if k == "contains" else not found
    if k in REGEX_KINDS:
        flags = 0 if rule.case_sensitive else re.IGNORECASE
        found = any(re.search(p, answer, flags) for p in rule.texts)
        return found if k == "regex" else not found
    if k == "max_sentences":
        return count_sentences(answer) <= rule.value
    if k == "max_words":
        return len(answer.split()) <= rule.value
    if k == "no_emoji":
        return EMOJI.search(answer) is None
    # forbidden_words: whole words only ("color" is forbidden, "colorado" is not)
    flags = 0 if rule.case_sensitive else re.IGNORECASE
    return not any(re.search(rf"\b{re.escape(w)}\b", answer, flags) for w in rule.texts)


def applies(rule: Rule, query: str) -> bool:
    return rule.applies_to is None or re.search(rule.applies_to, query, re.IGNORECASE) is not None


def outcomes(rules: list[Rule], query: str, answer: str) -> dict[str, bool | None]:
    """Per rule: True passed, False failed, None does not apply to this query."""
    return {r.name: (passes(r, answer) if applies(r, query) else None) for r in rules}


def failed(rules: list[Rule], query: str, answer: str) -> list[str]:
    """The names of the applicable rules `answer` breaks."""
    return [name for name, ok in outcomes(rules, query, answer).items() if ok is False]


def pass_matrix(rules: list[Rule], queries: list[str], answers: list[str]) -> np.ndarray:
    """(queries x rules): 1 passed, 0 failed, nan does not apply."""
    out = np.full((len(queries), len(rules)), np.nan)
    for i, (q, a) in enumerate(zip(queries, answers)):
        for j, ok in enumerate(outcomes(rules, q, a).values()):
            if ok is not None:
                out[i, j] = float(ok)
    return out


def per_query_compliance(matrix: np.ndarray) -> np.ndarray:
    """Share of the applicable rules each answer follows; nan where none applies."""
    applicable = ~np.isnan(matrix)
    with np.errstate(invalid="ignore"):
        return np.where(applicable.any(axis=1), np.nansum(matrix, axis=1) / applicable.sum(axis=1), np.nan)


def pass_rates(rules: list[Rule], queries: list[str], answers: list[str]) -> dict[str, dict]:
    """Per rule: how many queries it applies to and the share of those answers passing it."""
    m = pass_matrix(rules, queries, answers)
    out = {}
    for j, r in enumerate(rules):
        col = m[:, j][~np.isnan(m[:, j])]
        out[r.name] = {"applies": int(col.size), "pass_rate": float(col.mean()) if col.size else None}
    return out


# A rule the teacher follows at least this often is one the student should learn; the
# student "reaches" it when its pass rate is at least REACH of the teacher's.
TEACHABLE, REACH = 0.5, 0.7


def compliance(rule_list: list[Rule], queries: list[str], answers: dict[str, list[str]],
               n_boot: int, groups: np.ndarray | None = None) -> tuple[dict, dict, list[dict]]:
    """Eval's compliance: `answers` holds the test answers of teacher, teacher_again,
    student and base. Returns (the overall score in scores.summarise's shape: per query
    the share of applicable rules followed, floor base, ceiling the teacher's answers in
    teacher.jsonl, i.e. the data the student learnt from, selected when best_of is on;
    per-rule figures; per query, the rules each answer breaks). With `groups` (the test
    answers' conversations) the scores resample whole conversations, as every score does."""

    m = {who: pass_matrix(rule_list, queries, texts) for who, texts in answers.items()}
    overall = summarise(*(per_query_compliance(m[who]) for who in ("student", "base", "teacher")), n_boot, groups)
    overall["ceiling_is"] = "teacher"
    per_rule = {}
    for j, r in enumerate(rule_list):
        s = summarise(m["student"][:, j], m["base"][:, j], m["teacher"][:, j], n_boot, groups)
        col = m["teacher_again"][:, j]
        mean, lo, hi = bootstrap_ci(col[~np.isnan(col)], n_boot=n_boot)
        teacher, student = s["ceiling"]["mean"], s["student"]["mean"]
        reach = student / teacher if s["n"] and teacher > 0 else None
        per_rule[r.name] = {"kind": r.kind, "applies": s["n"], "teacher": s["ceiling"],
                            "teacher_again": {"mean": mean, "ci95": [lo, hi]}, "student": s["student"],
                            "base": s["base"], "retained": s["retained"], "can_tell": s["can_tell"], "reach": reach,
                            # judged only where the teacher data shows the rule often enough to learn it
                            "transferred": (reach >= REACH) if s["n"] and teacher >= TEACHABLE else None}
    failures = [{who: [r.name for j, r in enumerate(rule_list) if m[who][i, j] == 0] for who in m}
                for i in range(len(queries))]
    return overall, per_rule, failures
