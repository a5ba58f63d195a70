"""Kept skills: the shipped set's patterns, a user's JSONL and CSV, each bad row's error, the
summary recomputed by hand from skills.jsonl of an evaluated tiny run, and the verdict's warning."""

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from promptdistill import kept_skills
from promptdistill.config_file import load_config
from promptdistill.rundir import StageError
from promptdistill.verdict import verdict
from tiny import save_pirate_tiny, trained_tiny_run

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_set_accepts_its_answers_and_rejects_near_misses():
    rows = [json.loads(line) for line in kept_skills.BUILTIN.read_text(encoding="utf-8").splitlines()]
    items = kept_skills.load("builtin")
    assert len(items) == len(rows) >= 250
    counts = Counter(i.category for i in items)
    assert set(counts) == {"arithmetic", "facts", "spelling", "units", "reasoning"} and min(counts.values()) >= 40
    for item, row in zip(items, rows):
        assert item.correct(row["example"]), row
        assert item.correct(f"The answer is {row['example']}.")
        assert not item.correct(row["near_miss"]), row
        assert not item.correct(item.question), row  # echoing the question never passes
        if re.fullmatch(r"\d+", row["example"]):
            n = int(row["example"])
            for wrong in (n - 1, n + 1, 10 * n + 1, 100 + n):  # 112 is not 12
                assert not item.correct(f"It is {wrong}."), (row, wrong)
    numbers = next(i for i in items if i.question.startswith("What is 7 + 5?"))
    assert numbers.correct("Twelve.") and numbers.correct("7 + 5 = 12") and not numbers.correct("12.5")


def test_a_users_jsonl_and_csv_load(tmp_path):
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text('{"question": "2+2?", "answers": "\\\\b4\\\\b", "category": "sums"}\n\n'
                     '{"question": "Capital of Peru?", "answers": ["lima", "lima, peru"]}\n')
    a, b = kept_skills.load(str(jsonl))
    assert (a.category, a.answers, a.source) == ("sums", (r"\b4\b",), f"{jsonl}:1")
    assert b.category == "all" and b.source == f"{jsonl}:3" and b.correct("It is LIMA.") and not a.correct("14")
    csv = tmp_path / "mine.csv"
    csv.write_text('question,answers,category\n"Say hi, please",hi || hello,greet\nWhat is 3+3?,\\b6\\b,\n')
    c, d = kept_skills.load(str(csv))
    assert c.answers == ("hi", "hello") and c.correct("Hello!") and c.source == f"{csv}:2"
    assert d.category == "all" and d.correct("6") and not d.correct("16")


BAD = [
    ("bad.jsonl", '{"question": "ok?", "answers": "x"}\n{"answers": "y"}\n', 2, "field question"),
    ("bad.jsonl", '{"question": "ok?", "answers": "x"}\n{"question": "q?"}\n', 2, "field answers"),
    ("bad.jsonl", '{"question": "q?", "answers": "(unclosed"}\n', 1, "invalid regular expression"),
    ("bad.jsonl", '{"question": "q?", "answers": []}\n', 1, "field answers"),
    ("bad.jsonl", '{"question": "q?", "answers": ["a", ""]}\n', 1, "field answers"),
    ("bad.jsonl", '{"question": "q?", "answers": "x?"}\n', 1, "matches an empty answer"),
    ("bad.jsonl", '{"question": "  ", "answers": "x"}\n', 1, "field question"),
    ("bad.jsonl", '{"question": "q?", "answers": "x"}\n{"question": \n', 2, "malformed JSON"),
    ("bad.csv", "question,answers\nq?,x\nr?,[z\n", 3, "invalid regular expression"),
    ("bad.csv", "question,answers\nq?,x\n,y\n", 3, "field question"),
    ("bad.csv", "question,answers\nq?,\n", 2, "field answers"),
    ("bad.csv", "question,answer\nq?,x\n", 1, "needs the columns"),
]


@pytest.mark.parametrize("name,text,line,what", BAD)
def test_each_bad_row_names_file_and_line(tmp_path, name, text, line, what):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(StageError, match=re.escape(f"{path}:{line}: ") + ".*" + re.escape(what)):
        kept_skills.load(str(path))


def test_a_bad_set_is_an_error_before_generate(tmp_path):
    """Checked by validate before generate (`distill run` stops there), not first found by eval
    after generate and train."""
    from promptdistill import validate

    (tmp_path / "skills.csv").write_text("question,answers\nq?,(x\n")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "name": "t", "system_prompt": "Be brief.", "teacher": {"model": "m"}, "student": {"model": "m"},
        "queries": {"files": ["q.jsonl"]}, "train": {"steps": 3}, "eval": {"skills": "skills.csv"}}))
    [problem] = validate.skills_problems(load_config(tmp_path / "config.yaml"))
    assert problem.severity == "error" and str(problem).startswith(f"eval.skills: {tmp_path / 'skills.csv'}:2: ")
    (tmp_path / "config.yaml").write_text((tmp_path / "config.yaml").read_text().replace("skills.csv", "nope.jsonl"))
    [problem] = validate.skills_problems(load_config(tmp_path / "config.yaml"))
    assert problem.severity == "error" and "nope.jsonl not found" in str(problem)
    assert validate.skills_problems(load_config(tmp_path / "config.yaml", ["eval.skills=builtin"])) == []


# The tiny pirate's answers are letters more than words ("A the se", "Ar! SAAAA"): patterns on
# letters pass some answers and fail others.
USER_SET = [{"question": q, "answers": p, "category": c} for q, p, c in [
    ("What is 2 + 2?", "e", "one"), ("Name a colour.", "h", "one"), ("Spell cat.", "a{2}", "one"),
    ("Count to three.", "!", "one"), ("Say hello.", "the", "one"), ("What day is it?", "s", "two"),
    ("Pick a fruit.", "e", "two"), ("Any word?", "o", "two"), ("Name a city.", "\\bthe\\b", "two"),
    ("A number, please.", "[0-9]", "two"), ("Who are you?", ["y", "r"], "two"), ("Is it raining?", "e", "two")]]


@pytest.fixture(scope="module")
def skilled_run(tmp_path_factory):
    from promptdistill.pipeline import run_stage

    tmp = tmp_path_factory.mktemp("skills")
    (tmp / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in USER_SET))
    system = "You are a pirate. Talk like one."
    model = save_pirate_tiny(tmp / "pirate", system, steps=20)  # it answers in letters; a random tiny model, nothing
    cfg, run = trained_tiny_run(tmp, model, 24, system_prompt=system, sampling={"max_tokens": 12, "batch_size": 6},
                                eval={"classifier_train_size": 8, "latency_queries": 1, "bootstrap": 200,
                                      "skills": "mine.jsonl"})
    run_stage(cfg, "eval")
    return cfg, run


def test_summary_equals_a_recomputation_from_skills_jsonl(skilled_run):
    cfg, run = skilled_run
    summary = json.loads((run.root / "summary.json").read_text())
    ks = summary["kept_skills"]
    rows = [json.loads(line) for line in (run.root / "skills.jsonl").read_text().splitlines()]
    assert [r["question"] for r in rows] == [r["question"] for r in USER_SET]
    correct = {}
    for who in ("base", "student", "teacher"):
        for r in rows:  # the stored verdicts are the patterns applied to the stored answers
            assert r[who]["correct"] == any(re.search(p, r[who]["text"], re.I) for p in r["answers"])
        correct[who] = np.array([r[who]["correct"] for r in rows], dtype=float)
    assert 0 < sum(c.sum() for c in correct.values()) < 3 * len(rows)  # the check passes some answers and fails others

    def ci(values):  # percentile bootstrap of the mean, 200 resamples of the questions, seed 0
        idx = np.random.default_rng(0).integers(0, len(values), size=(200, len(values)))
        return list(np.quantile(values[idx].mean(axis=1), [0.025, 0.975]))

    def check(section, mask):
        for who, values in correct.items():
            assert section[who]["accuracy"] == pytest.approx(values[mask].mean())
            assert section[who]["ci95"] == pytest.approx(ci(values[mask]))
        diff = correct["student"][mask] - correct["base"][mask]
        assert section["student_minus_base"]["mean"] == pytest.approx(diff.mean())
        assert section["student_minus_base"]["ci95"] == pytest.approx(ci(diff))
        assert section["lost"] == (ci(diff)[1] < 0) and section["n"] == mask.sum()

    categories = np.array([r["category"] for r in rows])
    check(ks, np.ones(len(rows), bool))
    assert set(ks["per_category"]) == {"one", "two"}
    for c in ("one", "two"):
        check(ks["per_category"][c], categories == c)


def test_bench_check_skills_agrees(skilled_run):
    """The independent script (patterns re-applied, bootstrap of its own) reproduces the summary."""
    _, run = skilled_run
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "check_skills.py"), str(run.root)],
                         capture_output=True, text=True, check=True).stdout
    assert "agree" in out.splitlines()[-1] and "DISAGREE" not in out


def test_report_has_the_kept_skills_table(skilled_run):
    cfg, run = skilled_run
    from promptdistill.pipeline import run_stage

    run_stage(cfg, "report")
    report = (run.root / "report.md").read_text()
    section = report.split("## Kept skills", 1)[1]
    assert "| all | 12 |" in section and "| one | 5 |" in section and "| two | 7 |" in section


def summary_with(student: list[int], base: list[int]) -> dict:
    s, b = np.array(student, float), np.array(base, float)
    ks = kept_skills.summarise({"base": b, "student": s, "teacher": b},
                               ["maths"] * (len(s) // 2) + ["words"] * (len(s) - len(s) // 2), n_boot=500)
    return {"quality": {}, "tokens": {"input_reduction_pct": 90.0}, "kept_skills": ks}


def test_verdict_warns_when_the_student_lost_skills():
    base = [1] * 40
    lost_words = summary_with([1] * 20 + [0] * 14 + [1] * 6, base)  # words: 6 of 20 kept
    assert lost_words["kept_skills"]["lost"] and lost_words["kept_skills"]["per_category"]["words"]["lost"]
    assert not lost_words["kept_skills"]["per_category"]["maths"]["lost"]
    said = verdict(lost_words)
    assert "Warning: the student lost skills the base model had: over the whole set, accuracy 65% against the base's 100%" in said
    assert "; in words, accuracy 30% against the base's 100%" in said and "maths" not in said
    kept = summary_with([1] * 19 + [0] + [1] * 19 + [0], base)  # one slip per category: within noise
    assert not kept["kept_skills"]["lost"] and "Warning" not in verdict(kept)
    better = summary_with([1] * 40, [0] * 40)
    assert "Warning" not in verdict(better)
    # words lost while the whole set is gained (maths from 0 to all): the warning leads with words
    gained = summary_with([1] * 20 + [0] * 14 + [1] * 6, [0] * 20 + [1] * 20)
    said = verdict(gained)
    assert not gained["kept_skills"]["lost"] and gained["kept_skills"]["per_category"]["words"]["lost"]
    assert ("Warning: the student lost skills the base model had: in words, accuracy 30% against the base's 100%" in said
            and "; over the whole set (not lost), accuracy 65% against the base's 50%" in said)


def test_distill_compare_shows_kept_skills_per_run():
    from promptdistill.compare import skills_rows

    with_skills = {"summary": summary_with([1] * 20 + [0] * 14 + [1] * 6, [1] * 40)}
    rows = {r[0]: r[1:] for r in skills_rows([with_skills, {"summary": {}}])}
    assert rows["all student"][0].startswith("65% [") and rows["all student"][1] == ""
    assert rows["all base"] == ["100% [100%, 100%]", ""]
    assert rows["words lost"] == ["yes", ""] and rows["maths lost"] == ["no", ""]
    assert rows["words student - base"][0].startswith("-70% [")
    assert skills_rows([{"summary": {}}]) == []
