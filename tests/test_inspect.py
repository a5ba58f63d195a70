"""`distill inspect` on a queries file, a teacher file and a run dir: the numbers in its
JSON against hand-counted small files, the histogram PNG, and where things are written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from promptdistill.cli import main
from promptdistill.render import encode
from test_validate import PROMPT, TOPICS, project
from tiny import save_tiny, tiny_tokenizer

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("model"), "chatml")


def teacher_rows(n_cut: int) -> list[dict]:
    rows = []
    for i, q in enumerate(TOPICS):
        cut = i < n_cut
        rows.append({"id": f"q{i}", "key": f"k{i}", "split": "train" if i < 6 else "test",
                     "messages": [{"role": "system", "content": PROMPT}, {"role": "user", "content": q}],
                     "completion": "Arr, the sea and the" if cut else "Arr, a fine question.",
                     "finish_reason": "length" if cut else "stop", "tokens": {"prompt": 50, "completion": 16 if cut else 5 + i}})
    return rows


def test_queries_file_with_tokenizers(tiny, tmp_path, capsys):
    config = project(tmp_path, tiny, queries=TOPICS + ["how old is YOUR ship"], splits=None)
    out_json = tmp_path / "out" / "q.json"
    assert main(["inspect", str(tmp_path / "queries.jsonl"), "--config", str(config), "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out_json.read_text())
    assert data["kind"] == "queries" and set(data) >= {"queries", "system_prompt", "tokenizers", "histogram"}
    q = data["queries"]
    assert q["count"] == 11 and q["splits"] == {}
    assert q["duplicates"] == {"ids": [], "texts": [["q0", "q10"]]}
    lengths = [len(t) for t in TOPICS + ["how old is YOUR ship"]]
    assert q["chars"]["min"] == min(lengths) and q["chars"]["max"] == max(lengths)
    tok = tiny_tokenizer("chatml")
    assert q["tokens"]["teacher"]["max"] == max(len(encode(tok, t)) for t in TOPICS + ["how old is YOUR ship"])
    assert data["system_prompt"] == {"chars": len(PROMPT), "tokens": {"teacher": len(encode(tok, PROMPT)),
                                                                       "student": len(encode(tok, PROMPT))}}
    assert (tmp_path / "out" / "q_lengths.png").read_bytes().startswith(PNG)
    assert "queries: 11" in printed and "1 groups of identical texts (e.g. q0, q10)" in printed


def test_teacher_file_without_config_writes_nothing(tmp_path, capsys):
    path = tmp_path / "teacher.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in teacher_rows(n_cut=4)), encoding="utf-8")
    assert main(["inspect", str(path)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher.jsonl"]  # a file: print only, unless --json
    assert "teacher answers: 10 (test 4, train 6)" in printed
    assert "hit max_tokens: 4 of 10 (40%); empty: 0" in printed
    assert f"system prompt: {len(PROMPT)} chars" in printed and "lengths in characters only" in printed
    assert "tokens (teacher recorded): median 13.5, mean 13.3, p90 16, min 9, max 16 tokens" in printed


def test_run_dir_writes_json_and_png_into_it(tiny, tmp_path, capsys):
    config = project(tmp_path, tiny, answers=[{"completion": "Arr."}] * len(TOPICS))
    run = tmp_path / "run"
    rows = teacher_rows(n_cut=3)
    (run / "teacher.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (run / "config.yaml").write_text(config.read_text(), encoding="utf-8")
    assert main(["inspect", str(run)]) == 0
    data = json.loads((run / "inspect.json").read_text())
    assert data["kind"] == "run" and data["queries"]["splits"] == {"train": 6, "val": 2, "test": 2}
    a = data["answers"]
    assert a["hit_max_tokens"] == 3 and a["max_tokens"] == 16 and a["finish_reasons"] == {"length": 3, "stop": 7}
    assert a["tokens"]["teacher_recorded"]["max"] == 16 and a["tokens"]["teacher_recorded"]["min"] == 8
    assert data["system_prompt"]["tokens"]["teacher"] > 20
    assert (run / "inspect_lengths.png").read_bytes().startswith(PNG)
    assert f"wrote {run / 'inspect.json'} and {run / 'inspect_lengths.png'}" in capsys.readouterr().out


def test_missing_path_is_a_clear_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope.jsonl")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope.jsonl'}: no such file or run dir"


def test_a_file_of_conversations_counts_their_turns(tmp_path, capsys):
    rows = [{"id": "c1", "turns": ["Ahoy?", "Where to?", "Why?"]}, {"id": "c2", "turns": ["Gold?", "Where?"]},
            {"id": "q1", "query": "Alone?"},
            {"id": "c3", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr"},
                                      {"role": "user", "content": "Bye"}]}]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["inspect", str(path), "--json", str(tmp_path / "c.json")]) == 0
    chats = json.loads((tmp_path / "c.json").read_text())["queries"]["conversations"]
    assert chats["count"] == 3 and chats["answered_turns"] == 3 + 2 + 1 + 2
    assert (chats["user_turns"]["min"], chats["user_turns"]["max"], chats["user_turns"]["mean"]) == (2, 3, 2.3)
    assert "conversations: 3, user turns median 2" in capsys.readouterr().out
