"""The verdict: one plain sentence on whether the distillation worked, from summary.json's
quality scores. Each score carries `can_tell` and `won`, decided by one paired rule
(scores.paired_verdicts, docs/summary.md "Paired rule"); this module only words them.
Pure: no model, no torch, so the report, `distill compare` and bench scripts can use it."""

from __future__ import annotations

import numpy as np

from .kept_skills import lost_categories

# The score the verdict leads with, first available and able to tell: fidelity asks the
# product's own question (does the student, without the prompt, predict what the prompted
# teacher predicts?); the others are evidence about parts of that behaviour.
PRIMARY = ("fidelity", "on_policy_fidelity", "own_history_fidelity", "label_agreement", "compliance", "likelihood", "persona",
           "similarity")
MEANING = {
    "fidelity": "without the prompt, its next-token distributions on the teacher's answers are that far of the way "
                "from the base model's to the prompted teacher's",
    "on_policy_fidelity": "on its own answers, its next-token distributions are that far of the way from the base "
                          "model's to the prompted teacher's",
    "own_history_fidelity": "carrying a conversation itself, its own earlier answers as the history, its next-token "
                            "distributions are that far of the way from the base model's to the prompted teacher's",
    "label_agreement": "it gives the prompted teacher's label (right or wrong) that far of the way from the base model "
                       "to the teacher answering again",
    "compliance": "it follows the prompt's checkable rules that far of the way from the base model to the teacher",
    "likelihood": "it predicts the teacher's sampled answers that far of the way from the base model to the "
                  "prompted model",
    "persona": "a classifier calls that share of its answers teacher-style, between the base's share and the teacher's",
    "similarity": "its answers mean that much the same as the teacher's, between the base's and the teacher's "
                  "answering again",
}
MUTE = "the paired 95% CI of ceiling - base includes 0"  # why a score cannot tell, in the verdict's words


def tells(q: dict) -> bool:
    """Whether a score of a summary.json can tell, as eval recorded it; a summary older than the
    flag counts every score as telling, as it was shown then."""
    return q.get("can_tell") is not False


def by_turn_words(q: dict) -> str:
    """'; by turn: 1 81%, 2 64%, 3+ 36%, weakest at turn 3+' for a score scored per turn, else ''."""
    by = {t: s["retained"]["mean"] for t, s in q.get("per_turn", {}).items()
          if s["retained"]["mean"] is not None and np.isfinite(s["retained"]["mean"])}
    if len(by) < 2:
        return ""
    return f"; by turn: {', '.join(f'{t} {v:.0%}' for t, v in by.items())}, weakest at turn {min(by, key=by.get)}"


def skills_warning(summary: dict) -> str:
    """' Warning: ...' when the student lost skills the base had (kept_skills: the paired CI of
    student - base wholly below 0, overall or in a category), with the figures of what was lost
    first: a category can be lost while the whole set is kept, or even gained; else ''."""
    ks = summary.get("kept_skills")
    if not ks:
        return ""
    lost = lost_categories(ks)
    if not ks["lost"] and not lost:
        return ""

    def figures(s: dict) -> str:
        d = s["student_minus_base"]
        return (f"accuracy {s['student']['accuracy']:.0%} against the base's {s['base']['accuracy']:.0%}, "
                f"student - base {d['mean']:+.0%} (95% CI {d['ci95'][0]:+.0%} to {d['ci95'][1]:+.0%}, n={s['n']})")

    parts = ([f"over the whole set, {figures(ks)}"] if ks["lost"] else []) + [f"in {c}, {figures(ks['per_category'][c])}"
                                                                             for c in lost]
    if not ks["lost"]:  # a category lost while the whole set is kept: the whole set's figures beside it
        parts.append(f"over the whole set (not lost), {figures(ks)}")
    return f" Warning: the student lost skills the base model had: {'; '.join(parts)}."


def verdict(summary: dict) -> str:
    """One plain sentence on whether it worked, led by the primary score, counting only the
    scores that can tell on this run; the others are named as such; then a warning when the
    student lost skills the base had (skills_warning)."""
    return _quality_verdict(summary) + skills_warning(summary)


def _quality_verdict(summary: dict) -> str:
    quality = summary["quality"]
    told = [n for n in PRIMARY if n in quality and quality[n]["can_tell"]]
    told += [n for n in quality if quality[n]["can_tell"] and n not in told]
    mute = [n for n in quality if not quality[n]["can_tell"]]
    tail = f"; cannot tell on this run: {', '.join(mute)} ({MUTE}), left out" if mute else ""
    tokens = f"; it reads {summary['tokens']['input_reduction_pct']:.0f}% fewer input tokens per query."
    if not told:
        return "No score can tell on this run whether the distillation worked (every ceiling is within noise of its base)" + tail + tokens
    primary, others = told[0], told[1:]
    r = quality[primary]["retained"]
    lead = f"{primary} retained {r['mean']:.0%} (95% CI {r['ci95'][0]:.0%} to {r['ci95'][1]:.0%}): {MEANING.get(primary, '')}"
    lead += by_turn_words(quality[primary])
    won = [n for n in others if quality[n]["won"]]
    lost = [n for n in others if not quality[n]["won"]]
    if quality[primary]["won"]:
        head = ("The distillation worked" if not lost else
                f"The distillation partly worked: it beats the base clearly on {primary}{''.join(', ' + n for n in won)}, "
                f"not on {', '.join(lost)}")
    else:
        head = "The distillation did not work: on the primary score the student is not clearly closer to the prompted teacher than the base model"
        if won:
            head += f" (it beats the base on {', '.join(won)} only, which does not show it took on the prompt's behaviour)"
    return f"{head}; {lead}{tail}{tokens}"
