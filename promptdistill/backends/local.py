"""Local backend: transformers + peft on this machine's CPU (or a CUDA GPU when present).

Sampler: batched generation with our own decoding loop, so that the common prefix of a
batch (the long system prompt) is run through the model once and its KV cache shared
by every row, finished rows leave the batch, and each row draws from its own seeded
generator. Trainer: a LoRA model and AdamW behind Tinker's primitives; the loss runs the
output layer only at answer positions, since the 49k-word vocabulary dominates a small
model's compute.
"""

from __future__ import annotations

import contextlib
import functools
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import distributed, divergence
from ..render import Datum, Message, prompt_ids, stop_token_ids
from . import output_loss
from .base import Completion, SamplingParams, StepResult

MIN_SHARED_PREFIX = 16  # below this, sharing a prefix is not worth a second attention term
CACHE_HEADROOM = 128  # tokens of spare KV-cache capacity allocated at a time


@functools.cache
def _growing_layer_class():
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A KV-cache layer that appends into spare capacity. transformers' DynamicLayer
        concatenates, copying the whole cache at every decoding step; with a 600-token
        shared prompt in every row that copy costs as much as the attention itself."""

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            used = self.keys.shape[-2] if self.keys.numel() else 0
            new = key_states.shape[-2]
            buffer = getattr(self, "_buffer", None)
            if (buffer is None or buffer[0].shape[-2] < used + new or buffer[0].shape[0] != key_states.shape[0]
                    or (used and self.keys.data_ptr() != buffer[0].data_ptr())):  # resized, reordered or replaced
                shape = (*key_states.shape[:2], used + new + CACHE_HEADROOM, key_states.shape[-1])
                buffer = (key_states.new_empty(shape), value_states.new_empty(shape))
                if used:
                    buffer[0][:, :, :used] = self.keys
                    buffer[1][:, :, :used] = self.values
                self._buffer = buffer
            buffer[0][:, :, used:used + new] = key_states
            buffer[1][:, :, used:used + new] = value_states
            self.keys, self.values = buffer[0][:, :, :used + new], buffer[1][:, :, :used + new]
            return self.keys, self.values

    return GrowingLayer


SHARED_PREFIX_ATTENTION = "promptdistill_shared_prefix"


def shared_prefix_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                            shared_prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None, **kwargs):
    """Attention over [one shared prefix ; each row's own tokens].

    The system prompt is the same in every row of a teacher batch. Copying its keys and
    values into every row (what a batched KV cache does) multiplies the memory by the
    batch size and makes every decoding step read all those copies. Here the prefix is
    stored once, [kv_heads, P, d]: every row's queries for a key/value head are stacked
    into one matmul against it. The rows' own keys (the cache: query and answer so far) are
    scored per row with their padding mask, and one softmax spans both parts without
    concatenating them (a shared maximum, then the two sums). Query heads stay grouped by
    their key/value head throughout, so no key or value is ever repeated or copied.
    Without `shared_prefix` this is plain SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if shared_prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    prefix_keys, prefix_values = shared_prefix[module.layer_idx]
    batch, heads, width, dim = query.shape
    kv_heads, own_len = key.shape[1], key.shape[2]
    rows = heads // kv_heads * width  # query rows per key/value head and batch row
    scale = scaling if scaling is not None else dim ** -0.5
    grouped = query.reshape(batch, kv_heads, rows, dim)
    stacked = grouped.transpose(0, 1).reshape(kv_heads, batch * rows, dim)
    prefix_scores = (stacked @ prefix_keys.transpose(1, 2)) * scale  # [kv_heads, batch*rows, P]
    own_scores = (grouped @ key.transpose(2, 3)) * scale  # [batch, kv_heads, rows, S]
    if attention_mask is None:  # the mask builder left causality to the kernel: apply it here
        attention_mask = torch.ones(width, own_len, dtype=torch.bool, device=query.device).tril(own_len - width)
    per_head = own_scores.view(batch, kv_heads, heads // kv_heads, width, own_len)
    mask = attention_mask.reshape(-1, 1, 1, width, own_len)  # [batch or 1, 1, 1, width, S]
    if mask.dtype == torch.bool:
        per_head.masked_fill_(~mask, float("-inf"))
    else:
        per_head.add_(mask)

    def by_row(t: torch.Tensor) -> torch.Tensor:  # [kv_heads, batch*rows, ...] -> [batch, kv_heads, rows, ...]
        return t.view(kv_heads, batch, rows, *t.shape[2:]).transpose(0, 1)

    peak = torch.maximum(by_row(prefix_scores.amax(-1)), own_scores.amax(-1))  # [batch, kv_heads, rows]
    own_weights = torch.exp(own_scores - peak[..., None])
    prefix_weights = torch.exp(prefix_scores - peak.transpose(0, 1).reshape(kv_heads, batch * rows, 1))
    total = own_weights.sum(-1) + by_row(prefix_weights.sum(-1))
    out = own_weights @ value + by_row(prefix_weights @ prefix_values)  # [batch, kv_heads, rows, d]
    out = out / total[..., None]
    return out.view(batch, heads, width, dim).transpose(1, 2).contiguous(), None


def use_shared_prefix_attention(model) -> bool:
    """Switch `model` to shared_prefix_attention (identical to SDPA when no prefix is passed),
    if its architecture routes attention through transformers' AttentionInterface."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(SHARED_PREFIX_ATTENTION, shared_prefix_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SHARED_PREFIX_ATTENTION, sdpa_mask)
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if causal_lm.config._attn_implementation not in ("sdpa", SHARED_PREFIX_ATTENTION):
        return False  # eager / flash / flex chosen on purpose: leave it alone
    if not causal_lm._can_set_attn_implementation():
        return False
    causal_lm.set_attn_implementation(SHARED_PREFIX_ATTENTION)
    return causal_lm.config._attn_implementation == SHARED_PREFIX_ATTENTION


def new_cache():
    """An empty KV cache whose layers grow in place (see GrowingLayer)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.layer_class_to_replicate = _growing_layer_class()
    return cache


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


def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bf16 in hardware: AMX tiles (Intel Sapphire Rapids and later)
    or AVX512_BF16's dot products (AMD Zen 4, Intel Cooper Lake), read from the kernel's CPU
    flags (only Linux is asked; elsewhere the answer is no). Without them oneDNN emulates bf16
    and it runs no faster than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"^flags\s*:.*\b(amx_bf16|avx512_bf16)\b", flags, re.MULTILINE) is not None


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


@torch.no_grad()
def prefix_kv(decoder, prefix: list[int], device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values) of `prefix`, [kv_heads, len, head_dim]: one copy that every
    row of a batch attends to through shared_prefix_attention. (The decoder alone: no logits.)"""
    cache = new_cache()
    decoder(input_ids=torch.tensor([prefix], device=device), cache=cache, use_cache=True)
    return [(layer.keys[0], layer.values[0]) for layer in cache.layers]


def _common_prefix_len(seqs: list[list[int]]) -> int:
    first, n = seqs[0], min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != first[i] for s in seqs):
            return i
    return n


class LocalSampler:
    def __init__(self, model, tokenizer, batch_size: int = 16, merge_lora: bool = False):
        self.model = model
        self.merge_lora = merge_lora  # decode with the adapter folded into the weights (lora_merged)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.stop_ids = stop_token_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self._prefix: tuple[tuple[int, ...], list] | None = None  # (tokens, per-layer keys and values)
        self.shares_prefix = use_shared_prefix_attention(model)
        self.parts = DecoderAndHead(model)

    def _next_logits(self, **inputs) -> torch.Tensor:
        """[rows, vocab] fp32: the output layer at each row's last position only."""
        return self.parts.logits(self.parts.decoder(use_cache=True, **inputs).last_hidden_state[:, -1])

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: str = "auto", batch_size: int = 16,
                 adapter_dir: str | Path | None = None, dtype: str = "float32") -> "LocalSampler":
        model, tokenizer = load_causal_lm(model_dir, device, adapter_dir, dtype)
        return cls(model, tokenizer, batch_size)

    def count_prompt_tokens(self, conversation: list[Message]) -> int:
        return len(prompt_ids(self.tokenizer, conversation))

    def sample(self, conversations: list[list[Message]], params: SamplingParams, seeds: list[int]) -> list[Completion]:
        prompts = [prompt_ids(self.tokenizer, c) for c in conversations]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths, less padding
        out: list[Completion | None] = [None] * len(prompts)
        with self.merged():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                for i, c in zip(idx, self.generate([prompts[i] for i in idx], params, [seeds[i] for i in idx])):
                    out[i] = c
        return out

    def merged(self):
        """The context `generate` calls decode in: the adapter merged when merge_lora is set."""
        return lora_merged(self.model) if self.merge_lora else contextlib.nullcontext()

    def _logprob_rows(self, entries: list[tuple]) -> list[dict]:
        def text(i: int) -> str:
            return self.tokenizer.decode([i])

        return [{"token": text(t), "id": t, "logprob": lp, "top": [[text(i), i, v] for i, v in zip(ids, lps)]}
                for t, lp, ids, lps in entries]

    def forget_prefix(self) -> None:
        self._prefix = None

    def _prefix_kv(self, prefix: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The prefix's keys and values, reused while batches share the prefix."""
        if self._prefix is None or self._prefix[0] != tuple(prefix):
            self._prefix = (tuple(prefix), prefix_kv(self.parts.decoder, prefix, self.device))
        return self._prefix[1]

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams, seeds: list[int], on_token=None) -> list[Completion]:
        """Decode a batch. `on_token(row, token_id)` is called as tokens are produced (streaming)."""
        self.model.eval()
        batch = len(prompts)
        shared = min(_common_prefix_len(prompts), min(len(p) for p in prompts) - 1)
        if shared >= MIN_SHARED_PREFIX and self.shares_prefix:
            prefix = {"shared_prefix": self._prefix_kv(prompts[0][:shared])}
        else:
            shared, prefix = 0, {}
        cache = new_cache()  # holds each row's own tokens only; the prefix lives once in `prefix`
        suffixes = [p[shared:] for p in prompts]
        width = max(len(s) for s in suffixes)
        ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        suffix_mask = torch.zeros((batch, width), dtype=torch.long)
        for r, s in enumerate(suffixes):  # left padding: every row's last token is aligned
            ids[r, width - len(s):] = torch.tensor(s)
            suffix_mask[r, width - len(s):] = 1
        attention = suffix_mask.to(self.device)
        positions = (shared + suffix_mask.cumsum(1) - 1).clamp(min=shared).to(self.device)
        logits = self._next_logits(input_ids=ids.to(self.device), attention_mask=attention, position_ids=positions,
                                   cache=cache, **prefix)
        next_pos = positions[:, -1:] + 1

        generators = [torch.Generator().manual_seed(s) for s in seeds]
        scored: list[list[tuple]] | None = [[] for _ in range(batch)] if params.top_logprobs is not None else None
        seen = torch.zeros((batch, logits.shape[-1]), dtype=torch.bool, device=self.device)
        produced: list[list[int]] = [[] for _ in range(batch)]
        finish = ["length"] * batch
        rows = list(range(batch))  # which original row each live batch position holds
        stop = torch.tensor(self.stop_ids, device=self.device)
        for step in range(params.max_tokens):
            tokens = choose_tokens(logits, seen, params, [generators[r] for r in rows])
            if scored is not None:
                for pos, entry in enumerate(zip(*token_logprobs(logits, tokens, params.top_logprobs))):
                    scored[rows[pos]].append(entry)
            for pos, r in enumerate(rows):
                produced[r].append(int(tokens[pos]))
                if on_token is not None:
                    on_token(r, int(tokens[pos]))
            done = torch.isin(tokens, stop)
            for pos in done.nonzero().flatten().tolist():
                finish[rows[pos]] = "stop"
            if done.all() or step == params.max_tokens - 1:
                break
            if done.any():  # finished rows leave the batch: no more compute spent on them
                keep = (~done).nonzero().flatten()
                cache.batch_select_indices(keep)
                rows = [rows[i] for i in keep.tolist()]
                tokens, attention, next_pos, seen = tokens[keep], attention[keep], next_pos[keep], seen[keep]
            seen[torch.arange(len(rows)), tokens] = True
            attention = torch.cat([attention, attention.new_ones((len(rows), 1))], 1)
            logits = self._next_logits(input_ids=tokens[:, None], attention_mask=attention, position_ids=next_pos,
                                       cache=cache, **prefix)
            next_pos = next_pos + 1
        return [
            Completion(
                text=self.tokenizer.decode(produced[r], skip_special_tokens=True).strip(),
                token_ids=produced[r],
                prompt_tokens=len(prompts[r]),
                finish_reason=finish[r],
                logprobs=None if scored is None else self._logprob_rows(scored[r]),
            )
            for r in range(batch)
        ]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[list, list, list, list]:
    """Per row: (chosen id, its log-probability, top-k ids, their log-probabilities) under the
    model's own distribution, before temperature and penalties (what OpenAI-style servers report)."""
    logp = torch.log_softmax(logits.float(), -1)
    chosen = logp.gather(-1, tokens[:, None]).squeeze(-1)
    top_lp, top_ids = logp.topk(k, -1) if k > 0 else (logp[:, :0], tokens[:, None][:, :0])
    return tokens.tolist(), chosen.tolist(), top_ids.tolist(), top_lp.tolist()


def choose_tokens(logits: torch.Tensor, seen: torch.Tensor, params: SamplingParams,
                  generators: list[torch.Generator]) -> torch.Tensor:
    """Next token per row: repetition penalty on tokens this row already produced (not the
    prompt: a 600-token persona would otherwise be penalised), then greedy or top-p sampling."""
    if params.repetition_penalty != 1.0:
        logits = penalise_repeats(logits, seen, params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / params.temperature, -1)
    candidates, cand_ids = nucleus(probs, params.top_p)
    # Inverse-CDF draw over the candidates, one uniform per row from the row's own generator:
    # the same draw as multinomial, without a 49k-wide pass per row and step.
    cdf = candidates.cumsum(-1)
    u = torch.stack([torch.rand((), generator=g) for g in generators]).to(cdf) * cdf[:, -1]
    picks = torch.searchsorted(cdf, u[:, None]).clamp(max=cdf.shape[-1] - 1)
    return cand_ids.gather(-1, picks).squeeze(-1)


def penalise_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (positive logits divided by it, negative ones multiplied) at
    the tokens `seen` marks, computed there alone: a row has produced at most max_tokens of
    the 49k, and penalising the whole vocabulary to keep a few entries cost three full passes
    per step. The same values as the whole-vocabulary form, in a new tensor."""
    rows, cols = seen.nonzero(as_tuple=True)
    at = logits[rows, cols]
    return logits.index_put((rows, cols), torch.where(at > 0, at / penalty, at * penalty))


# Widths of the top-k that nucleus tries in turn; a row whose nucleus is wider still gets a full
# sort. Decoding the demo's teacher (top-p 0.9, temperature 0.7, bf16) the nucleus held a median
# of 8 tokens and 94% of rows held at most 64, and a top-64 over 49k tokens costs a fraction of a
# top-1024: generating 64 demo answers at batch 64 ran 9% faster (bench/README.md).
NUCLEUS_CANDIDATES = (64, 1024)


def nucleus(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, token ids) of each row's smallest set of top tokens reaching `top_p`,
    zero beyond it; with top_p 1, every token in vocabulary order (nothing to sort). Sorting
    the whole vocabulary every step cost more than the model's attention: the nucleus almost
    always lies in the top 64, so rows are first cut there; a row whose top 64 fall short of
    top_p is looked at again in its top 1024, then fully sorted. Narrower rows are padded with
    zeros to the widest row's width, which changes neither their kept set nor their draw. The
    draws are a wider cut's, except among tokens of exactly equal probability, which another
    width may list in another order: rare in fp32, common with bf16's coarse logits, where the
    distribution is the same and the particular draws are not."""
    if top_p >= 1.0:
        return probs, torch.arange(probs.shape[-1], device=probs.device).expand_as(probs)
    vocab = probs.shape[-1]
    top, ids = probs.topk(min(NUCLEUS_CANDIDATES[0], vocab), dim=-1)
    for k in (*NUCLEUS_CANDIDATES[1:], None):  # None: the full sort
        short = top.sum(-1) < top_p
        if top.shape[-1] == vocab or not bool(short.any()):
            break
        wide_top, wide_ids = (probs[short].sort(-1, descending=True) if k is None
                              else probs[short].topk(min(k, vocab), dim=-1))
        pad = wide_top.shape[-1] - top.shape[-1]
        top, ids = F.pad(top, (0, pad)), F.pad(ids, (0, pad))
        top[short], ids[short] = wide_top, wide_ids
    outside = top.cumsum(-1) - top > top_p  # keep the smallest set reaching top_p
    return top.masked_fill(outside, 0.0), ids


@dataclass
class Scored:
    """The output layer's logits at every position with weight > 0, flattened over the
    batch: `row[i]` is the datum position i belongs to, `target[i]` the token it predicts."""

    logits: torch.Tensor | None  # [positions, vocab], float32 (None when scored with project=False)
    target: torch.Tensor  # [positions] (1-D targets) or [positions, K] (soft targets)
    weight: torch.Tensor  # same shape as target
    row: torch.Tensor  # [positions]
    hidden: torch.Tensor | None = None  # [positions, hidden size]: the decoder's output, before the output layer

    def per_row(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(logits, target) of each of the batch's n datums."""
        return [(self.logits[self.row == i], self.target[self.row == i]) for i in range(n)]


class AnswerScorer:
    """Teacher-forced logits at the weighted target tokens. The output layer runs only at
    those positions: on a 135M model with a 49k vocabulary it is a fifth of the compute,
    and the losses and scores never look anywhere else.

    `share_prefix=True` (no gradients: a teacher scoring answers WITH its long system prompt)
    runs the datums' common prefix once and has every row attend to that one copy, as the
    sampler does, so scoring 128 answers costs 128 answers, not 128 prompts."""

    def __init__(self, model):
        self.model = model
        self.parts = DecoderAndHead(model)
        # the loss may take the output layer chunk by chunk (backends/output_loss.py)
        self.fused = output_loss.fusable(self.parts.output, self.parts.softcap)
        self.device = next(model.parameters()).device
        self._prefix: tuple[tuple[int, ...], list] | None = None

    def scored(self, batch: list[Datum], share_prefix: bool = False, project: bool = True) -> Scored:
        """project=False: the hidden states at those positions, the output layer left to the loss."""
        first_weighted = min(next(i for i, w in enumerate(d.weights) if _weighs(w)) for d in batch)
        shared = min(_common_prefix_len([d.input_tokens for d in batch]), first_weighted) if share_prefix else 0
        extra = {}
        if shared >= MIN_SHARED_PREFIX and use_shared_prefix_attention(self.model):
            key = tuple(batch[0].input_tokens[:shared])
            if self._prefix is None or self._prefix[0] != key:
                self._prefix = (key, prefix_kv(self.parts.decoder, list(key), self.device))
            extra["shared_prefix"] = self._prefix[1]
        else:
            shared = 0
        width = max(len(d.input_tokens) for d in batch) - shared
        soft = isinstance(batch[0].target_tokens[0], (list, tuple))
        k = len(batch[0].target_tokens[0]) if soft else None
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        attention = torch.zeros_like(ids)
        targets = torch.zeros((len(batch), width, k) if soft else (len(batch), width), dtype=torch.long)
        weights = torch.zeros(targets.shape)
        for r, d in enumerate(batch):  # right padding; padded positions carry weight 0
            n = len(d.input_tokens) - shared
            ids[r, :n] = torch.tensor(d.input_tokens[shared:])
            attention[r, :n] = 1
            targets[r, :n] = torch.tensor(d.target_tokens[shared:])
            weights[r, :n] = torch.tensor(d.weights[shared:])
        ids, attention, targets, weights = (t.to(self.device) for t in (ids, attention, targets, weights))
        positions = (shared + torch.arange(width, device=self.device)).expand(len(batch), -1)
        hidden = self.parts.decoder(input_ids=ids, attention_mask=attention, position_ids=positions, **extra).last_hidden_state
        scored = (weights > 0).any(-1) if soft else weights > 0
        rows = torch.arange(len(batch), device=self.device)[:, None].expand(-1, width)[scored]
        if not project:
            return Scored(None, targets[scored], weights[scored], rows, hidden=hidden[scored])
        return Scored(self.parts.logits(hidden[scored]), targets[scored], weights[scored], rows)

    def token_nll(self, batch: list[Datum]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(nll, weight, row) for every position with weight > 0 (1-D targets)."""
        if self.fused:
            s = self.scored(batch, project=False)
            return output_loss.token_nll(s.hidden, self.parts.output.weight, s.target), s.weight, s.row
        s = self.scored(batch)
        return F.cross_entropy(s.logits, s.target, reduction="none"), s.weight, s.row

    def forward_kl(self, batch: list[Datum]) -> tuple[torch.Tensor, torch.Tensor]:
        """(KL(teacher || model), weight) for every position with weight > 0, the teacher's
        log-probabilities carried by the datums (`teacher_logprobs`)."""
        s = self.scored(batch, project=not self.fused)
        teacher = torch.cat([d.teacher_logprobs for d in batch]).to(self.device)
        if self.fused:
            return output_loss.forward_kl(s.hidden, self.parts.output.weight, teacher), s.weight
        return divergence.forward_kl(teacher, s.logits), s.weight

    @torch.no_grad()
    def per_example(self, batch: list[Datum]) -> list[tuple[float, int]]:
        """(summed nll, token count) for each datum: per-query likelihood scores."""
        self.model.eval()
        nll, _, rows = self.token_nll(batch)
        sums = torch.zeros(len(batch), device=nll.device).index_add_(0, rows, nll)
        counts = torch.bincount(rows, minlength=len(batch))
        return [(float(s), int(c)) for s, c in zip(sums, counts)]


def _weighs(w) -> bool:
    return any(x > 0 for x in w) if isinstance(w, (list, tuple)) else w > 0


class LocalTrainer:
    """LoRA on a local model, AdamW on the LoRA weights only. Under `accelerate launch` or
    torchrun, each process holds a full copy and optim_step first sums the gradients of all
    processes (see distributed.py), so every copy takes the same step."""

    LOSSES = ("cross_entropy", "cross_entropy_with_rest", "forward_kl", "reverse_kl", "importance_sampling")

    def __init__(self, model_dir: str | Path, *, rank: int, alpha: float, dropout: float,
                 target_modules: str | list[str], weight_decay: float = 0.0, max_grad_norm: float | None = 1.0,
                 gradient_checkpointing: bool = False, device: str = "auto", dtype: str = "float32", seed: int = 0,
                 sample_batch_size: int = 16):
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        random.seed(seed)
        base, self.tokenizer = load_causal_lm(model_dir, device, dtype=dtype)
        if gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
        lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM")
        with peft_wrapping():
            self.model = get_peft_model(base, lora)
        self.device = next(self.model.parameters()).device
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        distributed.broadcast_from_main(self.params)
        self.optimizer = torch.optim.AdamW(self.params, lr=0.0, weight_decay=weight_decay)
        self.max_grad_norm = max_grad_norm
        self.sample_batch_size = sample_batch_size
        self.scorer = AnswerScorer(self.model)

    def _loss(self, batch: list[Datum], loss_fn: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(sum of weight x per-token loss, the per-token losses summed unweighted, positions).
        cross_entropy: -log p(target), or with K targets per position the soft cross-entropy
        sum_k w_k (-log p(target_k)) (its per-token value divides by sum_k w_k); reverse_kl:
        KL(model || teacher) over the vocabulary, the teacher's log-probabilities carried by the datums
        (forward_kl: KL(teacher || model), the kl objective with the whole distribution);
        cross_entropy_with_rest: the soft cross-entropy where a target id of -1 stands for all the
        tokens the position's other targets do not name, as one bin (log p of it = logsumexp of
        their logits - logsumexp of all): stored top-k soft labels with the mass they leave out;
        importance_sampling: Tinker's -sum(exp(log p - sampling log p) x advantage), whose per-token
        value is the sampled reverse-KL estimate the advantages encode (the on_policy objective on Tinker)."""
        if loss_fn == "cross_entropy" and not isinstance(batch[0].target_tokens[0], (list, tuple)):
            nll, weights, _ = self.scorer.token_nll(batch)  # the SFT path
            return (nll * weights).sum(), nll.detach().sum(), len(nll)
        if loss_fn == "forward_kl":
            kl, weights = self.scorer.forward_kl(batch)
            return (kl * weights).sum(), kl.detach().sum(), len(kl)
        s = self.scorer.scored(batch)
        if loss_fn in ("cross_entropy", "cross_entropy_with_rest"):
            rest = s.target < 0
            named = torch.where(rest, s.target[:, :1], s.target)  # the rest bin's column repeats a named id
            picked = -torch.log_softmax(s.logits, -1).gather(-1, named)  # [positions, K]
            if loss_fn == "cross_entropy_with_rest":
                log_rest = (torch.logsumexp(s.logits.scatter(-1, named, float("-inf")), -1)
                            - torch.logsumexp(s.logits, -1))
                picked = torch.where(rest, -log_rest[:, None], picked)
            per_token = (picked * s.weight).sum(-1) / s.weight.sum(-1)
            return (picked * s.weight).sum(), per_token.detach().sum(), len(per_token)
        if loss_fn == "reverse_kl":
            teacher = torch.cat([d.teacher_logprobs for d in batch]).to(s.logits.device)
            per_token = divergence.reverse_kl(s.logits, teacher)
            return (per_token * s.weight).sum(), per_token.detach().sum(), len(per_token)
        if loss_fn == "importance_sampling":
            old, advantage = (torch.tensor([x for d in batch for x, w in zip(getattr(d, f), d.weights) if w > 0],
                                           device=s.logits.device) for f in ("sampling_logprobs", "advantages"))
            logp = torch.log_softmax(s.logits, -1).gather(-1, s.target[:, None]).squeeze(-1)
            return -(torch.exp(logp - old) * advantage).sum(), divergence.sampled_reverse_kl(advantage, s.weight).sum(), len(logp)
        raise ValueError(f"the local trainer has no loss {loss_fn!r}")

    def forward_backward(self, batch: list[Datum], loss_fn: str = "cross_entropy") -> StepResult:
        self.model.train()
        loss, nll_sum, tokens = self._loss(batch, loss_fn)
        loss.backward()
        return StepResult(loss=float(loss.detach()), nll_sum=float(nll_sum), tokens=tokens)

    @torch.no_grad()
    def forward(self, batch: list[Datum], loss_fn: str = "cross_entropy") -> StepResult:
        self.model.eval()
        loss, nll_sum, tokens = self._loss(batch, loss_fn)
        return StepResult(loss=float(loss), nll_sum=float(nll_sum), tokens=tokens)

    def optim_step(self, lr: float) -> dict:
        distributed.sum_gradients(self.params)
        if self.max_grad_norm is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
        else:
            norm = float(torch.norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None])))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": norm}

    def save(self, path: str | Path) -> None:
        self.model.save_pretrained(str(path))

    def save_state(self, path: str | Path) -> None:
        self.save(path)
        torch.save({"optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                    "python_rng": random.getstate()}, Path(path) / "trainer_state.pt")

    def load_state(self, path: str | Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(self.model, load_file(str(Path(path) / "adapter_model.safetensors")))
        state = torch.load(Path(path) / "trainer_state.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])

    def sampler(self) -> LocalSampler:
        """A sampler of the current weights (on_policy's student answers), the adapter merged
        for decoding: a new one per call, so no prefix cache outlives a step's weights."""
        return LocalSampler(self.model, self.tokenizer, self.sample_batch_size, merge_lora=True)
