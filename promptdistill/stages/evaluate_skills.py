"""eval's kept skills (kept_skills.py): the set's questions answered greedily by base and
student WITHOUT the prompt and by the teacher WITH it, through the models eval already holds,
each answer and its correctness kept in the run dir's skills.jsonl (so a script can
re-check them, bench/check_skills.py) and summarised for summary.json's `kept_skills`.

The teacher is a reference, not a ceiling: the question is whether the student lost what
the base could do, not whether it reaches the prompted model."""

from __future__ import annotations

import json

import numpy as np

from .. import kept_skills
from ..answerers import Models
from ..backends.base import SamplingParams
from ..rundir import RunDir, atomic_write_text, json_safe

SKILLS_FILE = "skills.jsonl"


def run(models: Models, run: RunDir, items: list[kept_skills.Item], n_boot: int) -> dict:
    """Answer, check, write skills.jsonl, and return the summary's kept_skills section."""
    greedy = SamplingParams(temperature=0, max_tokens=kept_skills.MAX_TOKENS)
    user = [[{"role": "user", "content": i.question}] for i in items]
    seeds = [0] * len(items)  # greedy: the seed draws nothing
    texts = {}
    for who in kept_skills.ANSWERERS:
        convs = [models.teacher.with_prompt(c) for c in user] if who == "teacher" else user
        texts[who] = [c.text for c in models.answer_all(who, convs, greedy, seeds, desc=f"eval: kept skills, {who}")]
    correct = {who: np.array([i.correct(t) for i, t in zip(items, texts[who])], dtype=float) for who in texts}
    rows = [{"question": i.question, "answers": list(i.answers), "category": i.category, "source": i.source,
             **{who: {"text": texts[who][k], "correct": bool(correct[who][k])} for who in texts}}
            for k, i in enumerate(items)]
    atomic_write_text(run.root / SKILLS_FILE, "".join(json.dumps(json_safe(r), ensure_ascii=False) + "\n" for r in rows))
    return kept_skills.summarise(correct, [i.category for i in items], n_boot)
