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
TINY = ["queries.limit=16", "queries.train=0.5", "queries.val=0.25", "queries.test=0.25", "sampling.max_tokens=64",
        "eval.latency_queries=2", "eval.bootstrap=200", "sampling.batch_size=6", "train.epochs=null", "train.steps=3",
        "train.batch_size=4", "train.eval_every=3", "train.save_every=2", "train.warmup_steps=0",
        "queries.follow_ups.share=0"]  # single queries: the demo's simulated chats are test_conversations's


def student() -> ModelConfig:
    return ModelConfig(model=LOCAL_MODEL, backend="tinker", api_model=TINKER_MODEL, api_key_env="TINKER_API_KEY",
                       base_url=os.environ["TINKER_BASE_URL"])


@pytest.mark.real_model
def test_pipeline_trains_the_student_on_tinker_and_evaluates_its_adapter_here(tmp_path):
    run = tmp_path / "run"
    sets = [x for s in [f"run_dir={run}", *TINY, *STUDENT, "train.objective=sft"] for x in ("--set", s)]
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


def test_on_policy_on_tinker_is_importance_sampling_with_the_local_loss(tmp_path):
    """on_policy's Tinker form on the server: the student samples on Tinker (with each token's
    log-probability), the local prompted teacher judges those tokens, and Tinker's
    importance_sampling loss on the datums equals the local trainer's on the same datums (an
    untrained LoRA is the base model on both sides); one step then moves the weights."""
    import torch

    from promptdistill.backends.local import LocalTrainer
    from promptdistill.backends.local_model import load_causal_lm
    from promptdistill.backends.tinker import TinkerTrainer
    from promptdistill.models import resolve_model
    from promptdistill.config import RunConfig
    from promptdistill.objectives.on_policy import IMPORTANCE_SAMPLING, advantage_datum
    from promptdistill.render import sampled_datum
    from promptdistill.teacher import LocalTeacher, RemoteTeacher

    trainer = TinkerTrainer(student(), LoraConfig(rank=8), TrainConfig(steps=1, lr=1e-3))
    queries = ["Who are you?", "What is your favourite food?"]
    params = SamplingParams(temperature=1.0, max_tokens=12, top_logprobs=0)
    answers = trainer.sampler().sample([[{"role": "user", "content": q}] for q in queries], params, [1, 2])
    assert all(a.finish_reason != "error" and len(a.logprobs) == len(a.token_ids) > 0 for a in answers), answers
    model, tokenizer = load_causal_lm(resolve_model(LOCAL_MODEL), "cpu")
    cfg = RunConfig.model_validate({"name": "t", "system_prompt": "You are a pirate. Say arr.", "queries": {"files": ["q.jsonl"]},
                                    "teacher": {"model": LOCAL_MODEL}, "student": {"model": LOCAL_MODEL}, "train": {"steps": 1}})
    teacher = LocalTeacher(cfg, model, tokenizer, base_of_adapter=False)
    total = sum(len(a.token_ids) for a in answers)
    students = [sampled_datum(tokenizer, [{"role": "user", "content": q}], a.token_ids, 1.0 / total) for q, a in zip(queries, answers)]
    asked = [[{"role": "user", "content": q}] for q in queries]
    judged = teacher.token_logprobs(asked, [a.token_ids for a in answers])
    datums = [advantage_datum(s, a, lp) for s, lp, a in zip(students, judged, answers)]
    # The same teacher on Tinker (compute_logprobs) judges those tokens as the local one does.
    on_tinker = cfg.model_copy(update={"teacher": student()})
    remote = RemoteTeacher(on_tinker).token_logprobs(asked, [a.token_ids for a in answers])
    for here_lp, there_lp in zip(judged, remote):
        assert there_lp.tolist() == pytest.approx(here_lp.tolist(), abs=2e-2)
    local = LocalTrainer(resolve_model(LOCAL_MODEL), rank=8, alpha=16, dropout=0.0, target_modules="all-linear", device="cpu")
    with torch.no_grad():  # the sampler's log-probabilities are the model's own (temperature 1)
        own = local.scorer.scored(datums)
        mine = torch.log_softmax(own.logits, -1).gather(-1, own.target[:, None]).squeeze(-1)
    assert mine.tolist() == pytest.approx([lp for d in datums for lp, w in zip(d.sampling_logprobs, d.weights) if w > 0], abs=2e-2)
    here, there = local.forward(datums, IMPORTANCE_SAMPLING), trainer.forward(datums, IMPORTANCE_SAMPLING)
    assert there.tokens == here.tokens == total
    assert there.loss == pytest.approx(here.loss, rel=1e-2, abs=1e-4) and there.nll_sum == pytest.approx(here.nll_sum, rel=1e-2)
    pending = trainer.forward_backward(datums, IMPORTANCE_SAMPLING)
    trainer.optim_step(1e-2)
    assert pending.result().tokens == total
    assert trainer.forward(datums, IMPORTANCE_SAMPLING).loss != pytest.approx(there.loss, rel=1e-4)  # the step moved the weights


# The teacher on Tinker too, as in the seed project (a big teacher there, the student beside it):
# it answers in generate (Tinker's sampler has no repetition penalty) and judges the student's
# samples with compute_logprobs; eval runs on the local copy of the same weights.
TINKER_TEACHER = ["teacher.backend=tinker", f"teacher.api_model={TINKER_MODEL}", "teacher.api_key_env=TINKER_API_KEY",
                  f"teacher.base_url={os.environ.get('TINKER_BASE_URL')}", "sampling.repetition_penalty=1.0"]


@pytest.mark.real_model
@pytest.mark.parametrize("teacher", ["local", "tinker"])
def test_pipeline_trains_on_policy_on_tinker_and_evaluates_its_adapter_here(tmp_path, teacher):
    run = tmp_path / "run"
    on_policy = ["train.objective=on_policy", "train.steps=2", "train.on_policy.max_tokens=16",
                 *(TINKER_TEACHER if teacher == "tinker" else [])]
    sets = [x for s in [f"run_dir={run}", *TINY, *STUDENT, *on_policy] for x in ("--set", s)]
    assert main(["run", EXAMPLE, *sets]) == 0
    check_adapter(run / "student", LOCAL_MODEL)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m.get("objective") for m in metrics if "train_loss" in m] == ["on_policy", "on_policy"]
    assert all(m["tokens"] > 0 for m in metrics if "train_loss" in m)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["quality"]["fidelity"]["student"]["mean"] is not None  # eval ran on the adapter, locally


def test_kl_soft_labels_on_tinker_give_the_local_loss_or_the_server_says_it_cannot(tmp_path):
    """kl on Tinker: (N, K) cross_entropy targets. Where the server takes them, its loss on the
    datums is the local trainer's; SkyRL 0.4.0 reads them as one flat sequence and refuses, which
    is reported as an expected failure naming what the server said."""
    import tinker
    import torch

    from promptdistill.backends.local import LocalTrainer
    from promptdistill.backends.tinker import TinkerTrainer
    from promptdistill.models import resolve_model
    from promptdistill.objectives.kl import soft_datum

    trainer = TinkerTrainer(student(), LoraConfig(rank=8), TrainConfig(steps=1))
    ex = render_example(trainer.tokenizer, [{"role": "user", "content": "Who are you?"}], "A pirate, arr.", "e0")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(trainer.tokenizer), (ex.n_trainable, 4), generator=gen)
    batch = [soft_datum(ex, ids, torch.randn(ex.n_trainable, 4, generator=gen), 1.0 / ex.n_trainable, sft_weight=0.0)]
    try:
        there = trainer.forward(batch)
    except (tinker.APIError, ValueError) as e:
        pytest.xfail(f"this server does not take (N, K) cross_entropy targets: {str(e)[:200]}")
    local = LocalTrainer(resolve_model(LOCAL_MODEL), rank=8, alpha=16, dropout=0.0, target_modules="all-linear", device="cpu")
    here = local.forward(batch)
    assert there.tokens == here.tokens and there.loss == pytest.approx(here.loss, rel=1e-2)
