"""The real pipeline on the real embedded model (SmolLM2-135M), on a tiny budget."""

import json
import os
from pathlib import Path

import pytest
import yaml

from promptdistill.cli import main
from promptdistill.stages.train import training_answer

EXAMPLE = str(Path(__file__).parents[1] / "examples" / "beethoven" / "config.yaml")
TINY = ["queries.limit=16", "queries.train=0.5", "queries.val=0.25", "queries.test=0.25", "sampling.max_tokens=32",
        "eval.latency_queries=2", "eval.bootstrap=200", "sampling.batch_size=6", "train.epochs=null", "train.steps=3",
        "train.batch_size=4", "train.eval_every=3", "train.save_every=2", "train.warmup_steps=0",
        "eval.skills=none",  # kept skills (290 questions x 3 answerers on this model) are test_kept_skills's
        "queries.follow_ups.share=0"]  # single queries here; the demo's simulated chats are test_conversations's


def distill(*args: str, run_dir: Path, extra: list[str] = ()) -> int:
    sets = [x for s in [f"run_dir={run_dir}", *TINY, *extra] for x in ("--set", s)]
    return main([*args, EXAMPLE, *sets])


@pytest.mark.real_model
def test_run_end_to_end_then_skip_then_refuse_changed_inputs(tmp_path, capsys):
    run = tmp_path / "run"
    assert distill("run", run_dir=run) == 0
    out = capsys.readouterr().out

    queries = [json.loads(l) for l in (run / "queries.jsonl").read_text().splitlines()]
    teacher = [json.loads(l) for l in (run / "teacher.jsonl").read_text().splitlines()]
    assert len(queries) == 16 and {q["split"] for q in queries} == {"train", "val", "test"}
    assert sorted(r["id"] for r in teacher) == sorted(q["id"] for q in queries)  # each answered exactly once
    assert all(r["messages"][0]["role"] == "system" and r["tokens"]["prompt"] > 500 for r in teacher)
    assert all(1 <= r["tokens"]["completion"] <= 32 for r in teacher)

    student = run / "student"
    assert (student / "adapter_config.json").is_file() and (student / "adapter_model.safetensors").is_file()
    assert json.loads((run / "checkpoints.jsonl").read_text().splitlines()[0])["step"] == 2
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    # A 135M teacher at 32 tokens often stops mid-sentence; such answers are cut to their last
    # full sentence or, without one, dropped. Only val answers that survive give a val loss.
    has_val = any(r["split"] == "val" and training_answer(r) for r in teacher)
    if has_val:
        assert metrics[0]["step"] == 0 and "val_loss" in metrics[0]  # the untrained model's figure
        metrics = metrics[1:]
    assert [m["step"] for m in metrics] == [1, 2, 3] and ("val_loss" in metrics[-1]) == has_val

    config = yaml.safe_load((run / "config.yaml").read_text())
    assert "Beethoven" in config["system_prompt"] and config["train"]["steps"] == 3
    manifest = json.loads((run / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"queries", "generate", "train", "eval", "report"}
    assert all(s["seconds"] >= 0 and s["outputs"] for s in manifest["stages"].values())
    assert "torch" in manifest["versions"]
    # the machine behind the timings: its CPU count, and bf16 units as the kernel lists them
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    assert manifest["versions"]["cpus"] == len(os.sched_getaffinity(0))
    assert manifest["versions"]["cpu_bf16_units"] == ("avx512_bf16" in flags or "amx_bf16" in flags)
    for stage in ("queries:", "generate:", "train:", "eval:", "report:"):
        assert stage in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["n_test"] == len((run / "eval.jsonl").read_text().splitlines()) >= 2
    assert summary["tokens"]["teacher_input"] > 500 > summary["tokens"]["student_input"]
    assert summary["verdict"] in out  # `distill run` ends by printing the report's first paragraph
    assert (run / "report.md").read_text().startswith("# Distillation report")

    assert distill("run", run_dir=run) == 0  # a re-run reuses everything
    again = capsys.readouterr().out
    assert again.count("already done, skipped") == 5
    assert len((run / "teacher.jsonl").read_text().splitlines()) == 16

    assert distill("generate", run_dir=run, extra=["sampling.temperature=0.3"]) == 2
    err = capsys.readouterr().err
    assert "different sampling" in err and "--force" in err
    assert len((run / "teacher.jsonl").read_text().splitlines()) == 16  # nothing lost
