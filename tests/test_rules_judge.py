"""The LLM judge (judge.py): parsing free-text verdicts, the two orders of every pair,
the tally, and whole runs against a real `distill serve --teacher` process on 127.0.0.1
(the tiny teacher is a hopeless judge, which is the point: its replies are recorded,
parsed or not) and against a port nobody listens on (every ask a recorded error)."""

import json

import numpy as np
import pytest
from test_serve import KEY, TEACHER, TOKEN_ENV, free_port, served
from tiny import PIRATE

from promptdistill import judge
from promptdistill.config import JudgeConfig, ModelConfig
from promptdistill.config_file import load_config
from promptdistill.rundir import RunDir


@pytest.mark.parametrize("reply, verdict", [
    ("Verdict: A", "A"), ("verdict: tie", "tie"), ("**Verdict:** B\nBecause it is shorter.", "B"),
    ("Verdict: Answer B", "B"), ("B", "B"), ("A.", "A"), ("Tie", "tie"), ("b) is better", "B"),
    ("Answer A is clearly better: it signs off as asked.", "A"),
    ("Answer B follows the rules, while answer A ignores them; Answer B is better.", "B"),
    ("I prefer Answer B.", "B"), ("Both answers are equally good.", "tie"), ("Neither follows the prompt.", "tie"),
    ("A pirate would say arr.", None),  # a sentence starting with the article "A" names no verdict
    ("Answer A and answer B both mention tea.", None), ("", None), ("the the the the", None),
])
def test_free_text_replies_are_parsed_or_left_unparsed(reply, verdict):
    assert judge.parse_verdict(reply) == verdict


def test_every_pair_is_asked_twice_in_swapped_orders():
    test = [{"id": f"q{i}", "query": f"Question {i}?", "teacher": f"teacher {i}"} for i in range(20)]
    texts = {"student": [f"student {i}" for i in range(20)], "base": [f"base {i}" for i in range(20)]}
    todo = judge.asks(test, texts, seed=0)
    assert len(todo) == 20 * 2 * 2
    pairs = {}
    for a in todo:
        pairs.setdefault((a["id"], a["candidate"]), []).append(a)
    for (qid, cand), (first, second) in pairs.items():
        assert (first["ask"], second["ask"]) == (1, 2)
        assert {first["candidate_is"], second["candidate_is"]} == {"A", "B"}
        assert first["candidate_answer"] == texts[cand][int(qid[1:])] and first["teacher_answer"] == f"teacher {qid[1:]}"
    firsts = [ps[0]["candidate_is"] for ps in pairs.values()]
    assert 0 < firsts.count("A") < len(firsts)  # the first order is random, not always the same
    assert judge.asks(test, texts, seed=0) == todo  # and seeded


def test_the_tally_counts_wins_ties_agreement_and_position():
    def row(qid, cand, ask, pos, verdict):
        return {"id": qid, "candidate": cand, "ask": ask, "candidate_is": pos, "verdict": verdict,
                "outcome": judge.outcome(verdict, pos)}
    rows = [row("q1", "student", 1, "A", "A"), row("q1", "student", 2, "B", "B"),  # win twice: agrees
            row("q2", "student", 1, "B", "A"), row("q2", "student", 2, "A", "A"),  # loss then win: position bias
            row("q3", "student", 1, "A", "tie"), row("q3", "student", 2, "B", None),  # tie, then unparsed
            row("q1", "base", 1, "A", "B"), row("q1", "base", 2, "B", "A")]  # loss twice
    t = judge.tally(rows, n_boot=200)
    s = t["student"]
    assert (s["win"], s["tie"], s["loss"], s["unparsed"], s["asks"]) == (3, 1, 1, 1, 6)
    assert s["win_or_tie"]["mean"] == pytest.approx(np.mean([1.0, 0.5, 1.0]))  # per query, then over queries
    assert s["self_agreement"] == 0.5 and s["self_agreement_n"] == 2
    assert s["chose_position_a"] == pytest.approx(3 / 4)
    assert t["base"]["win_or_tie"]["mean"] == 0.0 and t["base"]["self_agreement"] == 1.0


def judged(cfg, run_root, base_url, n=4, **model):
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"judge": JudgeConfig(
        model=ModelConfig(model=TEACHER, backend="openai", base_url=base_url, **model), max_tokens=16)})})
    test = [{"id": f"q{i}", "query": f"Where is the treasure, number {i}?", "teacher": PIRATE[i]} for i in range(n)]
    texts = {"student": ["Arr, under the palm."] * n, "base": ["I am an AI assistant."] * n}
    summary = judge.run(cfg, RunDir(run_root), test, texts)
    rows = [json.loads(line) for line in (run_root / judge.JUDGE_FILE).read_text().splitlines()]
    return summary, rows


def test_a_served_model_judges_and_every_reply_is_recorded(tmp_path_factory, pytestconfig, tmp_path, monkeypatch):
    srv = served(tmp_path_factory, pytestconfig)
    monkeypatch.setenv(TOKEN_ENV, KEY)
    cfg = load_config(srv.run)
    summary, rows = judged(cfg, tmp_path, f"{srv.server.url}/v1", api_key_env=TOKEN_ENV)
    assert len(rows) == 4 * 2 * 2
    for r in rows:
        assert "error" not in r and isinstance(r["reply"], str)  # the server answered every ask
        assert r["verdict"] == judge.parse_verdict(r["reply"])
        assert r["outcome"] == judge.outcome(r["verdict"], r["candidate_is"])
    for cand in judge.CANDIDATES:
        s = summary[cand]
        assert s["asks"] == 8 and s["win"] + s["tie"] + s["loss"] + s["unparsed"] == 8
    assert KEY not in (tmp_path / judge.JUDGE_FILE).read_text()


def test_a_judge_that_cannot_be_reached_is_recorded_not_a_crash(tmp_path):
    cfg = load_config_stub(tmp_path)
    summary, rows = judged(cfg, tmp_path, f"http://127.0.0.1:{free_port()}/v1", n=2, max_retries=0, timeout=2)
    assert len(rows) == 8 and all(r["verdict"] is None and r["outcome"] is None and r["error"] for r in rows)
    assert summary["student"]["unparsed"] == 4 and summary["student"]["self_agreement"] is None


def load_config_stub(tmp_path):
    import yaml

    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "name": "j", "system_prompt": "You are a pirate.", "teacher": {"model": "m"}, "student": {"model": "m"},
        "queries": {"files": ["q.jsonl"]}, "train": {"steps": 1}}))
    return load_config(tmp_path / "config.yaml")
