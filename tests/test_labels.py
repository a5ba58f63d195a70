"""Label checks (labels.py): the parser on known answers, config errors naming the field, label
agreement on a hand-made eval, and the score in `distill eval` on a finished tiny run, checked
against a recount from eval.jsonl."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny import PIRATE, checks_config, save_pirate_tiny, trained_tiny_run

from promptdistill import labels
from promptdistill.config_errors import ConfigError
from promptdistill.config_file import load_config
from promptdistill.formatting import mean_ci
from promptdistill.pipeline import run_stage

LANGS = ["en", "fr", "de", "es", "it", "pt", "nl", "ot"]
CHECK = labels.LabelCheck(pattern=r"Final Answer:\s*([a-z]{2})\b", allowed=LANGS)


@pytest.mark.parametrize("answer, parsed", [
    ("Final Answer: fr", ("fr", None)),
    ("The text is Dutch.\nfinal answer:NL", ("nl", None)),             # case ignored, label lower-cased
    ("Final Answer: en\nText: Ik woon hier.", ("en", None)),           # text after the label is ignored
    ("Final Answer: de\nFinal Answer: nl", ("nl", None)),              # several: the last counts
    ("Final Answer: xx\nFinal Answer: es", ("es", None)),              # the last match, allowed
    ("Final Answer: es\nFinal Answer: sv", (None, labels.NOT_ALLOWED)),  # the last match decides, even if not allowed
    ("Final Answer: sv", (None, labels.NOT_ALLOWED)),
    ("It is French.", (None, labels.NO_MATCH)),
    ("Final Answer: english", (None, labels.NO_MATCH)),                # \b after two letters: no match
    ("", (None, labels.NO_MATCH)),
])
def test_the_parser_takes_the_last_match_and_checks_the_label(answer, parsed):
    assert CHECK.parse(answer) == parsed


def test_case_sensitive_labels_keep_their_case():
    check = labels.LabelCheck(pattern=r"label=(\w+)", allowed=["Yes", "No"], case_sensitive=True)
    assert check.parse("label=Yes") == ("Yes", None)
    assert check.parse("label=yes") == (None, labels.NOT_ALLOWED)
    assert check.parse("LABEL=Yes") == (None, labels.NO_MATCH)


@pytest.mark.parametrize("bad, message", [
    ({"pattern": "Final Answer: ([a-z]{2}", "allowed": LANGS}, "checks.labels: Value error, pattern is not a valid regex"),
    ({"pattern": "Final Answer: [a-z]{2}", "allowed": LANGS}, "pattern needs exactly one capture group, the label (it has 0"),
    ({"pattern": "(Final) Answer: ([a-z]{2})", "allowed": LANGS}, "(it has 2; write other groups as (?:...))"),
    ({"pattern": "x(y)", "allowed": ["en"]}, "checks.labels.allowed: List should have at least 2 items"),
    ({"pattern": "x(y)", "allowed": ["en", "fr", "en"]}, "checks.labels.allowed: Value error, 'en' is listed twice"),
    ({"pattern": "x(y)", "allowed": ["en", ""]}, "every allowed label must be a non-empty string"),
    ({"pattern": "x(y)", "allowed": ["en", "EN"]}, "two labels differ only in case"),
    ({"pattern": "x(y)", "allowed": ["en", "fr"], "labels": ["de"]}, "checks.labels.labels: unknown field"),
    ({"allowed": ["en", "fr"]}, "checks.labels.pattern"),
])
def test_a_bad_label_check_is_a_config_error_naming_the_field(tmp_path, bad, message):
    with pytest.raises(ConfigError) as e:
        load_config(checks_config(tmp_path, {"labels": bad}))
    assert message in str(e.value)


def test_agreement_on_a_hand_made_eval():
    # 6 inputs; the teacher labels 5 of them (the third has no label: left out of every figure)
    answers = {
        "teacher":       ["Final Answer: en", "Final Answer: fr", "I think German.", "Final Answer: es", "Final Answer: en", "Final Answer: nl"],
        "teacher_again": ["Final Answer: en", "Final Answer: fr", "Final Answer: de", "Final Answer: es", "Final Answer: en", "Final Answer: de"],
        "student":       ["Final Answer: en", "Final Answer: en", "Final Answer: de", "Final Answer: es", "Final Answer: zz", "Final Answer: nl"],
        "base":          ["English.", "Final Answer: fr", "Final Answer: de", "no idea", "Bonjour", "Final Answer: en"],
    }
    score, section, rows = labels.agreement(CHECK, answers, n_boot=500)
    assert score["n"] == 5 and score["ceiling_is"] == "teacher_again"
    assert score["ceiling"]["mean"] == pytest.approx(4 / 5)   # teacher again: all but the Dutch one
    assert score["student"]["mean"] == pytest.approx(3 / 5)   # en, es, nl; fr -> en wrong; zz is a parse failure
    assert score["base"]["mean"] == pytest.approx(1 / 5)      # only fr
    assert score["retained"]["mean"] == pytest.approx((3 / 5 - 1 / 5) / (4 / 5 - 1 / 5))
    assert section["teacher_labelled"] == 5 and section["n"] == 6
    assert section["answerers"]["student"]["parse_failures"] == {"no_match": 0, "not_allowed": 1}
    assert section["answerers"]["base"]["parse_failures"] == {"no_match": 3, "not_allowed": 0}
    assert section["answerers"]["teacher"]["labels"] == {"en": 2, "fr": 1, "es": 1, "nl": 1}
    assert section["teacher_majority"] == {"label": "en", "agreement": pytest.approx(2 / 5)}
    assert rows[2]["label_agreement"] == {"teacher_again": None, "student": None, "base": None}
    assert rows[4] == {"labels": {"teacher": "en", "teacher_again": "en", "student": None, "base": None},
                       "label_agreement": {"teacher_again": 1, "student": 0, "base": 0},
                       "label_failures": {"student": "not_allowed", "base": "no_match"}}
    assert "label_failures" not in rows[1]  # every answer there has a label


# The pirate answers' first word as the label: the recorded teacher answers all open with one; a
# tiny model taught those answers WITH the prompt gives them again now and then, and other words too.
PIRATE_LABELS = {"pattern": r"^\W*(\w+)", "allowed": sorted({a.split()[0].strip("!,").lower() for a in PIRATE})}
SYSTEM = "You are a pirate. Talk like one."


@pytest.fixture(scope="module")
def labelled_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("labelsrun")
    model = save_pirate_tiny(tmp / "pirate", SYSTEM, steps=40)
    cfg, run = trained_tiny_run(tmp, model, 24, system_prompt=SYSTEM, sampling={"max_tokens": 12, "batch_size": 6},
                                checks={"labels": PIRATE_LABELS},
                                eval={"classifier_train_size": 8, "latency_queries": 1, "bootstrap": 200})
    run_stage(cfg, "eval")
    return cfg, run


def test_eval_scores_label_agreement_as_a_recount_from_eval_jsonl(labelled_run):
    cfg, run = labelled_run
    rows = [json.loads(line) for line in (run.root / "eval.jsonl").read_text().splitlines()]
    summary = json.loads((run.root / "summary.json").read_text())
    q = summary["quality"]["label_agreement"]
    assert {"student", "base", "ceiling", "retained", "student_minus_base", "can_tell", "won"} <= set(q)
    # Recount with plain re, not labels.py: the first word, lower-cased, if it is an allowed label.
    import re

    def label(text):
        m = re.match(r"^\W*(\w+)", text)
        return m.group(1).lower() if m and m.group(1).lower() in PIRATE_LABELS["allowed"] else None

    teacher = [label(r["teacher"]) for r in rows]
    assert all(teacher)  # every pirate answer opens with its label
    for who, key in (("student", "student"), ("base", "base"), ("teacher_again", "ceiling")):
        mine = np.mean([label(r[who]) == t for r, t in zip(rows, teacher)])
        assert q[key]["mean"] == pytest.approx(mine), who
        assert [r["labels"][who] for r in rows] == [label(r[who]) for r in rows]
        failures = summary["labels"]["answerers"][who]["parse_failures"]
        assert sum(failures.values()) == sum(label(r[who]) is None for r in rows)
    assert summary["labels"]["teacher_labelled"] == len(rows) == q["n"]


def test_the_report_shows_label_agreement_and_parse_failures(labelled_run):
    cfg, run = labelled_run
    run_stage(cfg, "report")
    md = (run.root / "report.md").read_text()
    summary = json.loads((run.root / "summary.json").read_text())
    q = summary["quality"]["label_agreement"]
    line = next(line for line in md.splitlines() if line.startswith("| label_agreement |"))
    assert mean_ci(q["student"]) in line and mean_ci(q["base"]) in line
    assert "## Labels" in md
    for who, a in summary["labels"]["answerers"].items():
        row = next(line for line in md.splitlines() if line.startswith(f"| {who} |") and " of " in line)
        assert f"| {a['parse_failures']['no_match']} | {a['parse_failures']['not_allowed']} |" in row


def test_bench_check_labels_agrees(labelled_run):
    """The independent script (its own parsing of eval.jsonl and teacher.jsonl, its own bootstrap)
    reproduces the summary's figures."""
    _, run = labelled_run
    out = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "bench" / "check_labels.py"), str(run.root)],
                         capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "all figures agree with summary.json", out


def test_validate_warns_when_the_teacher_data_seldom_gives_a_label(labelled_run):
    from promptdistill.validate import before_train

    cfg, run = labelled_run
    assert not [p for p in before_train(cfg, run).warnings if p.where == "checks.labels"]  # every pirate answer has one
    other = labels.LabelCheck(pattern=r"Final Answer: (\w+)", allowed=["en", "fr"])
    cfg = cfg.model_copy(update={"checks": cfg.checks.model_copy(update={"labels": other})})
    warned = [p for p in before_train(cfg, run).warnings if p.where == "checks.labels"]
    assert len(warned) == 1 and "0 of the teacher's 24 answers give a label" in warned[0].message
