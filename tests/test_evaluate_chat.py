"""eval and chat on a finished tiny run: a tiny model, hand-written teacher answers."""

import io
import json

import pytest
from tiny import PIRATE, evaluated_tiny_run

from promptdistill.config_file import load_config
from promptdistill.pipeline import run_stage
from promptdistill.rundir import RunDir, StageError
from promptdistill.stages.chat import chat


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalrun")
    pricing = {"source": "test", "date": "2026-11-24", "teacher": {"input_per_1m": 1.0, "output_per_1m": 2.0},
               "student": {"input_per_1m": 1.0, "output_per_1m": 2.0}, "training_per_1m_tokens": 4.0}
    return evaluated_tiny_run(tmp, pricing=pricing,
                              eval={"classifier_train_size": 12, "latency_queries": 3, "bootstrap": 200})


def test_eval_writes_rows_and_a_consistent_summary(finished_run):
    cfg, run = finished_run
    rows = [json.loads(l) for l in (run.root / "eval.jsonl").read_text().splitlines()]
    summary = json.loads((run.root / "summary.json").read_text())
    assert len(rows) == summary["n_test"] == 6
    for row in rows:
        assert set(row) >= {"id", "query", "teacher", "teacher_again", "student", "base", "similarity", "persona_prob", "nll"}
        assert row["teacher"] in PIRATE
        assert all(-1.0 <= v <= 1.0001 for v in row["similarity"].values())
    for name in ("similarity", "likelihood", "persona"):
        q = summary["quality"][name]
        for who in ("student", "base", "ceiling"):
            lo, hi = q[who]["ci95"]
            assert lo <= q[who]["mean"] <= hi
        gap = q["ceiling"]["mean"] - q["base"]["mean"]
        if gap == 0:  # no room between floor and ceiling: retained is undefined (null), not 0 or 100%
            assert q["retained"]["mean"] is None
        else:
            assert q["retained"]["mean"] == pytest.approx((q["student"]["mean"] - q["base"]["mean"]) / gap)
    assert 0.0 <= summary["quality"]["persona"]["classifier"]["heldout_accuracy"] <= 1.0
    tokens = summary["tokens"]
    assert tokens["teacher_input"] == 40 and tokens["student_input"] < tokens["teacher_input"]
    assert summary["latency"]["teacher"]["queries"] == 3 and summary["latency"]["student"]["ttft_ms_median"] > 0
    assert summary["training"]["steps"] == 3 and summary["verdict"]


def test_cost_follows_the_config_prices(finished_run):
    _, run = finished_run
    summary = json.loads((run.root / "summary.json").read_text())
    t, cost = summary["tokens"], summary["cost"]
    assert cost["per_1m_queries"]["teacher"] == pytest.approx(t["teacher_input"] * 1.0 + t["teacher_output"] * 2.0)
    assert cost["one_time"]["generation"] == pytest.approx(24 * (40 * 1.0 + 9 * 2.0) / 1e6)
    trained = sum(json.loads(l).get("tokens", 0) for l in (run.root / "metrics.jsonl").read_text().splitlines())
    assert cost["one_time"]["training"] == pytest.approx(trained * 4.0 / 1e6)
    saving = (cost["per_1m_queries"]["teacher"] - cost["per_1m_queries"]["student"]) / 1e6
    if saving > 0:
        assert cost["break_even_queries"] == pytest.approx(cost["one_time"]["total"] / saving)


def test_with_best_of_the_generation_cost_counts_every_try(finished_run, tmp_path):
    from promptdistill.stages.evaluate import cost_section

    cfg, run = finished_run
    rows = [json.loads(l) for l in run.teacher.read_text().splitlines()]
    copy = RunDir(tmp_path / "run")
    copy.root.mkdir()
    copy.teacher.write_text(run.teacher.read_text())
    # Three tries for the first row (the kept one among them), one for every other, and one of
    # a row no longer in teacher.jsonl (another query set): not this run's cost.
    tries = [{"key": rows[0]["key"], "try": i, "tokens": {"prompt": 40, "completion": 100}} for i in range(3)]
    tries += [{"key": r["key"], "try": 0, "tokens": r["tokens"]} for r in rows[1:]]
    tries.append({"key": "gone", "try": 0, "tokens": {"prompt": 10**6, "completion": 10**6}})
    (copy.root / "teacher_tries.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tries))
    tokens = {"teacher_input": 40, "teacher_output": 9, "student_input": 5, "student_output": 9}
    one_time = cost_section(cfg, copy, tokens)["one_time"]
    assert one_time["teacher_answers_paid"] == len(rows) + 2
    assert one_time["generation"] == pytest.approx((3 * (40 + 100 * 2.0) + (len(rows) - 1) * (40 + 9 * 2.0)) / 1e6)


def test_chat_answers_piped_questions_with_and_without_compare(finished_run):
    cfg, run = finished_run
    out = io.StringIO()
    assert chat(cfg, run, greedy=True, lines=io.StringIO("Where is the gold?\n\nWho are you?\n"), out=out) == 2
    text = out.getvalue()
    assert text.count("you> ") == 2 and text.count("student> ") == 2 and "teacher> " not in text
    out = io.StringIO()
    chat(cfg, run, compare=True, greedy=True, lines=io.StringIO("Where is the gold?\n"), out=out)
    assert [l.split("> ")[0] for l in out.getvalue().splitlines() if "> " in l] == ["you", "student", "teacher", "base"]


def student_answers(text: str) -> list[str]:
    """The student's answers in a chat transcript (an answer may run over several lines)."""
    return [part.split("\nyou> ")[0].split("\n(new conversation)")[0].rstrip("\n") for part in text.split("student> ")[1:]]


def test_chat_keeps_each_answerers_history_and_new_starts_over(finished_run):
    """The second answer is the student's, greedy, after the first exchange; after /reset, and with
    history off, the same question gets the answer it gets as a first line."""
    from promptdistill.answerers import Models, sampling_params
    from promptdistill.backends.base import SamplingParams
    from promptdistill.render import prompt_ids

    cfg, run = finished_run
    out = io.StringIO()
    assert chat(cfg, run, greedy=True, lines=io.StringIO("Where is the gold?\nWho are you?\n/reset\nWho are you?\n"),
                out=out) == 3
    first, second, after_new = student_answers(out.getvalue())
    out = io.StringIO()
    chat(cfg, run, greedy=True, lines=io.StringIO("Who are you?\n"), out=out)
    alone = student_answers(out.getvalue())[0]
    assert after_new == alone
    out = io.StringIO()
    chat(cfg, run, greedy=True, history=False, lines=io.StringIO("Where is the gold?\nWho are you?\n"), out=out)
    assert student_answers(out.getvalue()) == [first, alone]
    # independently: the student's greedy decode of the whole conversation so far
    sampler = Models(cfg, run).sampler("student")
    params = SamplingParams(temperature=0, max_tokens=sampling_params(cfg).max_tokens,
                            repetition_penalty=sampling_params(cfg).repetition_penalty)
    conversation = [{"role": "user", "content": "Where is the gold?"}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "Who are you?"}]
    assert sampler.generate([prompt_ids(sampler.tokenizer, conversation)], params, [0])[0].text.strip() == second.strip()


def test_chat_drops_the_oldest_exchanges_that_no_longer_fit_the_context(finished_run):
    from promptdistill.answerers import Models
    from promptdistill.render import prompt_ids
    from promptdistill.stages.chat import fitted

    cfg, run = finished_run
    sampler = Models(cfg, run).sampler("student")
    window = sampler.model.config.max_position_embeddings
    long = [{"role": r, "content": f"turn {i} " + "arr matey " * 60} for i in range(40) for r in ("user", "assistant")]
    conversation = long + [{"role": "user", "content": "And now?"}]
    out = io.StringIO()
    kept = fitted(sampler, conversation, 32, out)
    assert kept[-1] == conversation[-1] and kept == conversation[len(conversation) - len(kept):]
    assert kept[0]["role"] == "user" and len(prompt_ids(sampler.tokenizer, kept)) + 32 <= window
    assert len(prompt_ids(sampler.tokenizer, [conversation[-len(kept) - 2], conversation[-len(kept) - 1], *kept])) + 32 > window
    assert f"oldest exchanges dropped to fit the context of {window} tokens" in out.getvalue()


def test_eval_refuses_an_adapter_from_another_base_model(finished_run, tmp_path):
    cfg, run = finished_run
    adapter = json.loads((run.student / "adapter_config.json").read_text())
    other = run.root.parent / "other-run"
    import shutil
    shutil.copytree(run.root, other)
    adapter["base_model_name_or_path"] = "/somewhere/else"
    (other / "student" / "adapter_config.json").write_text(json.dumps(adapter))
    with pytest.raises(StageError, match="trained on '/somewhere/else'"):
        chat(load_config(other), RunDir(other), lines=io.StringIO(""), out=io.StringIO())


def test_force_on_a_late_stage_moves_only_that_stage_and_later(finished_run):
    cfg, run = finished_run
    adapter = (run.student / "adapter_model.safetensors").read_bytes()
    run_stage(cfg, "report")
    run_stage(cfg, "report", force=True)
    assert (run.student / "adapter_model.safetensors").read_bytes() == adapter  # train's output stays
    old = sorted((run.root / "old").iterdir())[-1]
    assert (old / "report.md").is_file() and not (old / "student").exists() and not (old / "summary.json").exists()
    assert (run.root / "report.md").is_file() and (run.root / "summary.json").is_file()
