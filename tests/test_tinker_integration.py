"""Opt-in: the whole pipeline with the student trained on a real Tinker (or Tinker-compatible)
server. Skipped unless TINKER_BASE_URL and TINKER_API_KEY are set; never faked in CI.

    TINKER_BASE_URL=https://... TINKER_API_KEY=... pytest -q tests/test_tinker_integration.py

TINKER_MODEL names the Tinker base model (default HuggingFaceTB/SmolLM2-135M-Instruct, which
a server you run yourself can serve); TINKER_LOCAL_MODEL its local copy (default the
embedded smollm2-135m), on which the downloaded adapter is evaluated. The teacher is the
local embedded model. See README, "Training on Tinker".
"""

import json
import os
from pathlib import Path

import pytest

from promptdistill.backends.base import SamplingParams
from promptdistill.cli import main
from promptdistill.config import LoraConfig, ModelConfig, TrainConfig
from promptdistill.models import check_adapter
from promptdistill.render import render_example, to_datum

pytestmark = pytest.mark.skipif(
    not (os.environ.get("TINKER_BASE_URL") and os.environ.get("TINKER_API_KEY")),
    reason="opt-in: set TINKER_BASE_URL and TINKER_API_KEY to run against a Tinker(-compatible) server",
)

EXAMPLE = str(Path(__file__).parents[1] / "examples" / "beethoven" / "config.yaml")
TINKER_MODEL = os.environ.get("TINKER_MODEL", "HuggingFaceTB/SmolLM2-135M-Instruct")
LOCAL_MODEL = os.environ.get("TINKER_LOCAL_MODEL", "smollm2-135m")
STUDENT = [f"student.model={LOCAL_MODEL}", "student.backend=tinker", f"student.api_model={TINKER_MODEL}",
           "student.api_key_env=TINKER_API_KEY", f"student.base_url={os.environ.get('TINKER_BASE_URL')}"]
TINY = ["queries.limit=16", "queries.train=0.5", "queries.val=0.25", "queries.test=0.25", "sampling.max_tokens=32",
        "eval.latency_queries=2", "eval.bootstrap=200", "sampling.batch_size=6", "train.epochs=null", "train.steps=3",
        "train.batch_size=4", "train.eval_every=3", "train.save_every=2", "train.warmup_steps=0"]


def student() -> ModelConfig:
    return ModelConfig(model=LOCAL_MODEL, backend="tinker", api_model=TINKER_MODEL, api_key_env="TINKER_API_KEY",
                       base_url=os.environ["TINKER_BASE_URL"])


@pytest.mark.real_model
def test_pipeline_trains_the_student_on_tinker_and_evaluates_its_adapter_here(tmp_path):
    run = tmp_path / "run"
    sets = [x for s in [f"run_dir={run}", *TINY, *STUDENT] for x in ("--set", s)]
    assert main(["run", EXAMPLE, *sets]) == 0

    check_adapter(run / "student", LOCAL_MODEL)  # the downloaded PEFT adapter, on the local base
    state = json.loads((run / "student" / "checkpoints" / "step-000002" / "tinker_state.json").read_text())
    assert state["tinker_path"].startswith("tinker://") and state["base_model"] == TINKER_MODEL
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3] and "val_loss" in metrics[-1]
    assert json.loads((run / "summary.json").read_text())["n_test"] >= 2  # eval ran on the adapter, locally
    for path in run.rglob("*"):  # the key never lands in the run dir
        if path.is_file():
            assert os.environ["TINKER_API_KEY"].encode() not in path.read_bytes(), path


def test_training_lowers_the_loss_and_the_sampler_uses_the_trained_weights(tmp_path):
    from promptdistill.backends import make_sampler
    from promptdistill.backends.tinker import TinkerTrainer

    trainer = TinkerTrainer(student(), LoraConfig(rank=8), TrainConfig(steps=20, lr=1e-3))
    ex = render_example(trainer.tokenizer, [{"role": "user", "content": "What is the secret word?"}], "Pumpernickel.", "e0")
    batch = [to_datum(ex, 1.0 / ex.n_trainable)]
    before = trainer.forward(batch).loss
    for _ in range(20):  # memorise one answer
        pending = trainer.forward_backward(batch)
        trainer.optim_step(1e-3)
        pending.result()
    assert trainer.forward(batch).loss < min(0.2, before / 5)
    question, greedy = [[{"role": "user", "content": "What is the secret word?"}]], SamplingParams(temperature=0.0, max_tokens=16)
    (done,) = trainer.sampler().sample(question, greedy, [0])
    assert done.finish_reason in ("stop", "length") and "Pumpernickel" in done.text
    # The adapter as downloaded (external weights, or the sampler checkpoint's archive) is the
    # trained one: the local model with it answers the same.
    trainer.save(tmp_path / "student")
    check_adapter(tmp_path / "student", LOCAL_MODEL)
    (here,) = make_sampler(student(), 1, adapter_dir=tmp_path / "student").sample(question, greedy, [0])
    assert "Pumpernickel" in here.text, here.text
