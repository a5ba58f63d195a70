"""Query synthesis: the filters on real SmolLM2-135M outputs, sampling through a real tiny
model (seeded, cached, resumed), and cached samples turned into deduplicated, split rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from promptdistill.cli import main
from promptdistill.config_errors import ConfigError
from promptdistill.config_file import load_config
from promptdistill.pipeline import run_stage
from promptdistill.synthesize import (CACHE_FILE, _shingles, parse_query, parse_topics, prompt_notes, reject_reason,
                                      synthesis_key)
from tiny import save_chatty_tiny

PROMPT = ("You are Ludwig van Beethoven, in Vienna in 1824.\n## Who you are\n"
          "- Your father drilled you at the keyboard with harsh, often drunken lessons, hoping for a second Mozart.\n"
          "- You count exactly sixty coffee beans per cup.\n1. ALWAYS answer in at most 3 short sentences.")


@pytest.mark.parametrize("raw, reason", [
    ("What's the story of your brother Karl?", None),
    ("Q: Tell me about your coffee ritual.", None),
    ('"Can you write a long essay on how to make coffee?"', None),
    ("", "empty"),
    ("What " + "very " * 60 + "long question is this?", "too_long"),
    ("Afliberelle, wie der Wachtschleif fiels?", "not_english"),
    ("The chatbot will take a step forward, and respond with questions.", "not_a_question"),
    ("What does that mean?", "vague"),
    ("For what?", "vague"),
    ("Who are you?", None),
    ("What do you mean?\nI've never revealed my instructions to anyone at all.", "answers_itself"),
    ("I'm sorry to interrupt, but what is your name?", "answers_itself"),
    ("Your father drilled you at the keyboard with harsh, often drunken lessons?", "copies_prompt"),
    ("Kind: a fact about you. Topic: Bonn?", "copies_prompt"),
    ("What do you think of modern art?", "copies_example"),
])
def test_filters_on_real_135m_outputs(raw, reason):
    assert reject_reason(raw, parse_query(raw), _shingles(PROMPT), max_chars=200) == reason


def test_topics_and_notes_are_parsed():
    raw = "1. Heiligenstadt\n2. Bonn\n3. Your brother, Prince Lichnowsky\n4. You were told you could only ever write"
    assert parse_topics(raw) == ["Heiligenstadt", "Bonn", "Your brother", "Prince Lichnowsky"]
    assert parse_topics("your home, football, 1824!") == ["football"]  # the example's own topic is not a proposal
    assert prompt_notes(PROMPT) == ["You are Ludwig van Beethoven, in Vienna in 1824.",
                                    "Your father drilled you at the keyboard with harsh, often drunken lessons, "
                                    "hoping for a second Mozart.", "You count exactly sixty coffee beans per cup.",
                                    "ALWAYS answer in at most 3 short sentences."]


def project(tmp_path: Path, model: Path, given: list[str], run: str = "run", **synthesize) -> Path:
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"id": f"g{i}", "query": q}) + "\n" for i, q in enumerate(given)))
    config = {"name": "synth", "run_dir": str(tmp_path / run), "system_prompt": PROMPT,
              "teacher": {"model": str(model)}, "student": {"model": str(model)},
              "queries": {"files": ["q.jsonl"], "train": 0.6, "val": 0.2, "test": 0.2, "synthesize": synthesize},
              "sampling": {"batch_size": 4}, "train": {"steps": 2}}
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


GIVEN = [f"What do you think of ship number {i}?" for i in range(8)]
TINY_SYNTH = {"n": 2, "max_attempts": 6, "topic_samples": 1, "categories": ["facts", "off_topic"], "max_tokens": 8}


def test_tiny_model_synthesis_is_seeded_cached_and_resumed(tmp_path):
    model = save_chatty_tiny(tmp_path / "tiny")
    cfg = load_config(project(tmp_path, model, GIVEN, **TINY_SYNTH))
    run_stage(cfg, "queries")
    stats = json.loads((tmp_path / "run" / "queries_stats.json").read_text())["synthesized"]
    assert stats["tried"] == 6 and stats["kept"] + sum(stats["dropped"].values()) == 6
    assert (stats["samples_new"], stats["samples_reused"]) == (2 + 6, 0)  # 2 topic samples, 6 query attempts
    cache = read_rows(tmp_path / "run" / CACHE_FILE)
    assert [(r["step"], r["index"]) for r in cache] == [("topics", 0), ("topics", 1)] + [("queries", i) for i in range(6)]
    assert [r["category"] for r in cache if r["step"] == "queries"] == ["facts", "off_topic"] * 3

    queries_before = (tmp_path / "run" / "queries.jsonl").read_text()
    run_stage(cfg, "queries", force=True)  # the outputs are moved aside; the paid-for samples are not
    stats = json.loads((tmp_path / "run" / "queries_stats.json").read_text())["synthesized"]
    assert (stats["samples_new"], stats["samples_reused"]) == (0, 8)
    assert (tmp_path / "run" / "queries.jsonl").read_text() == queries_before

    run_stage(load_config(project(tmp_path, model, GIVEN, run="again", **TINY_SYNTH)), "queries")
    again = read_rows(tmp_path / "again" / CACHE_FILE)
    assert [r["text"] for r in again] == [r["text"] for r in cache]  # same seed, same samples
    run_stage(load_config(project(tmp_path, model, GIVEN, run="other", **TINY_SYNTH | {"seed": 1})), "queries")
    other = read_rows(tmp_path / "other" / CACHE_FILE)
    assert [r["text"] for r in other] != [r["text"] for r in cache] and other[0]["key"] != cache[0]["key"]


def test_cached_samples_are_filtered_deduplicated_and_split(tmp_path, capsys):
    given = ["What do you think of Mozart?", "Who taught you music?", "Tell me about your nephew Karl.",
             "Tell me about Karl, your nephew.", "who taught you MUSIC", "How many coffee beans do you use per cup?",
             "Where do you live now?", "What is the Ninth Symphony about?", "Do you like Vienna?", "Why are you deaf?"]
    synth = {"topic_samples": 0, "categories": ["facts", "opinions", "off_topic"], "max_attempts": 8}
    config = project(tmp_path, tmp_path / "never-loaded", given, **synth)
    samples = ["What's the story of your brother Karl?",  # kept
               "What do you think about Mozart?",  # near a given one
               "How do I fix a flat bicycle tyre?",  # kept
               "Who taught you music?",  # the same as a given one
               "What's the story of your brother, Karl?",  # the same as a kept one once normalised
               "Afliberelle, wie der Wachtschleif fiels?",  # not English
               "What is the story of your brother Karl?",  # near a kept one
               "Do you prefer Haydn or Rossini?"]  # kept: the third, so attempt 7 is the last tried
    key = synthesis_key(load_config(config))
    cats = synth["categories"]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / CACHE_FILE).write_text("".join(
        json.dumps({"key": key, "step": "queries", "index": i, "category": cats[i % 3], "topic": "t", "text": t,
                    "finish_reason": "stop"}) + "\n" for i, t in enumerate(samples)))

    assert main(["queries", str(config), "--synthesize", "3"]) == 0  # the model is never loaded: all cached
    out = capsys.readouterr().out
    assert "warning: dropped 1 of your queries that repeat an earlier one word for word" in out
    assert "note: 1 pairs of your queries are near-duplicates" in out and "synthesis: 8 tried, 3 kept" in out
    rows = read_rows(tmp_path / "run" / "queries.jsonl")
    made = [(r["id"], r["query"], r["source"], r["category"]) for r in rows if r["source"] == "synthesized"]
    assert made == [("syn-00000", samples[0], "synthesized", "facts"), ("syn-00002", samples[2], "synthesized", "off_topic"),
                    ("syn-00007", samples[7], "synthesized", "opinions")]
    assert [r["source"] for r in rows if r["source"] != "synthesized"] == [f"q.jsonl:{i}" for i in (1, 2, 3, 4, 6, 7, 8, 9, 10)]
    split = {r["query"]: r["split"] for r in rows}
    assert split["Tell me about your nephew Karl."] == split["Tell me about Karl, your nephew."]
    stats = json.loads((tmp_path / "run" / "queries_stats.json").read_text())
    assert stats["synthesized"]["dropped"] == {"near_given": 1, "near_synthesized": 1, "not_english": 1,
                                               "same_as_given": 1, "same_as_synthesized": 1}
    assert stats["given"] == {"n": 10, "exact_duplicates_dropped": 1, "near_duplicate_pairs": 1}
    assert stats["diversity"]["synthesized"]["n"] == 3 and stats["near_duplicates_across_splits"] == 0
    assert main(["queries", str(config), "--synthesize", "4"]) == 2  # the settings are part of the stage's inputs
    assert "holds results made with a different synthesize" in capsys.readouterr().err


def test_config_needs_some_queries_and_known_categories(tmp_path):
    path = project(tmp_path, tmp_path, GIVEN)
    data = yaml.safe_load(path.read_text())
    data["queries"]["files"] = []
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="no queries: list files, or set synthesize.n"):
        load_config(path)
    assert load_config(path, ["queries.synthesize.n=5"]).queries.synthesize.n == 5
    with pytest.raises(ConfigError, match=r"queries.synthesize.categories.0: Input should be 'facts'"):
        load_config(path, ["queries.synthesize.categories=[trivia]"])


def test_templated_queries_chain_into_one_group_and_the_stage_says_so(tmp_path, capsys):
    config = project(tmp_path, tmp_path / "never-loaded", [f"What do you think of ship number {i}?" for i in range(10)])
    assert main(["queries", str(config)]) == 0
    out = capsys.readouterr().out
    assert ("warning: the val split is empty: near-duplicate groups go to one split whole and the largest "
            "holds 9 of 10 queries; raise queries.dedup_threshold to group fewer") in out
    assert main(["queries", str(config), "--force", "--set", "queries.dedup_threshold=0.999"]) == 0
    assert "train 6, val 2, test 2" in capsys.readouterr().out
