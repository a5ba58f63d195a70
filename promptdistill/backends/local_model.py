"""Loading a local model: device, dtype, the LoRA adapter, and the model taken apart into its
decoder and its output layer (what the sampler, the scorer and the trainer run)."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch

from ..machine import cpu_has_bf16_units

def pick_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        from ..models import ModelError

        raise ModelError(f"device {spec!r}: this machine has no CUDA GPU (torch {torch.__version__}); use device: auto or cpu")
    return torch.device(spec)


@contextlib.contextmanager
def peft_wrapping():
    """peft (0.21) reads the model's `is_gradient_checkpointing` when it wraps it, a property
    transformers 5.24 deprecates with a FutureWarning on every read: that one warning, raised
    by peft's read and not by our code, is silenced while peft wraps a model."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)
        yield


def pick_dtype(spec: str, device: torch.device) -> torch.dtype:
    """The weights' dtype. `auto` is bf16 on a CUDA GPU that has it and on a CPU with bf16
    units, where oneDNN's bf16 matmuls measured 3.4-5.2x fp32's on 2 Xeon cores with AMX and
    2.2-2.8x on 2 AMD EPYC (Zen 4) cores with AVX512_BF16 (docs/design.md, Precision); fp32 elsewhere."""
    if spec == "float32":
        return torch.float32
    if spec == "bfloat16":
        return torch.bfloat16
    if spec != "auto":
        raise ValueError(f"dtype {spec!r}: choose auto, float32 or bfloat16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16_units() else torch.float32


def load_causal_lm(model_dir: str | Path, device: str = "auto", adapter_dir: str | Path | None = None,
                   dtype: str = "float32"):
    """(model, tokenizer) in eval mode; with `adapter_dir`, the base model plus that LoRA adapter.
    `dtype` is the base weights' (pick_dtype); a LoRA adapter's weights stay fp32 (peft keeps
    them so over a bf16 base), and so do the losses and log-softmaxes computed from the logits.
    The library's default is fp32, the exact path every equality test is stated on; a run
    config's default is auto."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = pick_device(device)
    dtype = pick_dtype(dtype, dev)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(dev)
    if adapter_dir is not None:
        from peft import PeftModel

        with peft_wrapping():
            model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return model, tokenizer


@contextlib.contextmanager
def lora_merged(model):
    """The active LoRA adapter added into its base weights for the duration, with peft's
    adapter path switched off: a decoded token then costs one matmul per linear layer, not
    three (base, A, B) and peft's bookkeeping around them. The base weights are copied first
    and put back bit for bit afterwards: merging and unmerging in floating point would drift
    them, and with them the teacher (the same base with the adapter off) and resumed runs.
    Does nothing for a model without an active adapter (or inside disable_adapter())."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and not m.disable_adapters and not m.merged]
    if not layers or any(m.use_dora.get(name) for m in layers for name in m.active_adapters):
        yield  # nothing to merge, or DoRA, whose delta is not a plain weight sum
        return
    saved = []
    with torch.no_grad():
        for m in layers:
            weight = m.get_base_layer().weight
            saved.append(weight.detach().clone())
            for name in m.active_adapters:
                if name in m.lora_A:
                    weight += m.get_delta_weight(name).to(weight.dtype)
    try:
        with model.disable_adapter():
            yield
    finally:
        with torch.no_grad():
            for m, weight in zip(layers, saved):
                m.get_base_layer().weight.copy_(weight)


@contextlib.contextmanager
def lora_at_base_precision(model):
    """While inside, a LoRA adapter over bf16 (or fp16) base weights runs its two matmuls in the
    base's dtype, its fp32 weights cast for them (autocast), as mixed-precision training does: the
    weights, their gradients and AdamW's state stay fp32. peft would otherwise copy every layer's
    input to fp32 and add an fp32 delta at the layer's full width, 210 times a pass on
    smollm2-135m: a kl-sized forward and backward took 2.15 s instead of 2.58 on 2 Xeon cores
    (bench/lora_precision.py). The scorer runs its decoder in it, so training, validation and eval's
    teacher-forced scores read the student alike. Nothing changes over fp32 weights (the exact
    path), nor for a model whose adapter is off or merged (over bf16, autocast finds nothing else
    to cast: the base's matmuls are bf16 already, and its norms and rotary embeddings keep fp32
    themselves)."""
    from peft.helpers import disable_input_dtype_casting

    weight = next(p for n, p in model.named_parameters() if "lora_" not in n)
    if weight.dtype not in (torch.bfloat16, torch.float16):
        yield
        return
    with disable_input_dtype_casting(model), torch.autocast(weight.device.type, dtype=weight.dtype):
        yield


class DecoderAndHead:
    """A causal LM (or its peft wrapper) taken apart: the decoder, called directly, and the
    output layer, applied only where logits are wanted, on a 2-D [positions, hidden] tensor.
    (transformers' own `logits_to_keep=1` hands the output layer a strided [batch, 1, hidden]
    view, which torch's matmul serves by expanding the weight to [batch, hidden, vocab] and
    copying it: 5.2 GB and 4.7 s for one prefill of 96 rows on 2 cores, measured.)"""

    def __init__(self, model):
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.decoder = getattr(causal_lm, causal_lm.base_model_prefix)
        self.output = causal_lm.get_output_embeddings()
        self.softcap = getattr(causal_lm.config, "final_logit_softcapping", None)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits of [positions, hidden] states."""
        logits = self.output(hidden).float()
        return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits

