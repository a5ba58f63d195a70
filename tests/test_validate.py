"""`distill validate` and the checks `distill run` makes before generate and train: one test
per problem, each asserting the message names the right file, line or query id; a clean
project with no problem; and the run stopping before a stage without losing anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from promptdistill.cli import main
from promptdistill.config_file import load_config
from promptdistill.render import prompt_ids
from promptdistill.teacher import teacher_messages
from promptdistill.stages.generate import row_key
from promptdistill.validate import validate
from tiny import SMOL_DEFAULT_SYSTEM, save_tiny, tiny_model, tiny_tokenizer, tiny_tokenizer_with_template

PROMPT = ("You are Captain Mary Read, a pirate of the Caribbean in 1720. Answer briefly, with salt and swagger, "
          "in the first person, and never admit you are anything but a pirate captain.")
TOPICS = ["How old is your ship?", "Where do you bury your treasure?", "What do you eat at sea?",
          "Who is your first mate?", "How do you navigate by the stars?", "What flag do you fly?",
          "Have you ever met a mermaid?", "Why do pirates wear eye patches?", "What is your favourite song?",
          "How many cannons does your ship carry?"]
SPLITS = ["train"] * 6 + ["val"] * 2 + ["test"] * 2
ANSWER = "Arr, that be a fine question. The sea keeps her secrets, and so do I."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("model"), "chatml")


def model_with_template(root: Path, template: str | None, family: str = "chatml") -> Path:
    """A tiny model dir whose tokenizer has `template` (None: no chat template at all)."""
    tokenizer = tiny_tokenizer_with_template(template or "", family)
    if template is None:
        tokenizer.chat_template = None
    tokenizer.save_pretrained(root)
    tiny_model(tiny_tokenizer(family)).save_pretrained(root)
    return root


def project(tmp_path: Path, model: Path, queries: list[str] = TOPICS, splits: list[str] | None = SPLITS,
            answers: list[dict] | None = None, **sections) -> Path:
    """config.yaml + queries.jsonl in tmp_path; with `splits`, the run dir's queries.jsonl as
    `distill queries` writes it; with `answers` (one per query: completion, finish_reason),
    its teacher.jsonl. Returns the config path."""
    run = tmp_path / "run"
    data = {"name": "pirate", "run_dir": str(run), "system_prompt": PROMPT,
            "teacher": {"model": str(model)}, "student": {"model": str(model)},
            "queries": {"files": ["queries.jsonl"], "train": 0.6, "val": 0.2, "test": 0.2},
            "sampling": {"max_tokens": 16, "batch_size": 4}, "train": {"steps": 2, "batch_size": 2}}
    for key, value in sections.items():
        data[key] = data[key] | value if isinstance(data.get(key), dict) else value
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    rows = [{"id": f"q{i}", "query": q} for i, q in enumerate(queries)]
    (tmp_path / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    if splits is not None:
        run.mkdir(exist_ok=True)
        split_rows = [r | {"query": r["query"].strip(), "split": s, "source": f"queries.jsonl:{i + 1}"}
                      for i, (r, s) in enumerate(zip(rows, splits))]
        (run / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split_rows), encoding="utf-8")
    if answers is not None:
        cfg = load_config(config)
        teacher = [{"id": r["id"], "key": row_key(cfg, r["query"]), "split": s, "messages": teacher_messages(cfg, r["query"]),
                    "completion": a["completion"], "finish_reason": a.get("finish_reason", "stop")}
                   for r, s, a in zip(rows, splits, answers)]
        (run / "teacher.jsonl").write_text("".join(json.dumps(r) + "\n" for r in teacher), encoding="utf-8")
    return config


def good_answers(n: int = len(TOPICS)) -> list[dict]:
    return [{"completion": f"{ANSWER} Number {i}."} for i in range(n)]


def problems(config: Path, severity: str, *overrides: str) -> list[str]:
    report = validate(load_config(config, list(overrides)))
    return [str(p) for p in report.problems if p.severity == severity]


def only(found: list[str], *fragments: str) -> str:
    assert len(found) == 1, found
    for fragment in fragments:
        assert fragment in found[0], f"{fragment!r} not in {found[0]!r}"
    return found[0]


def test_clean_project_has_no_problems(tiny, tmp_path, capsys):
    config = project(tmp_path, tiny, answers=good_answers())
    report = validate(load_config(config))
    assert report.problems == [] and report.notes == []
    assert main(["validate", str(config)]) == 0
    assert capsys.readouterr().out.strip() == "no problems found"


def test_prompt_plus_longest_query_overflows_the_context(tiny, tmp_path, capsys):
    long = "What do you think of the quick brown fox? " * 100
    config = project(tmp_path, tiny, queries=TOPICS + [long], splits=SPLITS + ["train"])
    n = len(prompt_ids(tiny_tokenizer("chatml"), teacher_messages(load_config(config), long.strip())))
    assert n + 16 > 2048  # the tiny model's max_position_embeddings
    only(problems(config, "error"), "query 'q10' (queries.jsonl:11): its teacher prompt (system prompt + query) is "
         f"{n} tokens, + sampling.max_tokens 16 = {n + 16} > the teacher's context of 2048 tokens")
    assert main(["validate", str(config)]) == 2
    out = capsys.readouterr().out
    assert "\n1 error:\n  query 'q10'" in out and "train.max_seq_len" in out  # the student side is a warning


def test_a_conversation_is_checked_at_its_last_turn_after_the_whole_history(tiny, tmp_path):
    """Its longest student example is the last turn: the user's turns before it, an answer of up to
    sampling.max_tokens after each, and the last answer; the single queries beside it fit."""
    config = project(tmp_path, tiny, train={"steps": 2, "batch_size": 2, "max_seq_len": 90})
    queries = tmp_path / "run" / "queries.jsonl"
    chat = {"id": "c0", "query": TOPICS[0], "split": "train", "source": "chats.jsonl:1", "turns": TOPICS[:3]}
    queries.write_text(queries.read_text() + json.dumps(chat) + "\n", encoding="utf-8")
    history = [{"role": "user", "content": TOPICS[0]}, {"role": "assistant", "content": ""},
               {"role": "user", "content": TOPICS[1]}, {"role": "assistant", "content": ""},
               {"role": "user", "content": TOPICS[2]}]
    n = len(prompt_ids(tiny_tokenizer("chatml"), history))
    assert n + 16 * 3 > 90 and len(prompt_ids(tiny_tokenizer("chatml"), history[-1:])) + 16 <= 90
    only(problems(config, "warning"), f"query 'c0' (chats.jsonl:1): its student prompt (3 user turns) is {n} tokens, "
         f"+ sampling.max_tokens 16 x 3 answers can reach {n + 48} tokens > train.max_seq_len 90")


def test_empty_query_names_file_and_line(tiny, tmp_path):
    config = project(tmp_path, tiny, queries=TOPICS[:2] + ["   "] + TOPICS[2:], splits=None)
    only(problems(config, "error"), f"{tmp_path / 'queries.jsonl'}:3: empty query")
    assert "does not exist yet" in validate(load_config(config)).notes[0]  # no split: leakage not checked


def test_duplicate_queries_name_ids_and_normalised_text(tiny, tmp_path):
    config = project(tmp_path, tiny, queries=TOPICS + ["how OLD is your ship"], splits=SPLITS + ["train"])
    only(problems(config, "error"), "query 'q0': the same query (normalised: 'how old is your ship') appears 2 times: "
         "'q0' (queries.jsonl:1), 'q10' (queries.jsonl:11)")


def test_duplicate_ids(tiny, tmp_path):
    config = project(tmp_path, tiny, splits=None)
    (tmp_path / "queries.jsonl").write_text('{"id": "a", "query": "Ahoy?"}\n{"id": "a", "query": "Avast?"}\n')
    only(problems(config, "error"), "query 'a': duplicate id at queries.jsonl:1, queries.jsonl:2")


def test_near_duplicates_across_splits(tiny, tmp_path, monkeypatch):
    # MiniLM cosine: 0.94 for the age pair; 0.85 for bury/hide treasure (below 0.9, not flagged)
    queries = TOPICS + ["What is the age of your ship?", "Where do you hide your treasure?"]
    config = project(tmp_path, tiny, queries=queries, splits=SPLITS + ["test", "val"])
    found = only(problems(config, "error"), "query 'q10' (queries.jsonl:11) [test]: near-duplicate of train query 'q0' "
                 "(queries.jsonl:1), cosine 0.94")
    monkeypatch.setattr("promptdistill.validate.CHUNK", 1)  # held-out queries one at a time: same answer
    assert problems(config, "error") == [found]
    assert problems(config, "error", "queries.train=0.5", "queries.val=0.25", "queries.test=0.25")  # same data
    same_split = project(tmp_path, tiny, queries=queries, splits=SPLITS + ["train", "train"])
    assert problems(same_split, "error") == []  # near-duplicates inside train leak nothing


def test_empty_answer_names_the_line(tiny, tmp_path):
    answers = good_answers()
    answers[3]["completion"] = " \n"
    config = project(tmp_path, tiny, answers=answers)
    only(problems(config, "error"), f"{tmp_path / 'run' / 'teacher.jsonl'}:4 (q3): empty answer")


def test_truncated_answers_warn_then_fail_past_the_share(tiny, tmp_path):
    teacher = tmp_path / "run" / "teacher.jsonl"
    answers = good_answers()
    for a in answers[:3]:
        a.update(completion="Arr, a fine question. The sea keeps her", finish_reason="length")  # trimmable
    config = project(tmp_path, tiny, answers=answers)
    assert problems(config, "error") == []
    only(problems(config, "warning"), "3 of 10 answers (30%) hit sampling.max_tokens=16", "drops the 0 with none",
         f"first cut: {teacher}:1 (q0)")
    for a in answers[:8]:
        a.update(completion="Arr, the sea and the wind and the", finish_reason="length")  # no sentence: dropped
    config = project(tmp_path, tiny, answers=answers)
    only(problems(config, "error"), f"{teacher}: 8 of 10 answers (80%) are empty or cut off before a full sentence, "
         "more than checks.max_unusable_share=0.75")
    assert problems(config, "error", "checks.max_unusable_share=0.85") == []


def test_answer_reciting_the_system_prompt(tiny, tmp_path):
    answers = good_answers()
    answers[5]["completion"] = "Aye! Answer briefly, with salt and swagger, in the first person, and never admit it."  # 13 words
    answers[6]["completion"] = "Aye! Answer briefly, with salt and swagger, in the first person, you dog."  # 10 words
    config = project(tmp_path, tiny, answers=answers)
    teacher = tmp_path / "run" / "teacher.jsonl"
    only([w for w in problems(config, "warning") if "recites" in w], f"{teacher}:6 (q5): the answer recites the system "
         "prompt verbatim (12+ words: 'answer briefly with salt and swagger in the first person and never')")
    only(problems(config, "error"), f"{teacher}: 1 of 10 answers (10%) recite the system prompt verbatim, more than "
         "checks.max_recital_share=0.02")
    assert problems(config, "error", "checks.max_recital_share=0.1") == []  # one in ten is tolerated from here
    recited = [w for w in problems(config, "warning", "checks.verbatim_words=10") if "recites" in w]
    assert [w.split(" ", 1)[0] for w in recited] == [f"{teacher}:6", f"{teacher}:7"]


def test_refusals_warn_then_fail_past_the_share(tiny, tmp_path):
    teacher = tmp_path / "run" / "teacher.jsonl"
    answers = good_answers()
    answers[2]["completion"] = "I'm sorry for your loss, matey. The sea takes the best of us."  # in character
    answers[4]["completion"] = "As an AI language model, I do not sail ships."
    config = project(tmp_path, tiny, answers=answers)
    assert problems(config, "error") == []
    only(problems(config, "warning"), f"{teacher}:5 (q4): the answer refuses or speaks as an AI: 'As an AI")
    answers[7]["completion"] = "I'm sorry, but I can't help with plundering."
    config = project(tmp_path, tiny, answers=answers)
    only(problems(config, "error"), f"{teacher}: 2 of 10 answers (20%) refuse or speak as an AI, "
         "more than checks.max_refusal_share=0.1")


def test_student_template_with_a_default_system_prompt_warns_what_it_sees(tmp_path):
    smol = save_tiny(tmp_path / "m", "chatml_default_system")
    config = project(tmp_path, smol)
    assert problems(config, "error") == []
    only(problems(config, "warning"), f"student.model {smol}: its chat template inserts a default system prompt",
         repr(SMOL_DEFAULT_SYSTEM), "it really sees '<|im_start|>system\\n" + SMOL_DEFAULT_SYSTEM)


NEEDS_SYSTEM = ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system prompt is required') }}{% endif %}"
                "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
DROPS_SYSTEM = ("{% for m in messages if m['role'] != 'system' %}"
                "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_student_template_that_needs_a_system_prompt(tiny, tmp_path):
    student = model_with_template(tmp_path / "needs-system", NEEDS_SYSTEM)
    config = project(tmp_path, tiny, student={"model": str(student)})
    only(problems(config, "error"), f"student.model {student}: its chat template cannot express 'no system prompt'",
         "a system prompt is required")


def test_teacher_template_that_drops_the_system_prompt(tiny, tmp_path):
    teacher = model_with_template(tmp_path / "drops-system", DROPS_SYSTEM)
    config = project(tmp_path, tiny, teacher={"model": str(teacher)})
    only(problems(config, "error"), f"teacher.model {teacher}: its chat template drops the system prompt")


def test_model_without_chat_template(tiny, tmp_path):
    base = model_with_template(tmp_path / "base", None)
    config = project(tmp_path, tiny, teacher={"model": str(base)}, student={"model": str(base)})
    found = problems(config, "error")
    assert [p.split(":")[0] for p in found] == [f"teacher.model {base}", f"student.model {base}"]
    assert all("has no chat template" in p for p in found)


def test_remote_teacher_is_noted_not_failed(tiny, tmp_path):
    config = project(tmp_path, tiny, teacher={"model": "some-model", "backend": "openai",
                                              "base_url": "http://127.0.0.1:9/v1"})
    report = validate(load_config(config))
    assert report.problems == []
    assert report.notes[0] == ("teacher some-model is remote (backend openai): no local tokenizer, so its token counts, "
                            "context and chat template are not checked")


# --- the checks inside `distill run` ----------------------------------------------------------


def test_run_stops_before_generate_and_keeps_the_split(tiny, tmp_path, capsys):
    # (An exact duplicate no longer gets this far: the queries stage drops it with a warning.)
    config = project(tmp_path, tiny, queries=TOPICS + ["What do you think of the quick brown fox? " * 100], splits=None)
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: validate: generate not started, nothing changed in {tmp_path / 'run'}")
    assert "query 'q10' (queries.jsonl:11): its teacher prompt" in err and "--no-validate" in err
    run = tmp_path / "run"
    assert (run / "queries.jsonl").is_file() and not (run / "teacher.jsonl").exists()
    manifest = json.loads((run / "manifest.json").read_text())
    assert list(manifest["stages"]) == ["queries"] and "finished" in manifest["stages"]["queries"]


def test_run_stops_before_train_and_loses_no_answer(tiny, tmp_path, capsys):
    config = project(tmp_path, tiny, splits=None)
    assert main(["queries", str(config)]) == 0
    cfg = load_config(config)
    queries = [json.loads(line) for line in (tmp_path / "run" / "queries.jsonl").read_text().splitlines()]
    rows = [{"id": q["id"], "key": row_key(cfg, q["query"]), "split": q["split"], "completion": ANSWER,
             "finish_reason": "stop"} for q in queries]
    rows[1]["completion"] = ""
    teacher = tmp_path / "run" / "teacher.jsonl"
    teacher.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    before = teacher.read_bytes()
    capsys.readouterr()
    assert main(["run", str(config)]) == 2  # generate finds every answer there, then the checks stop train
    captured = capsys.readouterr()
    assert "generate: all 10 teacher answers already in teacher.jsonl" in captured.out
    assert captured.err.startswith("error: validate: train not started")
    assert f"{teacher}:2 ({queries[1]['id']}): empty answer" in captured.err
    assert teacher.read_bytes() == before
    assert not (tmp_path / "run" / "student").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()
    assert "train" not in json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]


def test_no_validate_skips_the_checks(tiny, tmp_path, capsys):
    # An over-long query: the checks stop `distill run` before generate; without them,
    # generate's own context check refuses it once the model is loaded.
    config = project(tmp_path, tiny, queries=TOPICS + ["What do you think of the quick brown fox? " * 100], splits=None)
    assert main(["run", str(config)]) == 2
    assert capsys.readouterr().err.startswith("error: validate: generate not started")
    assert main(["run", str(config), "--no-validate"]) == 2
    err = capsys.readouterr().err
    assert "validate" not in err and err.startswith("error: query 'q10' (queries.jsonl:11): its teacher prompt")
    assert not (tmp_path / "run" / "teacher.jsonl").exists()
