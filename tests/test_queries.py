import json

import pytest

from promptdistill.rundir import StageError
from promptdistill.stages.queries import load_queries, split_rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_and_txt_loaders_keep_their_source(tmp_path):
    rows = load_queries(write_jsonl(tmp_path / "q.jsonl", [{"id": "a", "query": " Hi? "}, {"query": "Why?"}]))
    assert [(r["id"], r["query"], r["source"]) for r in rows] == [("a", "Hi?", "q.jsonl:1"), ("q-2", "Why?", "q.jsonl:2")]
    (tmp_path / "more.txt").write_text("One?\n\nTwo?\n", encoding="utf-8")
    assert [r["id"] for r in load_queries(tmp_path / "more.txt")] == ["more-1", "more-3"]


@pytest.mark.parametrize("content, message", [
    ('{"id": "a", "query": "  "}\n', r"q\.jsonl:1: empty query"),
    ('{"id": "a", "query": "ok"}\n{"id": "b"\n', r"q\.jsonl:2: malformed JSON"),
    ('{"id": "a", "text": "ok"}\n', r"q\.jsonl:1: expected a string field 'query'"),
])
def test_bad_queries_name_file_and_line(tmp_path, content, message):
    (tmp_path / "q.jsonl").write_text(content, encoding="utf-8")
    with pytest.raises(StageError, match=message):
        load_queries(tmp_path / "q.jsonl")


def test_missing_non_utf8_and_unknown_format(tmp_path):
    with pytest.raises(StageError, match="not found"):
        load_queries(tmp_path / "absent.jsonl")
    (tmp_path / "q.jsonl").write_bytes('{"query": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(StageError, match="not UTF-8"):
        load_queries(tmp_path / "q.jsonl")
    (tmp_path / "q.xml").write_text("<q/>")
    with pytest.raises(StageError, match="unsupported queries format"):
        load_queries(tmp_path / "q.xml")


def test_split_is_seeded_complete_and_sized():
    rows = [{"id": f"q{i:03d}", "query": f"question {i}", "source": "x"} for i in range(100)]
    a = split_rows(rows, 0.8, 0.1, seed=0)
    assert a == split_rows(list(reversed(rows)), 0.8, 0.1, seed=0)[::-1]  # input order does not matter
    sizes = {s: sum(r["split"] == s for r in a) for s in ("train", "val", "test")}
    assert sizes == {"train": 80, "val": 10, "test": 10}
    assert {r["split"] for r in split_rows(rows, 0.8, 0.1, seed=1)} == {"train", "val", "test"}
    assert [r["split"] for r in split_rows(rows, 0.8, 0.1, seed=1)] != [r["split"] for r in a]
