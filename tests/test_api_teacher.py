"""A teacher that lives only behind its endpoint, through every stage: a real `distill serve
--teacher` process on 127.0.0.1 serves a tiny pirate model, and a run whose teacher is named
`made-up/teacher` (nothing on this machine or offline hub resolves it) reaches it with
backend openai. `distill run` then goes through queries, generate (top-k log-probabilities
with token ids), train (sft, then kl on those log-probabilities), eval and report, and no
teacher weights are ever loaded in this process.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from test_serve import ENV, start_server
from tiny import QUESTIONS, save_pirate_tiny, save_tiny, tiny_tokenizer, trained_tiny_run

from promptdistill.cli import main
from promptdistill.config_file import load_config
from promptdistill.models import ModelError, resolve_model
from promptdistill.objectives.kl import recorded_targets
from promptdistill.objectives.step import StepContext, answer_tokens
from promptdistill.render import render_example
from promptdistill.rundir import RunDir, StageError, append_jsonl
from promptdistill.stages.train import training_answer

SYSTEM = "You are a pirate. Talk like one."
TEACHER_NAME = "made-up/teacher"
TOP = 5


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory, one_thread_module):
    """The served pirate teacher's server process."""
    root = tmp_path_factory.mktemp("pirate")
    model = save_pirate_tiny(root / "pirate", SYSTEM)
    # serve needs a finished run; its teacher is its base weights, adapter off: the pirate model.
    _, run = trained_tiny_run(root, model, 12, name="pirate", system_prompt=SYSTEM, lora={"rank": 4, "alpha": 8},
                              train={"steps": 1, "batch_size": 4, "eval_every": 1})
    server = start_server(run.root, root / "logs", "--teacher", env=ENV)
    yield server
    server.stop()


def project(root: Path, base_url: str, student: Path) -> Path:
    queries = [{"id": f"q{i:02d}", "query": QUESTIONS[i]} for i in range(16)]
    (root / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    config = {"name": "api-teacher", "run_dir": str(root / "run"), "system_prompt": SYSTEM,
              "teacher": {"model": TEACHER_NAME, "backend": "openai", "base_url": base_url, "api_model": "pirate-teacher",
                          "logprob_token_ids": True, "concurrency": 4, "timeout": 30},
              "student": {"model": str(student)},
              "queries": {"files": ["q.jsonl"], "train": 0.5, "val": 0.25, "test": 0.25},
              "sampling": {"temperature": 1.0, "top_p": 1.0, "max_tokens": 16, "batch_size": 4, "top_logprobs": TOP},
              "lora": {"rank": 4, "alpha": 8},
              "train": {"phases": [{"objective": "sft", "steps": 2}, {"objective": "kl", "steps": 2}], "lr": 1e-2,
                        "batch_size": 4, "eval_every": 2},
              "eval": {"classifier_train_size": 8, "latency_queries": 2, "bootstrap": 100, "skills": "none"}}
    (root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root / "config.yaml"


def loaded_weights(monkeypatch) -> list[str]:
    """Every model dir whose causal-LM weights are loaded in this process, recorded on the way
    to transformers' own loader (which still loads them)."""
    from transformers import AutoModelForCausalLM

    loads, real = [], AutoModelForCausalLM.from_pretrained.__func__

    def recording(cls, path, *args, **kwargs):
        loads.append(str(path))
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(recording))
    return loads


def fidelity_by_hand(student_dir: Path, adapter: Path, teacher_row: dict) -> float:
    """Mean top-k KL(teacher's renormalised top-k || student) over the answer positions the
    teacher's recorded distributions describe: plain transformers + peft, the chat template
    applied by the tokenizer, the recorded numbers read straight from teacher.jsonl."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(student_dir)
    student = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student_dir), str(adapter)).eval()
    prompt = tok(tok.apply_chat_template([{"role": "user", "content": teacher_row["messages"][1]["content"]}],
                                         add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
    answer = tok(training_answer(teacher_row), add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    sampled = [e["id"] for e in teacher_row["logprobs"]]
    same = 0
    while same < min(len(sampled), len(answer)) and sampled[same] == answer[same]:
        same += 1
    described = min(same + 1, len(sampled), len(answer))  # up to the first token where the two part, its context still shared
    with torch.no_grad():
        logp = torch.log_softmax(student(input_ids=torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1], -1)
    kls = []
    for p in range(described):
        top = teacher_row["logprobs"][p]["top"]
        z = math.log(sum(math.exp(lp) for _, _, lp in top))
        kls.append(sum(math.exp(lp - z) * (lp - z - float(logp[p, i])) for _, i, lp in top))
    return sum(kls) / len(kls)


def test_distill_run_with_a_teacher_only_behind_its_endpoint(endpoint, tmp_path, monkeypatch, capsys):
    server = endpoint
    student = save_tiny(tmp_path)
    with pytest.raises(ModelError):  # so anything that tried to load the teacher would have failed the run
        resolve_model(TEACHER_NAME)
    loads = loaded_weights(monkeypatch)

    assert main(["run", str(project(tmp_path, f"{server.url}/v1", student))]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "run"
    assert loads and {Path(p).resolve() for p in loads} == {student.resolve()}, loads  # the student's alone

    teacher = [json.loads(line) for line in (run / "teacher.jsonl").read_text().splitlines()]
    assert len(teacher) == 16
    for r in teacher:  # the endpoint's numbers: usage counts, and token ids with every log-probability
        assert r["tokens"]["completion"] == len(r["logprobs"]) >= 1 and r["tokens"]["prompt"] > 10
        assert all(e["id"] is not None and len(e["top"]) == TOP and all(t[1] is not None for t in e["top"])
                   for e in r["logprobs"])

    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m.get("objective") for m in metrics if "train_loss" in m] == ["sft", "sft", "kl", "kl"]
    assert f"train: kl soft targets: the top-{TOP} log-probabilities pirate-teacher returned" in out
    assert not (run / "teacher_topk").exists()  # nothing computed here, so nothing stored

    summary = json.loads((run / "summary.json").read_text())
    f = summary["quality"]["fidelity"]
    assert f["source"] == f"endpoint's top-{TOP} log-probabilities, renormalised" and f["n"] >= 1
    assert 0 < f["tokens"]["scored"] <= f["tokens"]["of"] and f["ceiling"]["ci95"] == [0.0, 0.0]
    assert f["base"]["mean"] > 0 and f["student"]["mean"] > 0
    assert "on_policy_fidelity" not in summary["quality"]
    assert any(n.startswith("on-policy fidelity skipped: the teacher is behind its endpoint") for n in summary["notes"])
    assert {"likelihood", "similarity"} <= set(summary["quality"])
    assert summary["models"]["teacher_endpoint"] == f"{server.url}/v1"
    sources = summary["sources"]
    assert sources["teacher"] == f"the endpoint {server.url}/v1 (model pirate-teacher); no teacher weights loaded here"
    assert sources["teacher_latency"].startswith(f"over streaming from {server.url}/v1")
    assert sources["teacher_tokens"].startswith("the server's usage")
    lat = summary["latency"]["teacher"]
    assert lat["queries"] == 2 and 0 < lat["ttft_ms_median"] <= lat["total_ms_median"]
    test_keys = {r["key"] for r in teacher if r["split"] == "test"}
    usage = [r["tokens"]["prompt"] for r in teacher if r["key"] in test_keys and training_answer(r)]
    assert summary["tokens"]["teacher_input"] == pytest.approx(sum(usage) / len(usage))

    rows = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    by_id = {r["id"]: r for r in teacher}
    scored = [r for r in rows if (r["fidelity_kl"] or {}).get("student") is not None]
    assert len(scored) == f["n"]
    mine = fidelity_by_hand(student, run / "student", by_id[scored[0]["id"]])
    assert scored[0]["fidelity_kl"]["student"] == pytest.approx(mine, rel=1e-4)

    report = (run / "report.md").read_text()
    assert "## Where the numbers come from" in report and "no teacher weights loaded here" in report
    assert "over streaming from its endpoint" in report


def test_kl_targets_from_recorded_log_probabilities_end_where_the_tokens_part(tmp_path):
    """Up to and including the first position where the trained tokens leave the sampled ones,
    the recorded top-k (cut to train.topk); past it, the trained token with all the probability."""
    config = project(tmp_path, "http://127.0.0.1:9/v1", tmp_path)
    cfg = load_config(config, ["train.topk=2"])
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    e = render_example(tiny_tokenizer("chatml"), [{"role": "user", "content": "Ahoy?"}], "Arr, the sea be my home.", "q1")
    trained = answer_tokens(e)
    sampled = trained[:2] + [trained[2] + 1] + trained[3:5]  # the teacher wrote another third token, then stopped early
    top = [[[None, t, -0.1], [None, t + 7, -2.5], [None, t + 9, -3.0]] for t in sampled]
    append_jsonl(run.teacher, [{"key": "k1", "logprobs": [{"token": None, "id": t, "logprob": -0.1, "top": tp}
                                                          for t, tp in zip(sampled, top)]}])
    ctx = StepContext(cfg, run, trainer=None, rows={"q1": {"keys": ["k1"]}})
    ids, logprobs = recorded_targets(ctx, [e])["q1"]
    assert ids.shape == logprobs.shape == (len(trained), 2)
    assert ids[:3].tolist() == [[t, t + 7] for t in sampled[:3]]  # the third's context is still the sampled one
    assert torch.allclose(logprobs[:3], torch.tensor([[-0.1, -2.5]] * 3))
    assert ids[3:, 0].tolist() == trained[3:] and torch.softmax(logprobs[3:], -1)[:, 0].tolist() == [1.0] * (len(trained) - 3)

    append_jsonl(run.teacher, [{"key": "k2", "logprobs": [{"token": "Arr", "id": None, "logprob": -0.1, "top": []}]}])
    ctx.rows["q1"]["keys"] = ["k2"]  # token text only, as an OpenAI-style server answers without logprob_token_ids
    with pytest.raises(StageError, match=r"answer 'k2' of example 'q1' in teacher.jsonl carries no top-k log-probabilities with "
                                         r"token ids; set sampling.top_logprobs \(and teacher.logprob_token_ids"):
        recorded_targets(ctx, [e])
