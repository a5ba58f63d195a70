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
A server that offers no external weights (SkyRL's Tinker API server answers 404) serves
a sampler checkpoint as a tar archive with the PEFT adapter inside, the route older SDKs
downloaded from; `save` falls back to it. Either way `check_adapter` vets the result.

A row whose sample still fails after the SDK's own retries comes back as a Completion with
finish_reason "error" (generate writes it to teacher_errors.jsonl and the next run retries
it), as with the OpenAI backend; a refused key or an unknown model stops at once.

The key comes from the environment variable named by `api_key_env` (or the SDK's own
$TINKER_API_KEY); `base_url` defaults to $TINKER_BASE_URL, then to Tinker's API.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import tinker
from tinker import types

from ..config import LoraConfig, ModelConfig, TrainConfig
from ..loss import CROSS_ENTROPY, Loss
from ..models import ADAPTER_FILES, ModelError, check_adapter, resolve_model
from ..render import Datum, Message, prompt_ids, stop_token_ids
from ..rundir import StageError, atomic_write_json
from .base import Completion, SamplingParams, StepResult
from .openai import failed, scrub  # a failed row and the key scrubbed from its text, as there

STATE_FILE = "tinker_state.json"  # written last by save_state: a checkpoint without it is incomplete
DOWNLOAD_TIMEOUT = 120  # seconds per adapter file
NO_EXPORT_STATUS = (404, 405, 501)  # save_weights_external answered so: the server has no external weights
FATAL_STATUS = (401, 403, 404)  # a sample refused so would fail every row: the key or the model name
NOT_READY_TRIES = 30  # an archive still being written answers 425; asked again once a second
MAX_REDIRECTS = 5
# Our seeds are hashes (up to 48 bits); SkyRL's JAX sampler refuses seeds beyond int32 (HTTP 400),
# so each is folded into 31 bits, the same fold on every server: a row keeps its one seed.
SEED_RANGE = 2**31


def tinker_batch(batch: list[Datum], loss: Loss) -> list[types.Datum]:
    if loss.tinker is None:
        raise StageError(f"train: loss {type(loss).__name__} has no Tinker form; train this objective with "
                         f"student.backend local")
    return [to_tinker_datum(d, loss) for d in batch]


def to_tinker_datum(d: Datum, loss: Loss = CROSS_ENTROPY) -> types.Datum:
    """Our Datum as Tinker's: the same tokens, and the loss's inputs (targets, weights, or an
    on-policy datum's sampling log-probabilities and advantages), position for position."""
    return types.Datum(model_input=types.ModelInput.from_ints(list(d.input_tokens)),
                       loss_fn_inputs={name: types.TensorData(data=data, dtype=dtype, shape=shape)
                                       for name, (data, dtype, shape) in loss.tinker_inputs(d).items()})


def step_result(batch: list[Datum], output: types.ForwardBackwardOutput, loss: Loss = CROSS_ENTROPY) -> StepResult:
    """Our StepResult from Tinker's per-datum target log-probabilities (the `logprobs` output),
    read by the loss as the local trainer computes it."""
    figures = [loss.from_tinker(d, out["logprobs"].tolist()) for d, out in zip(batch, output.loss_fn_outputs, strict=True)]
    return StepResult(loss=sum(f[0] for f in figures), nll_sum=sum(f[1] for f in figures),
                      tokens=sum(f[2] for f in figures))


class PendingStep:
    """A submitted forward_backward: its StepResult once Tinker has answered."""

    def __init__(self, batch: list[Datum], future, loss: Loss):
        self.batch, self.future, self.loss = batch, future, loss

    def result(self) -> StepResult:
        return step_result(self.batch, self.future.result(), self.loss)


def api_key(model: ModelConfig) -> str | None:
    if model.api_key_env is None:
        return None  # the SDK reads $TINKER_API_KEY, then its stored credentials
    key = os.environ.get(model.api_key_env)
    if not key:
        raise ModelError(f"the environment variable ${model.api_key_env} (api_key_env) is not set or empty; "
                         f"export the Tinker API key there")
    return key


def sent_key(model: ModelConfig | None) -> str | None:
    """The key the SDK sends: ours, else its own $TINKER_API_KEY (stored credentials aside)."""
    own = os.environ.get(model.api_key_env) if model is not None and model.api_key_env else None
    return own or os.environ.get("TINKER_API_KEY") or None


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

    def __init__(self, client: tinker.SamplingClient, tokenizer, spec: ModelConfig | None = None):
        self.client = client
        self.tokenizer = tokenizer
        self.spec = spec  # read only to scrub the key from error texts
        self.stop_ids = stop_token_ids(tokenizer)

    @classmethod
    def from_config(cls, model: ModelConfig) -> "TinkerSampler":
        client = service_client(model).create_sampling_client(base_model=model.served_name).result()
        return cls(client, local_tokenizer(model), model)

    def count_prompt_tokens(self, conversation: list[Message]) -> int:
        return len(prompt_ids(self.tokenizer, conversation))

    def sample(self, conversations: list[list[Message]], params: SamplingParams, seeds: list[int]) -> list[Completion]:
        if params.repetition_penalty != 1.0:
            raise ModelError(f"sampling.repetition_penalty={params.repetition_penalty}: Tinker's sampler has none; set it to 1")
        if params.top_logprobs:
            raise ModelError(f"sampling.top_logprobs={params.top_logprobs}: the tinker backend records each sampled "
                             f"token's own log-probability only; leave top_logprobs unset")
        prompts = [prompt_ids(self.tokenizer, c) for c in conversations]
        futures = [self.client.sample(prompt=types.ModelInput.from_ints(p), num_samples=1, sampling_params=types.SamplingParams(
            max_tokens=params.max_tokens, seed=seed % SEED_RANGE, stop=self.stop_ids, temperature=params.temperature, top_p=params.top_p))
            for p, seed in zip(prompts, seeds, strict=True)]
        return [self.collect(p, future, params.top_logprobs is not None) for p, future in zip(prompts, futures)]

    def target_logprobs(self, datums: list[Datum]) -> list[list[float]]:
        """The served model's log-probability of each datum's weighted target tokens, teacher-forced
        (compute_logprobs on the whole sequence; every datum submitted at once)."""
        futures = [self.client.compute_logprobs(types.ModelInput.from_ints([*d.input_tokens, d.target_tokens[-1]]))
                   for d in datums]
        out = []
        for d, future in zip(datums, futures):
            try:
                scored = future.result()  # log p(each token | the tokens before it)
            except Exception as e:  # noqa: BLE001  the step cannot go on without its teacher's judgement
                raise StageError(f"the teacher {self.spec.served_name if self.spec else ''} on Tinker could not score "
                                 f"the student's tokens ({scrub(f'{type(e).__name__}: {e}', sent_key(self.spec))}); "
                                 f"re-run to resume") from None
            # Tinker's SDK gives one entry per token (None for the first); SkyRL's server leaves the first out.
            skip = len(scored) - len(d.weights)
            if skip not in (0, 1):
                raise StageError(f"the teacher on Tinker scored {len(scored)} tokens of a {len(d.weights) + 1}-token sequence")
            out.append([scored[j + skip] for j, w in enumerate(d.weights) if w > 0])
        return out

    def collect(self, prompt: list[int], future, logprobs: bool = False) -> Completion:
        """One row's Completion from its submitted sample; a failure is that row's alone. With
        `logprobs`, each sampled token's log-probability as the sampler reports it (top_logprobs 0)."""
        try:
            seq = future.result().sequences[0]
            if logprobs and seq.logprobs is None:
                return failed("the server sent no log-probabilities of the sampled tokens")
        except tinker.APIStatusError as e:
            text = scrub(f"HTTP {e.status_code}: {e.message}", sent_key(self.spec))
            if e.status_code in FATAL_STATUS:
                raise ModelError(f"Tinker refused the sample ({text}); check the API key and the model (api_model)") from None
            return failed(text)
        except Exception as e:  # noqa: BLE001  timeouts, a failed request, a reply the SDK cannot read: this row's
            return failed(scrub(f"{type(e).__name__}: {e}", sent_key(self.spec)))
        return Completion(text=self.tokenizer.decode(seq.tokens, skip_special_tokens=True).strip(),
                          token_ids=list(seq.tokens), prompt_tokens=len(prompt), finish_reason=seq.stop_reason,
                          logprobs=[{"token": self.tokenizer.decode([t]), "id": t, "logprob": lp, "top": []}
                                    for t, lp in zip(seq.tokens, seq.logprobs, strict=True)] if logprobs else None)


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

    def takes(self, loss: Loss) -> bool:
        """The losses Tinker computes: those with a Tinker name."""
        return loss.tinker is not None

    def forward_backward(self, batch: list[Datum], loss: Loss = CROSS_ENTROPY) -> PendingStep:
        return PendingStep(batch, self.client.forward_backward(tinker_batch(batch, loss), loss.tinker), loss)

    def forward(self, batch: list[Datum], loss: Loss = CROSS_ENTROPY) -> StepResult:
        return step_result(batch, self.client.forward(tinker_batch(batch, loss), loss.tinker).result(), loss)

    def optim_step(self, lr: float) -> dict:
        metrics = self.client.optim_step(types.AdamParams(learning_rate=lr, **self.adam)).result().metrics or {}
        # The response's metric names are the server's; a grad norm is reported when there is one.
        norm = next((v for k, v in metrics.items() if "grad_norm" in k), None)
        return {"grad_norm": norm}

    def is_checkpoint(self, path: str | Path) -> bool:
        """Whether save_state finished writing `path`."""
        return (Path(path) / STATE_FILE).exists()

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
        dest, name = Path(path), f"{Path(path).name}-peft"
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            try:
                export = self.client.save_weights_external(name).result().path
            except tinker.APIStatusError as e:
                if e.status_code not in NO_EXPORT_STATUS:
                    raise
                sampler_path = self.client.save_weights_for_sampler(name).result().path
                print(f"train: the server has no external weights (HTTP {e.status_code}); "
                      f"downloading the sampler checkpoint's archive {sampler_path}", flush=True)
                fetch_archive(base_url(self.spec), sent_key(self.spec), sampler_path, Path(tmp))
            else:
                fetch_external(tinker.RestClient(base_url=self.spec.base_url, api_key=api_key(self.spec)),
                               export, Path(tmp))
            install_adapter(Path(tmp), dest, str(resolve_model(self.spec.model)))
        check_adapter(dest, self.spec.model)

    def sampler(self) -> TinkerSampler:
        return TinkerSampler(self.client.save_weights_and_get_sampling_client().result(), self.tokenizer, self.spec)


def base_url(model: ModelConfig) -> str:
    from tinker.lib.base_url import resolve_base_url  # the SDK's own rule: base_url, $TINKER_BASE_URL, Tinker's

    return resolve_base_url(model.base_url)


def fetch_external(rest: tinker.RestClient, tinker_path: str, tmp: Path) -> None:
    """An external-weights (PEFT) export, file by file from its signed URLs, into `tmp`."""
    urls = rest.get_external_weights_urls(tinker_path).result().urls
    missing = [name for name in ADAPTER_FILES if name not in urls]
    if missing:
        raise ModelError(f"{tinker_path}: the export has no {', '.join(missing)} (files: {sorted(urls)}); "
                         f"not a PEFT LoRA adapter")
    for name in ADAPTER_FILES:
        with urllib.request.urlopen(urls[name], timeout=DOWNLOAD_TIMEOUT) as response, open(tmp / name, "wb") as f:
            shutil.copyfileobj(response, f)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are followed by hand: the key goes to the API's own origin only, never to a
    signed URL on storage elsewhere."""

    def redirect_request(self, *args, **kwargs):
        return None


def fetch_archive(api: str, key: str | None, tinker_path: str, tmp: Path) -> None:
    """A sampler checkpoint's archive (GET .../checkpoints/{id}/archive, which answers with the
    archive or a redirect to it) into `tmp`, then the adapter files out of it."""
    # Tinker writes tinker://<run>/sampler_weights/<name>; SkyRL's server tinker://<run>/<name>.
    parts = tinker_path.removeprefix("tinker://").split("/")
    if not tinker_path.startswith("tinker://") or len(parts) not in (2, 3) or parts[1:-1] not in ([], ["sampler_weights"]):
        raise ModelError(f"{tinker_path}: not a sampler checkpoint (tinker://<run>/sampler_weights/<name>)")
    run, checkpoint = parts[0], parts[-1]
    url = (f"{api.rstrip('/')}/api/v1/training_runs/{urllib.parse.quote(run)}"
           f"/checkpoints/{urllib.parse.quote(checkpoint)}/archive")
    origin = urllib.parse.urlsplit(url)[:2]
    opener = urllib.request.build_opener(_NoRedirect)
    archive = tmp / "archive"
    redirects = tries = 0
    while True:
        same_origin = urllib.parse.urlsplit(url)[:2] == origin
        request = urllib.request.Request(url, headers={"X-API-Key": key} if key and same_origin else {})
        try:
            with opener.open(request, timeout=DOWNLOAD_TIMEOUT) as response, open(archive, "wb") as f:
                shutil.copyfileobj(response, f)
            break
        except urllib.error.HTTPError as e:
            shown = url.split("?")[0]  # a signed URL's query is a credential too
            if e.code in (301, 302, 303, 307, 308) and e.headers.get("Location") and redirects < MAX_REDIRECTS:
                url, redirects = urllib.parse.urljoin(url, e.headers["Location"]), redirects + 1
            elif e.code == 425 and tries < NOT_READY_TRIES:  # still being written on the server
                tries += 1
                time.sleep(1)
            else:
                body = scrub(e.read().decode("utf-8", "replace"), key)
                raise ModelError(f"{tinker_path}: downloading its archive from {shown} failed (HTTP {e.code}: {body})") from None
        except urllib.error.URLError as e:
            raise ModelError(f"{tinker_path}: downloading its archive from {url.split('?')[0]} failed ({e.reason})") from None
    extract_adapter(archive, tmp, tinker_path)


def extract_adapter(archive: Path, tmp: Path, where: str) -> None:
    """The PEFT adapter files out of a tar archive (gzipped or not), at its root or in one
    folder. Only those files are read, by name, never extracted by the archive's own paths."""
    try:
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and Path(m.name).name in ADAPTER_FILES]
            found = {Path(m.name).name: m for m in members}
            missing = [name for name in ADAPTER_FILES if name not in found]
            if missing or len(found) != len(members):
                raise ModelError(f"{where}: its archive has {sorted(m.name for m in members) or 'no adapter files'}; "
                                 f"expected one each of {', '.join(ADAPTER_FILES)} (a PEFT LoRA adapter)")
            for name, member in found.items():
                with tar.extractfile(member) as src, open(tmp / name, "wb") as f:
                    shutil.copyfileobj(src, f)
    except tarfile.TarError as e:
        raise ModelError(f"{where}: its archive is not a readable tar file ({e})") from None
    archive.unlink()


def install_adapter(tmp: Path, dest: Path, base_model: str) -> None:
    """The adapter files in `tmp` (same file system as `dest`) moved into `dest`, their base
    model set to the local copy, so `check_adapter` and peft load it here."""
    config = json.loads((tmp / "adapter_config.json").read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base_model
    atomic_write_json(tmp / "adapter_config.json", config)
    for name in ADAPTER_FILES:  # renames within one file system: no half-installed adapter
        os.replace(tmp / name, dest / name)
