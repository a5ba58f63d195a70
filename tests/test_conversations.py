"""Conversations as sources (OpenAI chat format, ShareGPT), answered turn by turn by the teacher
WITH the prompt, its own earlier answers as the history, and trained on every answered turn."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from promptdistill.cli import main
from promptdistill.rundir import StageError
from promptdistill.stages.queries import load_queries
from tiny import CLI, CLI_ENV, QUESTIONS, REPO, run_verbs_in_one_thread, save_chatty_tiny

SYSTEM = "You are a pirate captain. Answer briefly, like a pirate."


def openai(*turns: str, **extra) -> dict:
    roles = ["user", "assistant"] * len(turns)
    return {"messages": [{"role": r, "content": t} for r, t in zip(roles, turns)], **extra}


def sharegpt(*turns: str, **extra) -> dict:
    return {"conversations": [{"from": f, "value": t} for f, t in zip(["human", "gpt"] * len(turns), turns)], **extra}


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_both_chat_formats_read_into_user_turns_beside_plain_queries(tmp_path):
    f = write(tmp_path / "chats.jsonl", [
        {"id": "plain", "query": "Where is the gold?"},
        openai("Who are you?", "A pirate!", "Where do you sail?", "To Tortuga.", "Why?", id="oa"),
        sharegpt("Ahoy?", "Arr.", "Any rum left?", id="sg"),
        openai("Just one question?"),  # one user turn: a plain query
        {"id": "t", "turns": ["Ahoy?", "  Where to?  "]},
    ])
    rows = {r["id"]: r for r in load_queries(f)}
    assert rows["plain"] == {"id": "plain", "query": "Where is the gold?", "source": "chats.jsonl:1"}
    assert rows["oa"] == {"id": "oa", "query": "Who are you?", "turns": ["Who are you?", "Where do you sail?", "Why?"],
                          "source": "chats.jsonl:2"}
    assert rows["sg"]["turns"] == ["Ahoy?", "Any rum left?"] and "logged" not in rows["sg"]
    assert rows["chats-4"] == {"id": "chats-4", "query": "Just one question?", "source": "chats.jsonl:4"}
    assert rows["t"] == {"id": "t", "query": "Ahoy?", "turns": ["Ahoy?", "Where to?"], "source": "chats.jsonl:5"}
    # Kept as context, the logged answers before the last user turn come along (the last answer does not).
    kept = {r["id"]: r for r in load_queries(f, logged_answers="context")}
    assert kept["oa"]["logged"] == ["A pirate!", "To Tortuga."] and kept["sg"]["logged"] == ["Arr."]


BAD = [  # (row, the field named, what is said)
    ({"messages": [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"}]},
     "messages[0].role", "its own system message"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "42"}]},
     "messages[1].role", "unknown role 'tool'"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hello?"}]},
     "messages[1].role", "two user turns in a row"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]},
     "messages[1].content", "empty turn"),
    ({"messages": [{"role": "assistant", "content": "Hi"}]}, "messages[0].role", "starts with assistant"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "Beep"}]},
     "conversations[1].from", "unknown role 'robot'"),
    ({"conversations": [{"from": "human", "value": None}]}, "conversations[0].value", "expected a string"),
    ({"messages": []}, "messages", "non-empty list"),
    ({"turns": ["Hi", ""]}, "turns[1]", "empty turn"),
    ({"turns": "Hi"}, "turns", "non-empty list"),
]


@pytest.mark.parametrize("row,field,said", BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_a_bad_conversation_is_an_error_naming_file_line_and_field(tmp_path, row, field, said):
    f = write(tmp_path / "chats.jsonl", [openai("Good?", "Yes."), row])
    with pytest.raises(StageError) as err:
        load_queries(f)
    assert f"{f}:2: {field}" in str(err.value) and said in str(err.value)


def test_bad_conversations_drop_skips_them_with_a_warning(tmp_path, capsys):
    f = write(tmp_path / "chats.jsonl", [openai("Good?", "Yes.", "Sure?"), BAD[0][0], BAD[2][0]])
    rows = load_queries(f, bad_conversations="drop")
    assert [r["query"] for r in rows] == ["Good?"]
    assert "dropped 2 conversations" in capsys.readouterr().out


# --- generate turn by turn, and train on every turn ---------------------------------------------

CONVERSATIONS = [openai(QUESTIONS[i], "(logged)", QUESTIONS[i + 1], "(logged)", QUESTIONS[i + 2], id=f"c{i:02d}")
                 for i in range(0, 18, 3)] + [sharegpt(QUESTIONS[20 + i], "(logged)", QUESTIONS[30 + i], id=f"s{i}")
                                              for i in range(4)] + [{"id": f"q{i}", "query": QUESTIONS[40 + i]}
                                                                    for i in range(6)]
N_TURNS = 6 * 3 + 4 * 2 + 6  # 32 teacher answers


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("conversations")
    model = save_chatty_tiny(root / "tiny-chatty")
    write(root / "chats.jsonl", CONVERSATIONS)
    config = {"name": "chats", "system_prompt": SYSTEM, "teacher": {"model": str(model)}, "student": {"model": str(model)},
              "queries": {"files": ["chats.jsonl"], "train": 0.6, "val": 0.2, "test": 0.2},
              "sampling": {"temperature": 1.0, "top_p": 1.0, "max_tokens": 12, "batch_size": 4},
              "lora": {"rank": 4, "alpha": 8}, "train": {"lr": 1e-2, "steps": 2, "batch_size": 4, "eval_every": 2}}
    (root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return root / "config.yaml"


@pytest.fixture(scope="module")
def generated(project, tmp_path_factory) -> Path:
    """queries + generate, uninterrupted, in-process (one thread, like the subprocesses below)."""
    return run_verbs_in_one_thread(project, tmp_path_factory.mktemp("reference") / "run", ("queries", "generate"))


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_the_teacher_answers_every_turn_after_its_own_earlier_answers(generated):
    queries = {q["id"]: q for q in rows_of(generated / "queries.jsonl")}
    assert len(queries) == 16  # one row per conversation: a conversation goes to one split whole
    rows = rows_of(generated / "teacher.jsonl")
    assert len(rows) == N_TURNS and len({r["key"] for r in rows}) == N_TURNS
    by_id = {r["id"]: r for r in rows}
    for cid, q in queries.items():
        turns = q.get("turns", [q["query"]])
        history = []
        for t, user in enumerate(turns):
            row = by_id[cid if t == 0 else f"{cid}#{t + 1}"]
            history.append({"role": "user", "content": user})
            # the prompt, the user's turns, and between them the teacher's OWN answers, not the logged ones
            assert row["messages"] == [{"role": "system", "content": SYSTEM}, *history]
            assert row["split"] == q["split"]
            if "turns" in q:
                assert (row["conversation"], row["turn"]) == (cid, t + 1)
            history.append({"role": "assistant", "content": row["completion"]})
    assert "(logged)" not in json.dumps(rows)


def test_a_first_turn_is_the_same_row_as_that_query_asked_alone(generated, project):
    """Its key and seed are the query's: a conversation's opening and the plain query share an answer."""
    from promptdistill.config_file import load_config
    from promptdistill.stages.generate import row_key

    cfg = load_config(project)
    by_id = {r["id"]: r for r in rows_of(generated / "teacher.jsonl")}
    assert by_id["c00"]["key"] == row_key(cfg, QUESTIONS[0])


def test_generate_killed_mid_conversation_answers_each_turn_exactly_once(project, generated, tmp_path):
    run = tmp_path / "run"
    assert main(["queries", str(project), "--set", f"run_dir={run}"]) == 0
    teacher = run / "teacher.jsonl"
    cmd = [*CLI, "generate", str(project), "--set", f"run_dir={run}"]
    for stop_at in (6, 20):  # during the first round, then during a later one
        proc = subprocess.Popen(cmd, cwd=REPO, env=CLI_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and not (teacher.exists() and teacher.read_bytes().count(b"\n") >= stop_at):
            pass
        assert proc.poll() is None, "generate ended before the kill"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    written = teacher.read_bytes().count(b"\n")
    assert 20 <= written < N_TURNS
    done = subprocess.run(cmd, cwd=REPO, env=CLI_ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{N_TURNS - written} teacher answers ({written} reused)" in done.stdout
    rows = rows_of(teacher)
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in rows_of(generated / "teacher.jsonl"))
    # each turn seeded by what it is, its history the same: the same answers as the uninterrupted run
    assert {r["id"]: r for r in rows} == {r["id"]: r for r in rows_of(generated / "teacher.jsonl")}


def test_a_conversation_is_one_training_example_with_the_loss_on_every_answer(project, generated, tmp_path):
    """The student learns each turn WITHOUT the prompt, after the conversation so far, as the teacher
    wrote it: one example per conversation, every answer the teacher gave trained (but an empty one), its end-of-turn
    only where the teacher ended it; the last answer trimmed to its last full sentence and ended."""
    import shutil

    from promptdistill.config_file import load_config
    from promptdistill.render import render_conversation
    from promptdistill.rundir import RunDir
    from promptdistill.stages.train import load_split, training_answer, whole_conversations
    from promptdistill.objectives.step import trained_runs
    from transformers import AutoTokenizer

    run = tmp_path / "run"
    shutil.copytree(generated, run)
    cfg = load_config(project, [f"run_dir={run}"])
    splits = load_split(cfg, RunDir(run))
    rows = [r for s in ("train", "val", "test") for r in splits[s]]
    assert len(rows) + len(splits["dropped"]) == N_TURNS and not splits["missing"]
    teacher = {r["id"]: r for r in rows_of(run / "teacher.jsonl")}
    for r in rows:  # eval's rows: one per answered turn, after the teacher's conversation without the prompt
        assert r["prompt"] == teacher[r["id"]]["messages"][1:] and r["prompt"][-1] == {"role": "user", "content": r["query"]}
    queries = [q for q in rows_of(run / "queries.jsonl") if q["split"] == "train"]
    examples = {e["conversation"]: e for e in whole_conversations(
        splits["train"] + [r for r in splits["dropped"] if r["split"] == "train"])}
    tok = AutoTokenizer.from_pretrained(cfg.student.model)
    end = tok.convert_ids_to_tokens(tok.eos_token_id)
    several = 0
    for q in queries:
        turns = [teacher[q["id"] if t == 0 else f"{q['id']}#{t + 1}"] for t in range(len(q.get("turns", [q["query"]])))]
        last = training_answer(turns[-1])
        if len(turns) == 1 and last is None:
            assert q["id"] not in examples  # a query asked alone with nothing to learn as an ended answer
            continue
        e = examples[q["id"]]
        assert e["messages"][:-1] == turns[-1]["messages"][1:]  # the history holds the teacher's own answers as written
        expected = [t["completion"].strip() + (end if t["finish_reason"] == "stop" else "") for t in turns[:-1]
                    if t["completion"].strip()]  # an empty answer has no text to learn
        expected.append(last + end if last is not None else turns[-1]["completion"].strip())
        example = render_conversation(tok, e["messages"], e["trained"], e["id"])
        assert [tok.decode(run_) for run_ in trained_runs(example)] == expected
        several += len(turns) > 1
    assert several >= 3 and len(examples) <= len(queries)
    for objective in ("sft", "kl"):
        assert main(["train", str(project), "--set", f"run_dir={run}", "--set", f"train.objective={objective}",
                     "--force"]) == 0
        metrics = rows_of(run / "metrics.jsonl")
        assert metrics and all(m["train_loss"] > 0 for m in metrics if "train_loss" in m)


def test_eval_scores_fidelity_per_turn_and_the_verdict_names_the_weakest(project, tmp_path):
    """summary.json's per-turn fidelity equals the retained share computed here from eval.jsonl's
    per-answer KLs; the report has the table and the plot; the CIs resample whole conversations."""
    import numpy as np

    run = tmp_path / "run"
    sets = [f"run_dir={run}", "queries.train=0.4", "queries.val=0.2", "queries.test=0.4", "eval.bootstrap=200",
            "eval.classifier_train_size=8", "eval.latency_queries=2"]
    for verb in ("queries", "generate", "train", "eval", "report"):
        assert main([verb, str(project), *[x for s in sets for x in ("--set", s)]]) == 0
    summary = json.loads((run / "summary.json").read_text())
    rows = rows_of(run / "eval.jsonl")
    assert {r["turn"] for r in rows} == {1, 2, 3}
    for name, field in (("fidelity", "fidelity_kl"), ("on_policy_fidelity", "on_policy_kl")):
        per_turn = summary["quality"][name]["per_turn"]
        assert list(per_turn) == ["1", "2", "3+"]
        for label, t in (("1", 1), ("2", 2), ("3+", 3)):
            at = [r for r in rows if min(r["turn"], 3) == t]
            s, b = (np.mean([r[field][who] for r in at]) for who in ("student", "base"))
            assert per_turn[label]["n"] == len(at)
            assert per_turn[label]["retained"]["mean"] == pytest.approx((s - b) / (0 - b), rel=1e-9)
    checked = 0
    for label, t in (("1", 1), ("2", 2), ("3+", 3)):  # the answer a turn's fidelity rests on most, found by leaving each out
        at = [r for r in rows if min(r["turn"], 3) == t]
        if len(at) < 3:  # too few answers to leave one out
            assert "weightiest" not in summary["quality"]["fidelity"]["per_turn"][label]
            continue
        kls = [(r["fidelity_kl"]["student"], r["fidelity_kl"]["base"]) for r in at]
        total_s, total_b = sum(s for s, _ in kls), sum(b for _, b in kls)
        left_out = {r["id"]: 1 - (total_s - s) / (total_b - b) for r, (s, b) in zip(at, kls)}
        full = 1 - total_s / total_b
        w = summary["quality"]["fidelity"]["per_turn"][label]["weightiest"]
        assert w["id"] == max(left_out, key=lambda i: abs(left_out[i] - full))
        assert w["retained_without"] == pytest.approx(left_out[w["id"]], rel=1e-9)
        assert w["token"] == max(next(r for r in at if r["id"] == w["id"])["divergent_tokens"], key=lambda x: x["kl"])
        checked += 1
    assert checked >= 1
    words = {t: f"{t} {summary['quality']['fidelity']['per_turn'][t]['retained']['mean']:.0%}" for t in ("1", "2", "3+")}
    assert f"by turn: {words['1']}, {words['2']}, {words['3+']}, weakest at turn" in summary["verdict"]
    report = (run / "report.md").read_text()
    assert "the answer whose leaving out moves retained most" in report
    assert "### By turn of the conversation" in report and (run / "turns.png").stat().st_size > 10_000
    # whole conversations resampled: the pooled CI differs from a row-by-row bootstrap of the same values
    from promptdistill.scores import summarise

    kl = {who: np.array([r["fidelity_kl"][who] for r in rows]) for who in ("student", "base")}
    rowwise = summarise(kl["student"], kl["base"], np.zeros(len(rows)), 200)
    pooled = summary["quality"]["fidelity"]
    assert pooled["retained"]["mean"] == pytest.approx(rowwise["retained"]["mean"], rel=1e-9)
    assert pooled["retained"]["ci95"] != pytest.approx(rowwise["retained"]["ci95"])


def test_a_simulated_user_carries_single_queries_on_into_conversations(project, tmp_path):
    """queries.follow_ups: a share of the single queries gets user turns written by a simulated user
    from the conversation so far, each answered by the teacher; the same turns on every run."""
    from promptdistill.follow_ups import KINDS, reject_reason

    runs = []
    for name in ("one", "two"):
        run = tmp_path / name
        sets = [f"run_dir={run}", "queries.follow_ups.share=0.7", "queries.follow_ups.turns=3"]
        for verb in ("queries", "generate"):
            assert main([verb, str(project), *[x for s in sets for x in ("--set", s)]]) == 0
        runs.append(run)
    queries = rows_of(runs[0] / "queries.jsonl")
    carried = [q for q in queries if "follow_ups" in q]
    assert carried and all("turns" not in q and q["follow_ups"]["n"] == 2 for q in carried)
    assert len(carried) < sum("turns" not in q for q in queries)  # a share, not all
    rows = {r["id"]: r for r in rows_of(runs[0] / "teacher.jsonl")}
    assert len(rows) == N_TURNS + 2 * len(carried)
    for q in carried:
        first, second, third = rows[q["id"]], rows[q["id"] + "#2"], rows[q["id"] + "#3"]
        assert "user" not in first and {second["user"], third["user"]} <= {"simulated", "fallback"}
        # the third turn reads the first two exchanges as they were: the user turn written, the teacher's answer
        assert third["messages"][:5] == [*first["messages"], {"role": "assistant", "content": first["completion"]},
                                         second["messages"][-1], {"role": "assistant", "content": second["completion"]}]
        for row in (second, third):
            user = row["messages"][-1]["content"]
            if row["user"] == "fallback":
                assert user in {plain for _, plain in KINDS.values()}
            else:
                assert reject_reason(user, [m["content"] for m in row["messages"][1:-1:2]], SYSTEM, 200) is None
    # seeded by what each turn is: a second run writes and answers the same
    assert rows == {r["id"]: r for r in rows_of(runs[1] / "teacher.jsonl")}


@pytest.mark.parametrize("raw,expected,why", [
    ("User: Why do you say that?\nChatbot: Because.", "Why do you say that?", None),
    ('"Tell me about your ship."', "Tell me about your ship.", None),
    ("   \n", "", "empty"),
    ("Where is the gold?", "Where is the gold?", "repeats"),
    ("Chatbot: I am a pirate.", "Chatbot: I am a pirate.", "copies_prompt"),
    ("Vous êtes très gentil, capitaine. Où allez-vous?", "Vous êtes très gentil, capitaine. Où allez-vous?", "not_english"),
])
def test_a_simulated_user_turn_is_parsed_and_vetted(raw, expected, why):
    from promptdistill.follow_ups import parse_turn, reject_reason

    turn = parse_turn(raw)
    assert turn == expected
    assert reject_reason(turn, ["Where is the gold?"], SYSTEM, 200) == why


def test_own_history_fidelity_scores_conversations_the_models_carry_themselves(project, tmp_path):
    """Student and base each play the test conversations out after their own answers; one turn's
    reverse KL is recomputed here by plain forward passes of the student and the teacher."""
    import numpy as np

    from promptdistill.answerers import Models
    from promptdistill.config_file import load_config
    from promptdistill.divergence import reverse_kl
    from promptdistill.render import sampled_datum
    from promptdistill.rundir import RunDir

    run = tmp_path / "run"
    # float32: on a CPU with bf16 units `auto` runs bf16, where eval's batched pass and the single
    # forward pass below round apart by about 1%; the check is of the computation, so in float32.
    sets = [f"run_dir={run}", "queries.train=0.4", "queries.val=0.2", "queries.test=0.4", "eval.bootstrap=200",
            "eval.classifier_train_size=8", "eval.latency_queries=2", "queries.follow_ups.share=0.7",
            "student.dtype=float32", "teacher.dtype=float32"]
    for verb in ("queries", "generate", "train", "eval"):
        assert main([verb, str(project), *[x for s in sets for x in ("--set", s)]]) == 0
    summary = json.loads((run / "summary.json").read_text())
    own = summary["quality"]["own_history_fidelity"]
    assert list(own["per_turn"]) == ["1", "2", "3+"]
    rows = rows_of(run / "eval_conversations.jsonl")
    for who in ("student", "base"):
        mine = {(r["conversation"], r["turn"]): r for r in rows if r["who"] == who}
        for (cid, turn), r in mine.items():
            if turn > 1:  # its history is its own earlier turns, answers and all
                before = mine[(cid, turn - 1)]
                assert r["history"] == [*before["history"], {"role": "user", "content": before["user"]},
                                        {"role": "assistant", "content": before["answer"]}]
    assert own["n"] == len(rows) // 2
    # a conversation opens with the very answer eval drew and scored for its first turn: not drawn twice
    openings = {r["conversation"]: r for r in rows_of(run / "eval.jsonl") if r["turn"] == 1}
    reused = [r for r in rows if r["turn"] == 1 and r["conversation"] in openings]
    assert reused
    for r in reused:
        assert r["answer"] == openings[r["conversation"]][r["who"]]
        assert r["reverse_kl"] == openings[r["conversation"]]["on_policy_kl"][r["who"]]
    student = np.array([r["reverse_kl"] for r in rows if r["who"] == "student"])
    base = np.array([r["reverse_kl"] for r in rows if r["who"] == "base"])
    assert own["retained"]["mean"] == pytest.approx((student.mean() - base.mean()) / (0 - base.mean()), rel=1e-9)

    cfg = load_config(project, [f"run_dir={run}", "student.dtype=float32", "teacher.dtype=float32"])
    models = Models(cfg, RunDir(run))
    r = next(r for r in rows if r["who"] == "student" and r["turn"] == 3)
    conversation = [*r["history"], {"role": "user", "content": r["user"]}]
    tokens = r["answer_tokens"]
    mine, prompted = (sampled_datum(models.tokenizer, c, tokens) for c in
                      (conversation, [{"role": "system", "content": SYSTEM}, *conversation]))
    with torch.no_grad():
        def logits(model, d):
            out = model(torch.tensor([d.input_tokens])).logits[0]
            return out[[i for i, w in enumerate(d.weights) if w > 0]]
        student_logits = logits(models.student, mine)
        with models.student.disable_adapter():
            teacher_logits = logits(models.student, prompted)
    assert float(reverse_kl(student_logits, teacher_logits).mean()) == pytest.approx(r["reverse_kl"], rel=1e-4, abs=1e-6)
    # distill compare sets the per-turn scores side by side
    assert main(["compare", str(run), str(tmp_path / "run"), "--out", str(tmp_path / "compare.md")]) == 0
    compared = (tmp_path / "compare.md").read_text()
    from promptdistill.formatting import pct_ci

    assert "By turn of the conversation" in compared
    assert f"own_history_fidelity turn 2 retained | {pct_ci(own['per_turn']['2']['retained'])}" in compared
