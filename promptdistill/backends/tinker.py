"""Tinker backend: LoRA training and sampling on the Tinker API, through the official
`tinker` SDK (0.38).

The recipe does not change. Rendering and loss masks stay ours (render.py), done with the
tokenizer of the run's LOCAL copy of the model (`model`), the same weights Tinker serves
as `api_model`; a Tinker Datum is our Datum converted field for field, and `cross_entropy`
computes sum(weights * -logprob(target_tokens)), the loss the local trainer computes.

Every SDK call returns a future at once. `forward_backward` hands back a Pending that is
read only after the step's `optim_step` has been submitted, so a whole optimiser step goes
out without a round trip in between (Tinker's own advice). Checkpoints live on Tinker; the
run dir keeps a small `tinker_state.json` pointing at each. `save` exports the trained
LoRA in Hugging Face PEFT format (`save_weights_external`), downloads it into the run dir
and records the local `model` as its base, so eval, chat, export and serve run on it here.

The key comes from the environment variable named by `api_key_env` (or the SDK's own
$TINKER_API_KEY); `base_url` defaults to $TINKER_BASE_URL, then to Tinker's API.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

import tinker
from tinker import types

from ..config import LoraConfig, ModelConfig, TrainConfig
from ..models import ADAPTER_FILES, ModelError, resolve_model
from ..render import Datum, Message, prompt_ids, stop_token_ids
from ..rundir import StageError, atomic_write_json
from .base import Completion, SamplingParams, StepResult

LOSS_FN = "cross_entropy"
STATE_FILE = "tinker_state.json"  # written last by save_state: train.STATE_FILES lists it
DOWNLOAD_TIMEOUT = 120  # seconds per adapter file


def tinker_batch(batch: list[Datum], loss_fn: str) -> list[types.Datum]:
    if loss_fn != LOSS_FN:
        raise StageError(f"train.objective: loss {loss_fn!r} is not built for Tinker yet (its on_policy objective "
                         f"needs importance_sampling datums); train this objective with student.backend local")
    return [to_tinker_datum(d) for d in batch]


def to_tinker_datum(d: Datum) -> types.Datum:
    """Our Datum as Tinker's: the same tokens, targets and weights, position for position. Soft
    labels (K targets per position) become Tinker's 2-D cross_entropy inputs of shape (N, K)."""
    n = len(d.target_tokens)
    if isinstance(d.target_tokens[0], (list, tuple)):
        k = len(d.target_tokens[0])
        targets = [t for row in d.target_tokens for t in row]
        weights = [w for row in d.weights for w in row]
        shape = [n, k]
    else:
        targets, weights, shape = list(d.target_tokens), list(d.weights), [n]
    return types.Datum(
        model_input=types.ModelInput.from_ints(list(d.input_tokens)),
        loss_fn_inputs={"target_tokens": types.TensorData(data=targets, dtype="int64", shape=shape),
                        "weights": types.TensorData(data=weights, dtype="float32", shape=shape)},
    )


def step_result(batch: list[Datum], output: types.ForwardBackwardOutput) -> StepResult:
    """Our StepResult from Tinker's per-datum target logprobs (cross_entropy's `logprobs` output;
    (N, K) of them for soft labels, whose per-token loss is sum_k w_k (-logprob_k) / sum_k w_k)."""
    loss = nll_sum = 0.0
    tokens = 0
    for d, out in zip(batch, output.loss_fn_outputs, strict=True):
        for w, lp in zip(d.weights, out["logprobs"].tolist(), strict=True):
            ws, lps = (w, lp) if isinstance(w, (list, tuple)) else ([w], [lp])
            if sum(ws) > 0:
                loss += sum(x * -y for x, y in zip(ws, lps))
                nll_sum += sum(x * -y for x, y in zip(ws, lps)) / sum(ws)
                tokens += 1
    return StepResult(loss=loss, nll_sum=nll_sum, tokens=tokens)


class PendingStep:
    """A submitted forward_backward: its StepResult once Tinker has answered."""

    def __init__(self, batch: list[Datum], future):
        self.batch, self.future = batch, future

    def result(self) -> StepResult:
        return step_result(self.batch, self.future.result())


def api_key(model: ModelConfig) -> str | None:
    if model.api_key_env is None:
        return None  # the SDK reads $TINKER_API_KEY, then its stored credentials
    key = os.environ.get(model.api_key_env)
    if not key:
        raise ModelError(f"the environment variable ${model.api_key_env} (api_key_env) is not set or empty; "
                         f"export the Tinker API key there")
    return key


def service_client(model: ModelConfig) -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=model.base_url, api_key=api_key(model))


def local_tokenizer(model: ModelConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(model.model))


def lora_layers(lora: LoraConfig) -> dict:
    """Tinker's LoRA switches for our config. Tinker trains whole layer groups and sets alpha
    itself (the downloaded adapter_config.json records it); peft's 'all-linear' is every
    attention and MLP projection and not the output layer, so the same here."""
    if lora.target_modules != "all-linear":
        raise ModelError(f"lora.target_modules={lora.target_modules!r}: backend tinker trains every attention and "
                         f"MLP layer; use 'all-linear'")
    if lora.dropout:
        raise ModelError(f"lora.dropout={lora.dropout}: backend tinker has no LoRA dropout; set it to 0")
    return {"train_attn": True, "train_mlp": True, "train_unembed": False}


class TinkerSampler:
    """Sampler on a Tinker SamplingClient: every row is submitted at once, then collected."""

    def __init__(self, client: tinker.SamplingClient, tokenizer):
        self.client = client
        self.tokenizer = tokenizer
        self.stop_ids = stop_token_ids(tokenizer)

    @classmethod
    def from_config(cls, model: ModelConfig) -> "TinkerSampler":
        client = service_client(model).create_sampling_client(base_model=model.served_name).result()
        return cls(client, local_tokenizer(model))

    def count_prompt_tokens(self, conversation: list[Message]) -> int:
        return len(prompt_ids(self.tokenizer, conversation))

    def sample(self, conversations: list[list[Message]], params: SamplingParams, seeds: list[int]) -> list[Completion]:
        if params.repetition_penalty != 1.0:
            raise ModelError(f"sampling.repetition_penalty={params.repetition_penalty}: Tinker's sampler has none; set it to 1")
        prompts = [prompt_ids(self.tokenizer, c) for c in conversations]
        futures = [self.client.sample(prompt=types.ModelInput.from_ints(p), num_samples=1, sampling_params=types.SamplingParams(
            max_tokens=params.max_tokens, seed=seed, stop=self.stop_ids, temperature=params.temperature, top_p=params.top_p))
            for p, seed in zip(prompts, seeds, strict=True)]
        out = []
        for p, future in zip(prompts, futures):
            seq = future.result().sequences[0]
            out.append(Completion(text=self.tokenizer.decode(seq.tokens, skip_special_tokens=True).strip(),
                                  token_ids=list(seq.tokens), prompt_tokens=len(p), finish_reason=seq.stop_reason))
        return out


class TinkerTrainer:
    """The Trainer interface on a Tinker LoRA TrainingClient."""

    def __init__(self, model: ModelConfig, lora: LoraConfig, train: TrainConfig):
        self.spec = model  # the student ModelConfig
        self.tokenizer = local_tokenizer(model)
        self.service = service_client(model)
        self.client = self.service.create_lora_training_client(
            base_model=model.served_name, rank=lora.rank, seed=train.seed, **lora_layers(lora)).result()
        # The local trainer's AdamW: torch's betas and eps (Tinker's defaults differ), its
        # weight decay and its clipping (0 = none).
        self.adam = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": train.weight_decay,
                     "grad_clip_norm": train.max_grad_norm or 0.0}

    def forward_backward(self, batch: list[Datum], loss_fn: str = LOSS_FN) -> PendingStep:
        return PendingStep(batch, self.client.forward_backward(tinker_batch(batch, loss_fn), LOSS_FN))

    def forward(self, batch: list[Datum], loss_fn: str = LOSS_FN) -> StepResult:
        return step_result(batch, self.client.forward(tinker_batch(batch, loss_fn), LOSS_FN).result())

    def optim_step(self, lr: float) -> dict:
        metrics = self.client.optim_step(types.AdamParams(learning_rate=lr, **self.adam)).result().metrics or {}
        # The response's metric names are the server's; a grad norm is reported when there is one.
        norm = next((v for k, v in metrics.items() if "grad_norm" in k), None)
        return {"grad_norm": norm}

    def save_state(self, path: str | Path) -> None:
        """Weights and optimiser state saved on Tinker; the run dir keeps where."""
        saved = self.client.save_state(Path(path).name).result()
        atomic_write_json(Path(path) / STATE_FILE, {"tinker_path": saved.path, "base_model": self.spec.served_name})

    def load_state(self, path: str | Path) -> None:
        state = json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))
        # The SDK's supported way back: a new training client from the checkpoint, optimiser included.
        self.client = self.service.create_training_client_from_state_with_optimizer(state["tinker_path"]).result()

    def save(self, path: str | Path) -> None:
        """The trained LoRA as a PEFT adapter dir at `path`, based on the local `model`."""
        export = self.client.save_weights_external(f"{Path(path).name}-peft").result().path
        download_adapter(tinker.RestClient(base_url=self.spec.base_url, api_key=api_key(self.spec)),
                         export, Path(path), str(resolve_model(self.spec.model)))

    def sampler(self) -> TinkerSampler:
        return TinkerSampler(self.client.save_weights_and_get_sampling_client().result(), self.tokenizer)


def download_adapter(rest: tinker.RestClient, tinker_path: str, dest: Path, base_model: str) -> None:
    """Fetch an external-weights (PEFT) export file by file and install it in `dest`, its
    base model set to the local copy, so `check_adapter` and peft load it here."""
    urls = rest.get_external_weights_urls(tinker_path).result().urls
    missing = [name for name in ADAPTER_FILES if name not in urls]
    if missing:
        raise ModelError(f"{tinker_path}: the export has no {', '.join(missing)} (files: {sorted(urls)}); "
                         f"not a PEFT LoRA adapter")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        for name in ADAPTER_FILES:
            with urllib.request.urlopen(urls[name], timeout=DOWNLOAD_TIMEOUT) as response, open(Path(tmp) / name, "wb") as f:
                shutil.copyfileobj(response, f)
        config = json.loads((Path(tmp) / "adapter_config.json").read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = base_model
        atomic_write_json(Path(tmp) / "adapter_config.json", config)
        for name in ADAPTER_FILES:  # renames within one file system: no half-installed adapter
            os.replace(Path(tmp) / name, dest / name)
