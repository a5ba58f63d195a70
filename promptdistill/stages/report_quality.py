"""report.md's sections on quality: every score with its paired CIs and verdict (retained shown
only where the score can tell), the scores per turn of a conversation, and per rule of
checks.rules, the labels of checks.labels. Pure text from summary.json, as the rest of the report."""

from __future__ import annotations

from ..formatting import NA, finite, lookup, mean_ci, num, pct, pct_ci, table
from ..verdict import tells
from .report_plots import TURNS_PLOT, scored_by_turn

# What each quality score measures, what its floor and ceiling are, and its direction.
SCORES = {
    "fidelity": ("mean forward KL(teacher WITH the prompt || model WITHOUT it) per token of the teacher's held-out answers",
                 "0, the prompted teacher itself", "lower"),
    "on_policy_fidelity": ("mean reverse KL(model WITHOUT the prompt || teacher WITH it) per token of the model's own "
                           "answers, sampled as it will be served", "0, the prompted teacher itself", "lower"),
    "own_history_fidelity": ("the same on test conversations the model carries itself, turn by turn, its own earlier "
                             "answers as the history (the teacher scoring WITH the prompt after that history)",
                             "0, the prompted teacher itself", "lower"),
    "similarity": ("cosine similarity of MiniLM sentence embeddings to the teacher's answer",
                   "the teacher answering again (another seed)", "higher"),
    "likelihood": ("mean negative log-likelihood per token of the teacher's answer under the student model",
                   "the base model WITH the system prompt", "lower"),
    "persona": ("share of answers a classifier calls teacher-style (vs base-style)",
                "the teacher answering again (another seed)", "higher"),
    "label_agreement": ("share of test inputs whose answer gives the teacher's label (checks.labels), right or wrong; "
                        "an answer without a label disagrees", "the teacher answering again (another seed)", "higher"),
}


def quality_section(summary: dict, plot: bool) -> list[str]:
    quality = summary.get("quality") or {}
    md = ["## Quality", "",
          "Quality retained = (student - base) / (ceiling - base), per score: 0% means the student is no closer to "
          "the prompted teacher than the untouched base model (the distillation failed), 100% means it is as close "
          "as the teacher is to itself (the ceiling). Below 0% the student got worse than the base, above 100% it "
          "beat the ceiling. Means with bootstrap 95% CIs in brackets.", ""]
    rows = []
    for name, q in quality.items():
        better = SCORES.get(name, ("", "", ""))[2]
        check = ""
        clf = q.get("classifier")
        if clf:
            check = (f"classifier held-out accuracy {pct(clf.get('heldout_accuracy'))} on {clf.get('heldout_n', NA)} answers "
                     f"(trained on {clf.get('train_n', NA)})")
        if q.get("source"):
            check = f"from the {q['source']}"
        rows.append([name, better + " = closer" if better else NA, mean_ci(q.get("base")), mean_ci(q.get("student")),
                     mean_ci(q.get("ceiling")), mean_ci(q.get("student_minus_base")), mean_ci(q.get("ceiling_minus_base")),
                     pct_ci(q.get("retained")) if tells(q) else "cannot tell", q.get("n", NA), paired_verdict(q), check])
    md += table(["Score", "Direction", "Base", "Student", "Ceiling", "Student - base", "Ceiling - base",
                 "Quality retained", "n", "Verdict", "Check"], rows)
    md += ["", "Student - base and ceiling - base are means of the per-query differences, with 95% CIs from the same "
           "resamples of queries (paired: every answerer is scored on the same queries). One rule for every score: it "
           "**can tell** when the CI of ceiling - base excludes 0, and the student has **won** it when the CI of "
           "student - base excludes 0 on the ceiling's side. A score that cannot tell is left out of the verdict and "
           "gets no retained share: its denominator is within noise of 0.", ""]
    for name in quality:
        if name in SCORES:
            what, ceiling, _ = SCORES[name]
            md.append(f"- **{name}**: {what}; ceiling = {ceiling}.")
    acc = lookup(quality, "persona", "classifier", "heldout_accuracy")
    if finite(acc) and acc < 0.7:
        md.append(f"- The persona classifier is only {pct(acc)} accurate on held-out answers (50% = chance): "
                  "the two styles are hard to tell apart, so the persona score means little.")
    md += [""]
    if plot:
        md += ["![Quality retained per score, with 95% CIs](quality.png)", ""]
    return md + turns_section(summary, plot)


def paired_verdict(q: dict) -> str:
    """The paired rule's outcome for one score, in the Quality table's words."""
    if not tells(q):
        return "**cannot tell on this run**"
    return {True: "won", False: "not clearly better than base"}.get(q.get("won"), NA)


def turns_section(summary: dict, plot: bool) -> list[str]:
    """The scores measured per turn of a conversation: what the student keeps as a chat goes on."""
    by_turn = scored_by_turn(summary)
    if not by_turn:
        return []
    rows = [[name, turn, q.get("n", NA), mean_ci(q.get("base")), mean_ci(q.get("student")),
             pct_ci(q.get("retained")) if tells(q) else "cannot tell"] for name, turns in by_turn.items() for turn, q in turns.items()]
    md = ["### By turn of the conversation", "",
          "The same scores on the test answers at each turn of a conversation (3+: the third and later), each after "
          "the conversation so far with the teacher's own earlier answers. The base model reads that in-character "
          "history too, so it closes in on the teacher by itself as a chat goes on: what is retained at a later turn "
          "is what the student adds beyond it. Over all turns, the CIs above resample whole conversations.", ""]
    md += table(["Score", "Turn", "n", "Base", "Student", "Quality retained"], rows) + [""]
    if plot:
        md += [f"![Quality retained by turn, with 95% CIs]({TURNS_PLOT})", ""]
    return md + weightiest_section(by_turn.get("fidelity", {}))


def weightiest_section(turns: dict) -> list[str]:
    """Per turn, the test answer fidelity's retained rests on most (eval's `weightiest`)."""
    rows = []
    for turn, q in turns.items():
        w = q.get("weightiest")
        if not w:
            continue
        token = w.get("token") or {}
        rows.append([turn, f"`{w['id']}`", f"{num(w['student'])} / {num(w['base'])}", pct(w["student_share"]),
                     f"{num(token.get('kl'), '.1f')}: `…{token.get('before', '').strip()}` → `{token.get('token', '')}`"
                     if token else NA, pct_ci(q.get("retained")), pct(w["retained_without"])])
    if not rows:
        return []
    return ["A turn's fidelity retained is 1 - (the student's summed KL) / (the base's) over that turn's answers, and "
            "at later turns the base's KL is small, so one answer the student gets badly wrong can carry a turn. Per "
            "turn, the answer whose leaving out moves retained most: its KL (student / base), its share of the "
            "student's KL at that turn, its token of largest KL (the text before it → the teacher's token), and "
            "retained without it. A reading aid: the score above counts every answer.", ""] + table(
        ["Turn", "Answer", "KL student / base", "Share of the student's KL", "Largest token", "Retained",
         "Retained without it"], rows) + [""]


def compliance_section(summary: dict) -> list[str]:
    """Per rule of checks.rules: who follows it on the test queries it applies to, and
    what best-of-N selection did to the teacher data; nothing without rules."""
    c = summary.get("compliance")
    if not c:
        return []
    md = ["## Rule compliance", "",
          "Each rule of `checks.rules`, checked on the answer text: the share of answers following it, on the test "
          "queries it applies to (95% CIs). Teacher = its answers in teacher.jsonl (the data the student learnt from, "
          "chosen by best-of-N when `sampling.best_of` is on) and the ceiling; teacher again = one fresh draw. "
          "Reach = student / teacher; a rule the teacher follows at least half the time has transferred when the "
          "reach is at least 70%. Retained is shown where the rule can tell (docs/summary.md, paired rule).", ""]
    rows = [[name, r["kind"], r["applies"], pct_ci(r["teacher"]), pct_ci(r["teacher_again"]), pct_ci(r["student"]),
             pct_ci(r["base"]), pct_ci(r["retained"]) if tells(r) else "cannot tell", pct(r["reach"]),
             {True: "yes", False: "**missed**", None: "not judged"}[r["transferred"]]] for name, r in c["rules"].items()]
    md += table(["Rule", "Kind", "Applies", "Teacher", "Teacher again", "Student", "Base", "Retained", "Reach",
                 "Transferred"], rows) + [""]
    data = c.get("teacher_data")
    if data:
        md += [f"Teacher data: all {data['answers']} answers of teacher.jsonl, {data['tries_drawn']} tries drawn; "
               f"{data['all_pass']['first_try']} first tries and {data['all_pass']['kept']} kept answers follow every "
               "rule that applies.", ""]
        md += table(["Rule", "Applies", "First try", "Kept"],
                    [[n, r["applies"], pct(r["first_try"]), pct(r["kept"])] for n, r in data["rules"].items()]) + [""]
    return md


def labels_section(summary: dict) -> list[str]:
    """With checks.labels: how often each answerer gave a label at all, why not (parse failures by
    kind), the labels it gave, and what always giving the teacher's commonest label would agree."""
    lab = summary.get("labels")
    if not lab:
        return []
    md = ["## Labels", "",
          f"Each answer's label is the capture group of the last match of `{lab['pattern']}`; allowed: "
          f"{', '.join(lab['allowed'])}. A parse failure (no match, or a label not allowed) counts as disagreement. "
          f"The teacher's answers in teacher.jsonl, the reference, gave a label on {lab['teacher_labelled']} of "
          f"{lab['n']} test inputs; agreement is over those.", ""]
    rows = [[who, f"{a['labelled']} of {lab['n']}", a["parse_failures"]["no_match"], a["parse_failures"]["not_allowed"],
             ", ".join(f"{k} {v}" for k, v in a["labels"].items()) or NA] for who, a in lab["answerers"].items()]
    md += table(["Answerer", "Labelled", "No match", "Not allowed", "Labels given"], rows) + [""]
    major = lab["teacher_majority"]
    if major["label"] is not None:
        md += [f"Always answering the teacher's commonest label, `{major['label']}`, would agree {pct(major['agreement'])}: "
               "a student at that level may have learnt the format and the teacher's bias, not its judgement.", ""]
    return md


def skills_section(summary: dict) -> list[str]:
    """Kept skills (kept_skills.py): accuracy on short checkable questions of base and student
    WITHOUT the prompt and the teacher WITH it, overall and per category; nothing without them."""
    ks = summary.get("kept_skills")
    if not ks:
        return []
    md = ["## Kept skills", "",
          f"{ks['n']} short questions with checkable answers (arithmetic, facts, spelling, unit conversions, simple "
          "reasoning, or the set `eval.skills` names), answered greedily: base and student WITHOUT the prompt, the "
          "teacher WITH it (a reference, not a ceiling). Accuracy with bootstrap 95% CIs; student - base is the mean "
          "of the per-question differences (paired). **Lost** when its CI lies wholly below 0: training cost the "
          "student a skill the base model had. Every answer is in skills.jsonl.", ""]
    rows = [[name, s["n"], pct_ci(_acc(s["base"])), pct_ci(_acc(s["student"])), pct_ci(_acc(s["teacher"])),
             pct_ci(s["student_minus_base"]), "**lost**" if s["lost"] else "kept"]
            for name, s in [("all", ks), *ks.get("per_category", {}).items()]]
    return md + table(["Category", "n", "Base", "Student", "Teacher (with the prompt)", "Student - base", "Verdict"],
                      rows) + [""]


def _acc(answerer: dict) -> dict:
    """An answerer's accuracy in pct_ci's shape."""
    return {"mean": answerer["accuracy"], "ci95": answerer["ci95"]}
