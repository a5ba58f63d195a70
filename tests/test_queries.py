import json

import pytest

from promptdistill.rundir import StageError
from promptdistill.scores import load_embedder, near_duplicate_pairs
from promptdistill.stages.queries import diversity, drop_exact_duplicates, groups_of, leaks, load_queries, split_rows


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


# --- loaders: CSV, field mapping, datasets ------------------------------------------------


def test_csv_loader_maps_fields_and_names_bad_rows(tmp_path):
    (tmp_path / "q.csv").write_text('key,text\nk1,"Hello, there?"\n,Why?\n', encoding="utf-8")
    rows = load_queries(tmp_path / "q.csv", field="text", id_field="key")
    assert [(r["id"], r["query"], r["source"]) for r in rows] == [("k1", "Hello, there?", "q.csv:2"), ("q-3", "Why?", "q.csv:3")]
    with pytest.raises(StageError, match=r"q\.csv:1: no column 'query' in the CSV header \['key', 'text'\]"):
        load_queries(tmp_path / "q.csv")
    (tmp_path / "bad.csv").write_text('query\nok?\n"  "\n', encoding="utf-8")
    with pytest.raises(StageError, match=r"bad\.csv:3: empty query"):
        load_queries(tmp_path / "bad.csv")


def test_jsonl_field_mapping(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"uid": 7, "prompt": "Why?"}])
    assert load_queries(path, field="prompt", id_field="uid") == [{"id": "7", "query": "Why?", "source": "q.jsonl:1"}]
    with pytest.raises(StageError, match=r"q\.jsonl:1: expected a string field 'query'"):
        load_queries(path)


def test_datasets_dir_loader(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"question": ["What is it?", "Why so?"], "qid": ["a", "b"]}).save_to_disk(tmp_path / "flat")
    rows = load_queries(tmp_path / "flat", field="question", id_field="qid")
    assert [(r["id"], r["query"], r["source"]) for r in rows] == [("a", "What is it?", "flat:1"), ("b", "Why so?", "flat:2")]
    with pytest.raises(StageError, match=r"flat: no column 'query' \(it has \['question', 'qid'\]\); set queries.field"):
        load_queries(tmp_path / "flat")
    splits = datasets.DatasetDict({"test": datasets.Dataset.from_dict({"query": ["Held out?"]})})
    splits.save_to_disk(tmp_path / "split")
    assert [r["id"] for r in load_queries(tmp_path / "split", split="test")] == ["split-1"]
    with pytest.raises(StageError, match=r"no split 'train' \(it has \['test'\]\); set queries.dataset_split"):
        load_queries(tmp_path / "split")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(StageError, match="not a dataset saved with `save_to_disk`"):
        load_queries(tmp_path / "empty_dir")


def test_hub_dataset_offline_names_the_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StageError, match=r"hf:someone/questions: the hub dataset 'someone/questions' needs the network"):
        load_queries("hf:someone/questions")


# --- dedup, leakage, diversity ---------------------------------------------------------------


def test_exact_duplicates_are_found_after_normalising():
    rows = [{"id": "a", "query": "What do you think of Mozart?"}, {"id": "b", "query": "what do you think of  MOZART"},
            {"id": "c", "query": "Who taught you?"}]
    kept, dropped = drop_exact_duplicates(rows)
    assert [r["id"] for r in kept] == ["a", "c"] and [(d["id"], f["id"]) for d, f in dropped] == [("b", "a")]


def test_known_near_duplicates_are_paired_and_grouped():
    queries = ["What do you think of Mozart?", "How many coffee beans do you use per cup?",
               "What is your opinion of Mozart?", "Tell me about your nephew Karl.", "Tell me about Karl, your nephew."]
    emb = load_embedder().encode(queries)
    pairs = near_duplicate_pairs(emb, threshold=0.9)
    assert sorted((i, j) for i, j, _ in pairs) == [(0, 2), (3, 4)]
    group = groups_of([f"q{i}" for i in range(5)], pairs)
    assert group == {"q0": "q0", "q1": "q1", "q2": "q0", "q3": "q3", "q4": "q3"}


def test_near_duplicate_groups_never_straddle_splits():
    rows = [{"id": f"q{i:03d}", "query": f"question {i}", "source": "x"} for i in range(60)]
    # chains of 3 and pairs, as connected components: q000-q001-q002, q010-q011, ...
    pairs = [(0, 1, 0.95), (1, 2, 0.93)] + [(k, k + 1, 0.91) for k in range(10, 50, 4)]
    group = groups_of([r["id"] for r in rows], pairs)
    for seed in range(20):
        split = {r["id"]: r["split"] for r in split_rows(rows, 0.6, 0.2, seed, group)}
        assert not leaks(split, [(rows[i]["id"], rows[j]["id"]) for i, j, _ in pairs])
        assert abs(sum(s == "train" for s in split.values()) - 36) <= 2  # sizes stay close to the fractions
    ungrouped = {r["id"]: r["split"] for r in split_rows(rows, 0.6, 0.2, 0)}
    assert leaks(ungrouped, [(rows[i]["id"], rows[j]["id"]) for i, j, _ in pairs])  # what grouping prevents


def test_diversity_counts_clusters_of_similar_queries():
    queries = ["What do you think of Mozart?", "What is your opinion of Mozart?", "Do you admire Mozart?",
               "How many coffee beans do you use per cup?", "How do you make your coffee?",
               "Can you write Python code for me?"]
    d = diversity(load_embedder().encode(queries))
    assert d["n"] == 6 and d["clusters"] == 3 and 0 < d["mean_pairwise_cosine"] < 0.5
    assert diversity(load_embedder().encode(queries[:1])) == {"n": 1, "mean_pairwise_cosine": None, "clusters": 1}
