"""Best-of-N teacher answers (sampling.best_of, best_of.py): `distill generate` as a real
subprocess, SIGKILLed mid-stage twice and re-run, draws every try exactly once and ends
with what an uninterrupted run holds; a rule every first try passes leaves the answers
(and the row keys) of a run without best_of unchanged."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml
from test_crash_safety import complete_rows, distill, killed
from tiny import QUESTIONS, save_chatty_tiny

from promptdistill import rules
from promptdistill.best_of import TRIES_FILE
from promptdistill.cli import main

N_QUERIES, BEST_OF = 16, 4
RULES = [{"name": "never", "kind": "contains", "value": "no tiny model says this"},  # every query draws all tries
         {"name": "short", "kind": "max_words", "value": 8}]


def write_project(root, model, rule_list, best_of):
    (root / "queries.jsonl").write_text("".join(json.dumps({"id": f"q{i:02d}", "query": QUESTIONS[i]}) + "\n"
                                                for i in range(N_QUERIES)))
    config = {"name": "bestof", "system_prompt": "You are a pirate. Talk like one.",
              "teacher": {"model": str(model)}, "student": {"model": str(model)},
              "queries": {"files": ["queries.jsonl"], "train": 0.5, "val": 0.25, "test": 0.25},
              "sampling": {"temperature": 1.0, "top_p": 1.0, "max_tokens": 12, "batch_size": 4,
                           **({"best_of": best_of} if best_of else {})},
              "train": {"steps": 1}, "checks": {"rules": rule_list}}
    (root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root / "config.yaml"


def generate_in_process(config, run):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): the same arithmetic
    try:
        for verb in ("queries", "generate"):
            assert main([verb, str(config), "--set", f"run_dir={run}"]) == 0
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("bestof")
    return write_project(root, save_chatty_tiny(root / "tiny-chatty"), RULES, BEST_OF)


@pytest.fixture(scope="module")
def reference(project, tmp_path_factory):
    run = tmp_path_factory.mktemp("bestof-ref") / "run"
    generate_in_process(project, run)
    return run


def by_key(rows):
    return {r["key"]: r for r in rows}


def test_the_kept_row_records_its_tries(reference):
    tries, kept = complete_rows(reference / TRIES_FILE), complete_rows(reference / "teacher.jsonl")
    assert len(kept) == N_QUERIES and len(tries) == N_QUERIES * BEST_OF  # "never" fails, so all 4 are drawn
    assert len({(t["key"], t["try"]) for t in tries}) == len(tries)
    all_tries = {}
    for t in tries:
        all_tries.setdefault(t["key"], []).append(t)
    for row in kept:
        mine = all_tries[row["key"]]
        assert row["tries"] == BEST_OF and "never" in row["failed_checks"]
        fails = [len(rules.failed([rules.Rule(**r) for r in RULES], row["messages"][-1]["content"], t["completion"])) for t in mine]
        assert row["try"] == fails.index(min(fails))  # the earliest try failing fewest
        assert row["completion"] == mine[row["try"]]["completion"]  # the teacher's text, unedited
    summary = json.loads((reference / "teacher_compliance.json").read_text())
    assert summary["rules"]["never"] == {"applies": N_QUERIES, "first_try": 0.0, "kept": 0.0}
    assert summary["rules"]["short"]["kept"] >= summary["rules"]["short"]["first_try"]


def test_generate_killed_twice_never_draws_a_finished_try_again(project, reference, tmp_path):
    run = tmp_path / "run"
    assert main(["queries", str(project), "--set", f"run_dir={run}"]) == 0
    tries = run / TRIES_FILE
    rng = random.Random(13)
    for _ in range(2):
        target = len(complete_rows(tries)) + rng.randint(4, 20)
        r = distill("generate", project, run, stop_when=lambda: len(complete_rows(tries)) >= target,
                    delay=rng.uniform(0, 0.05))
        assert killed(r), (r.code, r.out, r.err)
    done = distill("generate", project, run)
    assert done.code == 0, done.err
    drawn = complete_rows(tries)
    assert len({(t["key"], t["try"]) for t in drawn}) == len(drawn) == N_QUERIES * BEST_OF  # each try once
    ref_tries = {(t["key"], t["try"]): t["completion"] for t in complete_rows(reference / TRIES_FILE)}
    assert {(t["key"], t["try"]): t["completion"] for t in drawn} == ref_tries
    assert by_key(complete_rows(run / "teacher.jsonl")) == by_key(complete_rows(reference / "teacher.jsonl"))


def test_a_first_try_that_passes_is_the_answer_a_run_without_best_of_gives(tmp_path):
    always = [{"name": "anything", "kind": "max_words", "value": 1000}]
    plain, picked = tmp_path / "plain", tmp_path / "picked"
    plain.mkdir(), picked.mkdir()
    model = save_chatty_tiny(tmp_path / "tiny-chatty")  # one model path: it is part of the row key
    generate_in_process(write_project(plain, model, always, None), plain / "run")
    generate_in_process(write_project(picked, model, always, 3), picked / "run")
    a, b = by_key(complete_rows(plain / "run" / "teacher.jsonl")), by_key(complete_rows(picked / "run" / "teacher.jsonl"))
    assert a.keys() == b.keys()  # rows keyed as without best_of
    for key, row in a.items():
        assert "tries" not in row  # a run without best_of writes the rows it always did
        assert b[key] == row | {"try": 0, "tries": 1, "failed_checks": []}
    assert not (plain / "run" / TRIES_FILE).exists()
