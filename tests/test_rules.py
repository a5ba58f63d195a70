"""Rule checks (rules.py): every kind on known texts, applies_to, config errors, and
compliance in `distill eval` on a finished tiny run, checked against a recount."""

import json

import numpy as np
import pytest
from tiny import PIRATE, checks_config, evaluated_tiny_run

from promptdistill import rules
from promptdistill.config_errors import ConfigError
from promptdistill.config_file import load_config
from promptdistill.pipeline import run_stage


def rule(**kw) -> rules.Rule:
    return rules.Rule(name=kw.pop("name", "r"), **kw)


@pytest.mark.parametrize("kw, good, bad", [
    ({"kind": "ends_with", "value": "Thank you for choosing Brightkettle."},
     "Hello! Descale monthly. Thank you for choosing Brightkettle.  \n", "Thank you for choosing Brightkettle. Bye."),
    ({"kind": "ends_with", "value": ["Cheers!", "Cheers."]}, "Fine. Cheers.", "Cheers, fine."),
    ({"kind": "starts_with", "value": "Hello!"}, "  hello! I can help.", "Hi! Hello!"),
    ({"kind": "starts_with", "value": "Hello!", "case_sensitive": True}, "Hello! Yes.", "hello! yes."),
    ({"kind": "contains", "value": "0800 046 1234"}, "Call 0800 046 1234 today.", "Call 0800 046 123 today."),
    ({"kind": "contains", "value": ["999", "NHS 111"]}, "Ring nhs 111 first.", "Ring a doctor."),
    ({"kind": "not_contains", "value": ["Breville", "Smeg"]}, "Our kettle is great.", "Better than a SMEG one."),
    ({"kind": "regex", "value": r"order (number|no\b)"}, "What is your Order number?", "What did you order?"),
    ({"kind": "not_regex", "value": r"[£$]\s?\d"}, "Prices are on the website.", "It costs £ 25."),
    ({"kind": "max_sentences", "value": 2}, "One. Two!", "One. Two? Three"),
    ({"kind": "max_sentences", "value": 1}, "Only one sentence without a stop", "First... Second."),
    ({"kind": "max_words", "value": 5}, "one two three four five", "one two three four five six"),
    ({"kind": "no_emoji"}, "No emoji here :) ok — “quotes” £5 é", "Great! \U0001F600"),
    ({"kind": "no_emoji"}, "Plain text.", "Love it \u2764\ufe0f"),
    ({"kind": "forbidden_words", "value": ["color", "favorite"]}, "My favourite colour. Colorado!", "Any Color you like."),
])
def test_each_kind_on_known_texts(kw, good, bad):
    r = rule(**kw)
    assert rules.passes(r, good) is True
    assert rules.passes(r, bad) is False


def test_sentences_are_counted_at_end_marks():
    assert rules.count_sentences("") == 0
    assert rules.count_sentences("Hello! How are you? Fine.") == 3
    assert rules.count_sentences('He said "stop." Then left') == 2
    assert rules.count_sentences("Version 3.5 is out.") == 1


def test_applies_to_limits_a_rule_to_matching_queries():
    r = rule(name="emergency", kind="contains", value="999", applies_to=r"\b(burn|scald)")
    ok = rules.outcomes([r], "I BURNT my hand", "Put it under cold water.")
    assert ok == {"emergency": False}
    assert rules.outcomes([r], "How do I descale?", "Use vinegar.") == {"emergency": None}
    assert rules.failed([r], "My son was scalded", "Call 999 now.") == []
    m = rules.pass_matrix([r, rule(name="short", kind="max_words", value=3)],
                          ["burn", "descale"], ["Call 999.", "Use white vinegar then rinse."])
    assert np.array_equal(np.isnan(m), [[False, False], [True, False]])
    assert m[0].tolist() == [1.0, 1.0] and m[1, 1] == 0.0
    assert rules.per_query_compliance(m).tolist() == [1.0, 0.0]


@pytest.mark.parametrize("bad, message", [
    ({"name": "x", "kind": "regex", "value": "(unclosed"}, "checks.rules.0: Value error, rule 'x': value is not a valid regex"),
    ({"name": "x", "kind": "contains", "value": "a", "applies_to": "[z-a]"}, "applies_to is not a valid regex"),
    ({"name": "x", "kind": "ends_wiht", "value": "a"}, "checks.rules.0.kind"),
    ({"name": "x", "kind": "max_words", "value": "ten"}, "max_words needs value: a whole number"),
    ({"name": "x", "kind": "contains"}, "contains needs value"),
    ({"name": "x", "kind": "no_emoji", "value": "x"}, "no_emoji takes no value"),
    ({"name": "x", "kind": "contains", "value": "a", "applies": "b"}, "checks.rules.0.applies: unknown field"),
])
def test_a_bad_rule_is_a_config_error_naming_the_field(tmp_path, bad, message):
    with pytest.raises(ConfigError) as e:
        load_config(checks_config(tmp_path, {"rules": [bad]}))
    assert message in str(e.value)


def test_rule_names_must_be_unique(tmp_path):
    r = {"name": "x", "kind": "no_emoji"}
    with pytest.raises(ConfigError, match="'x' is used twice"):
        load_config(checks_config(tmp_path, {"rules": [r, r]}))


RULES = [{"name": "arr", "kind": "contains", "value": ["arr", "ahoy", "aye"]},
         {"name": "short", "kind": "max_words", "value": 6},
         {"name": "pirate_word", "kind": "regex", "value": r"\b(sea|gold|sails|rum|storm)\b", "applies_to": r"\?"}]


@pytest.fixture(scope="module")
def ruled_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rulesrun")
    return evaluated_tiny_run(tmp, checks={"rules": RULES},
                              eval={"classifier_train_size": 12, "latency_queries": 2, "bootstrap": 200})


def test_compliance_in_eval_matches_a_recount(ruled_run):
    cfg, run = ruled_run
    rows = [json.loads(line) for line in (run.root / "eval.jsonl").read_text().splitlines()]
    summary = json.loads((run.root / "summary.json").read_text())
    q = summary["quality"]["compliance"]
    assert set(q) >= {"student", "base", "ceiling", "retained", "n"} and q["ceiling_is"] == "teacher"
    # Recount from eval.jsonl's texts, rule by rule, without rules.pass_matrix.
    def share(who, row):
        ok = [rules.passes(r, row[who]) for r in cfg.checks.rules if rules.applies(r, row["query"])]
        return sum(ok) / len(ok)
    means = {who: np.mean([share(who, r) for r in rows]) for who in ("student", "base", "teacher")}
    assert q["student"]["mean"] == pytest.approx(means["student"])
    assert q["ceiling"]["mean"] == pytest.approx(means["teacher"])
    # The hand-written pirate answers all say arr/ahoy/aye... except the ones that do not.
    expected_teacher = np.mean([any(w in r["teacher"].lower() for w in ("arr", "ahoy", "aye")) for r in rows])
    per = summary["compliance"]["rules"]
    data = summary["compliance"]["teacher_data"]  # all 24 teacher.jsonl answers, no best_of: first try = kept
    assert data["answers"] == 24 and all(r["first_try"] == r["kept"] for r in data["rules"].values())
    assert per["arr"]["teacher"]["mean"] == pytest.approx(expected_teacher)
    gap = means["teacher"] - means["base"]
    if gap:
        assert q["retained"]["mean"] == pytest.approx((means["student"] - means["base"]) / gap)
    for name, c in per.items():
        assert set(c) >= {"teacher", "teacher_again", "student", "base", "retained", "can_tell", "applies", "reach",
                          "transferred"}
        assert c["applies"] == sum(rules.applies(r, row["query"]) for row in rows for r in cfg.checks.rules if r.name == name)
        for who in ("teacher", "teacher_again", "student", "base"):
            lo, hi = c[who]["ci95"]
            assert lo <= c[who]["mean"] <= hi
    for row in rows:
        assert set(row["failed_checks"]) == {"teacher", "teacher_again", "student", "base"}
        assert row["failed_checks"]["teacher"] == rules.failed(cfg.checks.rules, row["query"], row["teacher"])
        assert row["teacher"] in PIRATE


def test_validate_warns_about_a_rule_the_teacher_data_rarely_follows(ruled_run):
    from promptdistill.validate import before_train

    cfg, run = ruled_run
    cfg = cfg.model_copy(update={"checks": cfg.checks.model_copy(update={"rules": [
        rules.Rule(name="never", kind="contains", value="no pirate says this"),
        rules.Rule(name="always", kind="max_words", value=50)]})})
    warned = [p for p in before_train(cfg, run).warnings if p.where.startswith("checks.rules")]
    assert [p.where for p in warned] == ["checks.rules never"]
    assert "0% of the 24 times it applies" in warned[0].message


def test_the_report_shows_compliance_per_rule(ruled_run):
    from promptdistill.stages import report

    cfg, run = ruled_run
    run_stage(cfg, "report")
    md = (run.root / "report.md").read_text()
    summary = json.loads((run.root / "summary.json").read_text())
    assert "## Rule compliance" in md and "## LLM judge" not in md  # no judge configured
    for name, r in summary["compliance"]["rules"].items():
        line = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
        assert report.pct_ci(r["student"]) in line and report.pct_ci(r["teacher"]) in line
        # retained only where the rule can tell (the paired rule): never a ratio over a denominator within noise
        assert (report.pct_ci(r["retained"]) in line) == r["can_tell"] and ("cannot tell" in line) == (not r["can_tell"])
    assert "Teacher data: all 24 answers of teacher.jsonl, 24 tries drawn" in md
