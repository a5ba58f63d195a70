"""The Tinker backend, without a server (the opt-in tests/test_tinker_integration.py has one).

It trains on exactly what the local trainer trains on: Datums built from
our rendered examples, converted to the real `tinker` SDK types, carry the same input
tokens, targets and weights, token for token, as what LocalTrainer feeds its model, and
Tinker's cross_entropy on them is the local trainer's loss. No server is involved: these
are the SDK's own types, as they would be sent."""

import json

import pytest
import torch
import yaml
from tiny import save_chatty_tiny, tiny_model, tiny_tokenizer
from tinker import types
from transformers import AutoTokenizer

from promptdistill.backends.base import SamplingParams
from promptdistill.backends import local
from promptdistill.backends.local import LocalTrainer
from promptdistill.cli import main
from promptdistill.backends.tinker import TinkerSampler, api_key, lora_layers, step_result, to_tinker_datum
from promptdistill.config import LoraConfig, ModelConfig
from promptdistill.config_errors import ConfigError
from promptdistill.config_file import load_config
from promptdistill.loss import CROSS_ENTROPY
from promptdistill.models import ModelError, resolve_model
from promptdistill.objectives import on_policy
from promptdistill.render import render_example, to_datum

PAIRS = [("Where is the gold?", "Under the old oak, matey."),
         ("Who are you?", "Captain Redbeard, scourge of the seven seas! Fear me."),
         ("Hi", "Ahoy!")]


def smollm2_tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))


@pytest.fixture(scope="module", params=["smollm2", "llama3", "gemma"])
def trainer(request, tmp_path_factory):
    """A LocalTrainer on a tiny model over the real SmolLM2 tokenizer or a tiny one."""
    tokenizer = smollm2_tokenizer() if request.param == "smollm2" else tiny_tokenizer(request.param)
    out = tmp_path_factory.mktemp(request.param)
    tokenizer.save_pretrained(out)
    tiny_model(tokenizer).save_pretrained(out)
    return LocalTrainer(out, rank=4, alpha=8, dropout=0.0, target_modules="all-linear", device="cpu")


def batch(tokenizer):
    examples = [render_example(tokenizer, [{"role": "user", "content": q}], a, f"e{i}") for i, (q, a) in enumerate(PAIRS)]
    total = sum(e.n_trainable for e in examples)
    return examples, [to_datum(e).scaled(1.0 / total) for e in examples]  # as the train stage builds a step


def fed_to_model(trainer, datums):
    """The input ids and attention mask LocalTrainer's forward pass hands its decoder."""
    seen = {}

    def grab(module, args, kwargs):
        seen["ids"], seen["attention"] = kwargs["input_ids"].clone(), kwargs["attention_mask"].clone()

    hook = trainer.scorer.parts.decoder.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        result = trainer.forward(datums)
    finally:
        hook.remove()
    return seen["ids"], seen["attention"], result


def test_tinker_datums_carry_the_local_trainers_tokens_targets_and_weights(trainer):
    examples, datums = batch(trainer.tokenizer)
    tinker_datums = [to_tinker_datum(d) for d in datums]
    ids, attention, _ = fed_to_model(trainer, datums)
    for r, (ex, d, td) in enumerate(zip(examples, datums, tinker_datums)):
        assert isinstance(td, types.Datum)
        model_input = td.model_input.to_ints()
        targets = td.loss_fn_inputs["target_tokens"].tolist()
        weights = td.loss_fn_inputs["weights"].tolist()
        n = len(model_input)
        assert ids[r, :n].tolist() == model_input and int(attention[r].sum()) == n  # what the model reads
        assert model_input == ex.tokens[:-1]  # input ids...
        assert targets == ex.tokens[1:]  # ...labels shifted by one...
        assert [w > 0 for w in weights] == [m == 1 for m in ex.mask[1:]]  # ...scored exactly on the answer
        assert weights == pytest.approx(d.weights, rel=1e-6)  # float32 on the wire
        assert td.loss_fn_inputs["target_tokens"].dtype == "int64" and td.loss_fn_inputs["weights"].dtype == "float32"


def test_tinker_cross_entropy_on_the_datums_is_the_local_loss(trainer):
    """Tinker's cross_entropy, sum(weights * -logprob(target)), computed from the Tinker Datums
    alone with a plain forward pass, equals LocalTrainer's loss; and step_result, reading a real
    ForwardBackwardOutput of those logprobs, gives LocalTrainer's StepResult."""
    _, datums = batch(trainer.tokenizer)
    tinker_datums = [to_tinker_datum(d) for d in datums]
    trainer.model.eval()
    outputs, loss = [], 0.0
    with torch.no_grad():
        for td in tinker_datums:
            logits = trainer.model(input_ids=torch.tensor([td.model_input.to_ints()])).logits[0].float()
            targets = td.loss_fn_inputs["target_tokens"].to_torch()
            logprobs = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
            loss += float((-logprobs * td.loss_fn_inputs["weights"].to_torch()).sum())
            outputs.append({"logprobs": types.TensorData.from_torch(logprobs)})
    local = trainer.forward(datums)
    assert loss == pytest.approx(local.loss, rel=1e-4)
    ours = step_result(datums, types.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", loss_fn_outputs=outputs))
    assert ours.tokens == local.tokens
    assert ours.loss == pytest.approx(local.loss, rel=1e-4)
    assert ours.nll_sum == pytest.approx(local.nll_sum, rel=1e-4)


def test_soft_label_datums_are_tinkers_2d_cross_entropy_and_give_the_local_loss(trainer):
    """The kl objective's datums (K teacher tokens per position, weighted by their probability)
    become Tinker's (N, K) target_tokens/weights; Tinker's cross_entropy on them, sum(w * -logprob),
    equals the local trainer's loss, and step_result reads a real (N, K) output as the local one."""
    from promptdistill.objectives.kl import soft_datum

    examples, _ = batch(trainer.tokenizer)
    total = sum(e.n_trainable for e in examples)
    gen = torch.Generator().manual_seed(0)
    datums = []
    for e in examples:
        ids = torch.randint(0, len(trainer.tokenizer), (e.n_trainable, 4), generator=gen)
        datums.append(soft_datum(e, ids, torch.randn(e.n_trainable, 4, generator=gen), 1.0 / total, sft_weight=0.1))
    trainer.model.eval()
    outputs, loss = [], 0.0
    with torch.no_grad():
        for d in datums:
            td = to_tinker_datum(d)
            targets, weights = td.loss_fn_inputs["target_tokens"], td.loss_fn_inputs["weights"]
            assert targets.shape == weights.shape == [len(d.target_tokens), 5]  # K = 4 teacher tokens + the sampled one
            assert targets.tolist() == d.target_tokens
            assert sum(weights.tolist(), []) == pytest.approx(sum(d.weights, []), rel=1e-6, abs=1e-12)
            assert td.model_input.to_ints() == d.input_tokens
            logits = trainer.model(input_ids=torch.tensor([td.model_input.to_ints()])).logits[0].float()
            logprobs = torch.log_softmax(logits, -1).gather(1, targets.to_torch())
            loss += float((-logprobs * weights.to_torch()).sum())
            outputs.append({"logprobs": types.TensorData.from_torch(logprobs)})
    local = trainer.forward(datums)
    assert loss == pytest.approx(local.loss, rel=1e-4)
    ours = step_result(datums, types.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", loss_fn_outputs=outputs))
    assert ours.tokens == local.tokens and ours.loss == pytest.approx(local.loss, rel=1e-4)
    assert ours.nll_sum == pytest.approx(local.nll_sum, rel=1e-4)


def test_on_policy_datums_are_tinkers_importance_sampling_and_give_the_local_loss(trainer):
    """on_policy on Tinker: the datums (the student's sampled tokens, the sampler's log-probability
    of each and its advantage) become importance_sampling's target_tokens/logprobs/advantages;
    that loss, -sum(exp(logprob - sampling logprob) * advantage), computed from the Tinker Datums
    alone, equals the local trainer's, and step_result reads a real output as the local one."""
    from promptdistill.backends.base import Completion
    from promptdistill.objectives.on_policy import advantage_datum
    from promptdistill.render import sampled_datum

    gen = torch.Generator().manual_seed(0)
    vocab, datums = len(trainer.tokenizer), []
    for q, n in (("Where is the gold?", 5), ("Hi", 3)):
        tokens = torch.randint(0, vocab, (n,), generator=gen).tolist()
        answer = Completion(text="", token_ids=tokens, prompt_tokens=0, finish_reason="length",
                            logprobs=[{"token": "", "id": t, "logprob": -1.0 - 0.1 * i, "top": []} for i, t in enumerate(tokens)])
        student = sampled_datum(trainer.tokenizer, [{"role": "user", "content": q}], tokens, 1.0 / 8)
        datums.append(advantage_datum(student, answer, -3 * torch.rand(n, generator=gen)))  # the teacher's log-probabilities
    trainer.model.eval()
    outputs, loss = [], 0.0
    with torch.no_grad():
        for d in datums:
            td = to_tinker_datum(d, on_policy.IMPORTANCE_SAMPLING)
            inputs = td.loss_fn_inputs
            assert set(inputs) == {"target_tokens", "logprobs", "advantages"}
            assert td.model_input.to_ints() == d.input_tokens and inputs["target_tokens"].tolist() == d.target_tokens
            assert inputs["logprobs"].tolist() == pytest.approx(d.sampling_logprobs, rel=1e-6)
            assert inputs["advantages"].tolist() == pytest.approx(d.advantages, rel=1e-6, abs=1e-12)
            assert [a != 0 for a in d.advantages] == [w > 0 for w in d.weights]  # only the sampled answer counts
            logits = trainer.model(input_ids=torch.tensor([td.model_input.to_ints()])).logits[0].float()
            logprobs = torch.log_softmax(logits, -1).gather(1, inputs["target_tokens"].to_torch()[:, None])[:, 0]
            ratio = torch.exp(logprobs - inputs["logprobs"].to_torch())
            loss += float(-(ratio * inputs["advantages"].to_torch()).sum())
            outputs.append({"logprobs": types.TensorData.from_torch(logprobs)})
    local = trainer.forward(datums, on_policy.IMPORTANCE_SAMPLING)
    assert loss == pytest.approx(local.loss, rel=1e-4)
    ours = step_result(datums, types.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", loss_fn_outputs=outputs),
                       on_policy.IMPORTANCE_SAMPLING)
    assert ours.tokens == local.tokens == 8
    assert ours.loss == pytest.approx(local.loss, rel=1e-4) and ours.nll_sum == pytest.approx(local.nll_sum, rel=1e-4)


def test_a_tinker_student_needs_its_tinker_model_named(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "system_prompt": "Be a pirate.", "teacher": {"model": "smollm2-135m"},
                                    "student": {"model": "smollm2-135m", "backend": "tinker"},
                                    "queries": {"files": ["q.jsonl"]}, "train": {"steps": 3}}))
    with pytest.raises(ConfigError, match=r"student.*backend tinker needs api_model"):
        load_config(path)


def test_settings_tinker_cannot_honour_are_refused_naming_the_field(monkeypatch):
    assert lora_layers(LoraConfig()) == {"train_attn": True, "train_mlp": True, "train_unembed": False}
    with pytest.raises(ModelError, match="lora.target_modules"):
        lora_layers(LoraConfig(target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ModelError, match="lora.dropout"):
        lora_layers(LoraConfig(dropout=0.1))
    sampler = TinkerSampler(client=None, tokenizer=tiny_tokenizer("chatml"))  # refused before any request
    with pytest.raises(ModelError, match="repetition_penalty"):
        sampler.sample([[{"role": "user", "content": "Hi"}]], SamplingParams(repetition_penalty=1.2), [0])
    with pytest.raises(ModelError, match="top_logprobs=5"):
        sampler.sample([[{"role": "user", "content": "Hi"}]], SamplingParams(top_logprobs=5), [0])
    model = ModelConfig(model="smollm2-135m", backend="tinker", api_model="Qwen/Qwen3-8B", api_key_env="PD_TEST_TINKER_KEY")
    monkeypatch.delenv("PD_TEST_TINKER_KEY", raising=False)
    with pytest.raises(ModelError, match=r"\$PD_TEST_TINKER_KEY \(api_key_env\) is not set"):
        api_key(model)
    monkeypatch.setenv("PD_TEST_TINKER_KEY", "tml-secret")
    assert api_key(model) == "tml-secret"


class OrderRecorder(LocalTrainer):
    """The real local trainer, noting when each call is submitted and when its result is read."""

    calls: list[str] = []

    def forward_backward(self, batch, loss=CROSS_ENTROPY):
        done = super().forward_backward(batch, loss)
        self.calls.append("submit forward_backward")
        return RecordedRead(done, self.calls)

    def optim_step(self, lr):
        self.calls.append("submit optim_step")
        return super().optim_step(lr)


class RecordedRead:
    def __init__(self, done, calls):
        self.done, self.calls = done, calls

    def result(self):
        self.calls.append("read forward_backward")
        return self.done.result()


def test_the_train_stage_submits_a_whole_step_before_reading_any_of_it(tmp_path, monkeypatch):
    """What lets Tinker pipeline: every micro-batch's forward_backward and the step's
    optim_step are submitted before any forward_backward result is read."""
    model = save_chatty_tiny(tmp_path / "tiny")
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"id": f"q{i}", "query": f"Question {i}?"}) + "\n"
                                              for i in range(12)))
    config = {"name": "t", "system_prompt": "Be a pirate.", "teacher": {"model": str(model)},
              "student": {"model": str(model)}, "queries": {"files": ["q.jsonl"], "train": 0.8, "val": 0.1, "test": 0.1},
              "sampling": {"max_tokens": 16, "temperature": 1.0, "top_p": 1.0},
              "lora": {"rank": 4, "alpha": 8}, "train": {"steps": 2, "batch_size": 2, "grad_accum": 2}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    args = [str(tmp_path / "config.yaml"), "--set", f"run_dir={tmp_path / 'run'}"]
    assert main(["queries", *args]) == 0 and main(["generate", *args]) == 0
    monkeypatch.setattr(local, "LocalTrainer", OrderRecorder)
    OrderRecorder.calls.clear()
    assert main(["train", *args]) == 0
    step = ["submit forward_backward"] * 2 + ["submit optim_step"] + ["read forward_backward"] * 2
    assert OrderRecorder.calls == step * 2
