"""Crash safety: `distill generate` and `distill train` run as real subprocesses, are
SIGKILLed at seeded random points (several times over the same run dir), re-run to the
end, and must then hold exactly what an uninterrupted run holds. Ctrl-C (SIGINT) stops
training at the end of a step with a checkpoint for it, and the re-run resumes there.

Each stage of this tiny run lasts well under a second after a ~4 s start-up, so the kills
poll the run dir (teacher.jsonl lines, checkpoints.jsonl, metrics.jsonl) to land mid-stage
and add a seeded random delay on top; every kill is checked to have hit a live process.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from safetensors.torch import load_file

from promptdistill.cli import main
from tiny import CLI, CLI_ENV, QUESTIONS, REPO, run_verbs_in_one_thread, save_chatty_tiny

STEPS = 12
# A resumed run redoes exactly the same arithmetic (data order and LR are functions of the
# step; adapter, optimiser and RNG state are checkpointed), so its losses are bit-identical:
# measured difference 0.0. The tolerance only allows for float formatting.
VAL_LOSS_TOLERANCE = 1e-9
SYSTEM_PROMPT = (
    "You are Captain Mary Read, a cheerful pirate captain of the early eighteenth century. You answer every "
    "question briefly, in one or two sentences, with plenty of nautical words, a little boasting about your "
    "ship the Ranger, and never admit to being anything but a pirate. If asked about modern things, you "
    "treat them as strange sea monsters and change the subject back to treasure."
)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A config (teacher = student = the tiny model) and 40 queries; returns the config path."""
    root = tmp_path_factory.mktemp("crash")
    model = save_chatty_tiny(root / "tiny-chatty")
    queries = [{"id": f"q{i:03d}", "query": QUESTIONS[i]}
               for i in range(40)]
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries), encoding="utf-8")
    config = {
        "name": "crash", "system_prompt": SYSTEM_PROMPT,
        "teacher": {"model": str(model)}, "student": {"model": str(model)},
        "queries": {"files": ["queries.jsonl"], "train": 0.6, "val": 0.2, "test": 0.2},
        "sampling": {"temperature": 1.0, "top_p": 1.0, "max_tokens": 16, "batch_size": 4},
        "lora": {"rank": 4, "alpha": 8},
        "train": {"lr": 1e-2, "steps": STEPS, "batch_size": 4, "save_every": 2, "eval_every": 4,
                  "warmup_steps": 0, "keep_checkpoints": 2},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return root / "config.yaml"


@pytest.fixture(scope="module")
def reference(project, tmp_path_factory) -> Path:
    """The same run, uninterrupted, in-process (one thread, like the subprocesses)."""
    return run_verbs_in_one_thread(project, tmp_path_factory.mktemp("reference") / "run", ("queries", "generate", "train"))


# --- driving and observing a subprocess ---------------------------------------------


@dataclass
class Result:
    code: int
    out: str
    err: str


def distill(verb: str, config: Path, run: Path, stop_when: Callable[[], bool] | None = None,
            delay: float = 0.0, sig: int = signal.SIGKILL, timeout: float = 120) -> Result:
    """`python -m promptdistill.cli VERB CONFIG --set run_dir=RUN`; with `stop_when`, send
    `sig` `delay` seconds after stop_when() first holds (polled every 2 ms)."""
    logs = run.parent / "logs"
    logs.mkdir(exist_ok=True)
    n = len(list(logs.iterdir()))
    out_path, err_path = logs / f"{n:02d}-{verb}.out", logs / f"{n:02d}-{verb}.err"
    cmd = [*CLI, verb, str(config), "--set", f"run_dir={run}"]
    deadline = time.monotonic() + timeout
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=CLI_ENV, stdout=out, stderr=err)
        try:
            if stop_when is not None:
                while proc.poll() is None and not stop_when():
                    assert time.monotonic() < deadline, f"{verb}: stop condition never held"
                    time.sleep(0.002)
                time.sleep(delay)
                if proc.poll() is None:
                    proc.send_signal(sig)
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return Result(proc.returncode, out_path.read_text(), err_path.read_text())


def killed(r: Result) -> bool:
    return r.code == -signal.SIGKILL


def complete_rows(path: Path) -> list[dict]:
    """The whole lines of a JSONL file being written by another process."""
    if not path.exists():
        return []
    data = path.read_bytes()
    return [json.loads(line) for line in data[: data.rfind(b"\n") + 1].splitlines() if line.strip()]


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def last_step(run: Path) -> int:
    return max((r["step"] for r in complete_rows(run / "metrics.jsonl")), default=-1)


def stage_started(run: Path, stage: str) -> bool:
    path = run / "manifest.json"
    return path.exists() and stage in json.loads(path.read_text(encoding="utf-8"))["stages"]


def assert_json_outputs_parse(run: Path) -> None:
    manifest = json.loads((run / "manifest.json").read_text(encoding="utf-8"))
    assert isinstance(manifest["stages"], dict)
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    assert config["name"] == "crash" and config["system_prompt"] == SYSTEM_PROMPT


def resumable_checkpoint(run: Path) -> dict | None:
    """The checkpoint a re-run must resume from: the last logged one that is whole."""
    rows = [r for r in complete_rows(run / "checkpoints.jsonl") if (run / r["path"] / "trainer_state.pt").exists()]
    return rows[-1] if rows else None


def copy_generated(reference: Path, run: Path) -> None:
    """A run dir holding the reference's queries and teacher answers, not yet trained."""
    run.mkdir(parents=True)
    for name in ("queries.jsonl", "teacher.jsonl"):
        shutil.copy(reference / name, run / name)


def assert_trained_like(run: Path, reference: Path) -> float:
    """metrics.jsonl has steps 0..STEPS once each, in order, with the reference's losses, and
    the adapter equals the reference's. Returns the final val-loss difference."""
    ours, ref = complete_rows(run / "metrics.jsonl"), complete_rows(reference / "metrics.jsonl")
    assert [r["step"] for r in ours] == list(range(STEPS + 1))
    assert (run / "metrics.jsonl").read_bytes().endswith(b"\n")
    for a, b in zip(ours, ref):
        for key in ("lr", "train_loss", "val_loss", "tokens"):
            assert (key in a) == (key in b), (a, b)
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=VAL_LOSS_TOLERANCE), (key, a, b)
    diff = abs(ours[-1]["val_loss"] - ref[-1]["val_loss"])
    assert diff <= VAL_LOSS_TOLERANCE
    mine, theirs = load_file(run / "student" / "adapter_model.safetensors"), load_file(reference / "student" / "adapter_model.safetensors")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    return diff


# --- the tests ------------------------------------------------------------------------


def test_reference_run_is_a_real_run(reference):
    """The data the kills are checked against: most answers trainable, val loss moving."""
    teacher = complete_rows(reference / "teacher.jsonl")
    assert len(teacher) == 40 and sum(r["finish_reason"] == "stop" for r in teacher) >= 20
    # The adapter trains, so "equals the reference's adapter" below says something: 12 steps
    # move val loss 5.7997 -> 5.5715 on this data, the same on every run (the teacher's seeds
    # follow the tiny model's contents, not its tmp path); other data moved it 0.005 to 0.3.
    # LoRA's B starts at zero: trained means non-zero.
    metrics = complete_rows(reference / "metrics.jsonl")
    assert metrics[0]["val_loss"] - metrics[-1]["val_loss"] > 0.01
    adapter = load_file(reference / "student" / "adapter_model.safetensors")
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and all(t.abs().max() > 1e-4 for t in lora_b)
    assert [r["step"] for r in complete_rows(reference / "checkpoints.jsonl")] == [2, 4, 6, 8, 10]


def test_generate_killed_three_times_then_finished_equals_an_uninterrupted_run(project, reference, tmp_path):
    run = tmp_path / "run"
    assert main(["queries", str(project), "--set", f"run_dir={run}"]) == 0
    teacher = run / "teacher.jsonl"
    rng = random.Random(20240611)
    kills = [  # (where, condition, random delay after it)
        ("while the teacher loads", lambda: stage_started(run, "generate"), rng.uniform(0.0, 0.2)),
        ("after a few batches", lambda n=rng.randint(4, 12): lines(teacher) >= n, rng.uniform(0.0, 0.02)),
        ("after most batches", lambda n=rng.randint(20, 28): lines(teacher) >= n, rng.uniform(0.0, 0.02)),
    ]
    for i, (where, condition, delay) in enumerate(kills):
        r = distill("generate", project, run, stop_when=condition, delay=delay)
        assert killed(r), f"kill {i} ({where}) missed: the process ended with {r.code}\n{r.err[-2000:]}"
        print(f"generate kill {i} ({where}, +{delay:.3f}s): {lines(teacher)} of 40 answers written")
        assert_json_outputs_parse(run)
        if i == 2:
            assert "cutting a torn last line" in r.out  # the one left below, after kill 1
        if i == 1:
            # A kill between two write() calls of one batch leaves a torn last line; the kills
            # above almost never land there (a batch is one small write), so leave one by hand.
            with open(teacher, "a", encoding="utf-8") as f:
                f.write('{"id": "q999", "key": "torn", "completion": "Arr, the')
    assert 0 < lines(teacher) < 40  # the kills did land mid-stage

    r = distill("generate", project, run)
    assert r.code == 0, r.err[-3000:]
    assert "reused" in r.out
    assert_json_outputs_parse(run)

    text = teacher.read_text(encoding="utf-8")
    assert text.endswith("\n")
    rows = [json.loads(line) for line in text.splitlines()]  # every line parses
    queries = [json.loads(line) for line in (run / "queries.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(q["id"] for q in queries)  # each answered exactly once
    assert len({r["key"] for r in rows}) == len(rows)
    # Each row is sampled from its own seed, so resuming changes no answer.
    expected = {r["id"]: r for r in complete_rows(reference / "teacher.jsonl")}
    assert {r["id"]: r for r in rows} == expected
    assert json.loads((run / "manifest.json").read_text())["stages"]["generate"].get("finished")


def test_train_killed_three_times_resumes_from_checkpoints_and_matches(project, reference, tmp_path):
    run = tmp_path / "run"
    copy_generated(reference, run)
    rng = random.Random(7)
    kills = [  # (where, condition, random delay): each lands after at least one checkpoint
        ("after the first checkpoint", lambda: lines(run / "checkpoints.jsonl") >= 1, rng.uniform(0.0, 0.05)),
        ("around steps 5-8", rng.randint(5, 7), rng.uniform(0.0, 0.03)),
        ("around steps 9-11", rng.randint(9, 10), rng.uniform(0.0, 0.02)),
    ]
    expect_resume = None
    for i, (where, condition, delay) in enumerate(kills):
        if isinstance(condition, int):  # a step later than any this run dir has seen
            step = max(condition, last_step(run) + 2)
            condition = lambda step=step: last_step(run) >= step
        r = distill("train", project, run, stop_when=condition, delay=delay)
        assert killed(r), f"kill {i} ({where}) missed: the process ended with {r.code}\n{r.err[-2000:]}"
        print(f"train kill {i} ({where}, +{delay:.3f}s): at step {last_step(run)}")
        if expect_resume is not None:
            assert f"resuming from {expect_resume['path']} (step {expect_resume['step']} of {STEPS})" in r.out
        assert_json_outputs_parse(run)
        expect_resume = resumable_checkpoint(run)
        assert expect_resume is not None and expect_resume["step"] < STEPS

    r = distill("train", project, run)
    assert r.code == 0, r.err[-3000:]
    assert f"resuming from {expect_resume['path']} (step {expect_resume['step']} of {STEPS})" in r.out
    assert_json_outputs_parse(run)
    diff = assert_trained_like(run, reference)
    print(f"final val loss differs from the uninterrupted run's by {diff:g}")


def test_ctrl_c_stops_at_a_step_end_with_a_checkpoint_and_the_rerun_matches(project, reference, tmp_path):
    run = tmp_path / "run"
    copy_generated(reference, run)
    rng = random.Random(3)
    at, delay = rng.randint(3, 7), rng.uniform(0.0, 0.03)
    r = distill("train", project, run, stop_when=lambda: last_step(run) >= at, delay=delay, sig=signal.SIGINT)
    assert r.code == 130, r.err[-3000:]
    assert "Ctrl-C: finishing this step, then saving a checkpoint" in r.err
    assert "run the same command again to resume" in r.err
    # The step running when Ctrl-C came was finished and saved: nothing done is lost.
    done = last_step(run)
    print(f"Ctrl-C once step {at} was done (+{delay:.3f}s): stopped after step {done}")
    assert at <= done < STEPS and f"stopped after step {done} of {STEPS}" in r.out
    assert resumable_checkpoint(run) == {"step": done, "path": f"student/checkpoints/step-{done:06d}"}
    assert_json_outputs_parse(run)

    r = distill("train", project, run)
    assert r.code == 0, r.err[-3000:]
    assert f"resuming from student/checkpoints/step-{done:06d} (step {done} of {STEPS})" in r.out
    assert_trained_like(run, reference)


def test_ctrl_c_is_held_to_the_step_end_and_a_second_one_stops_at_once():
    from promptdistill.stages.train import ctrl_c_at_step_end

    before = signal.getsignal(signal.SIGINT)
    with ctrl_c_at_step_end() as interrupted:
        assert not interrupted()
        os.kill(os.getpid(), signal.SIGINT)  # held: no KeyboardInterrupt here
        deadline = time.monotonic() + 5
        while not interrupted():
            assert time.monotonic() < deadline
            time.sleep(0.001)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    assert signal.getsignal(signal.SIGINT) is before
