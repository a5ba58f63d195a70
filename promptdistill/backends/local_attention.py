"""The local backend's attention over a shared prefix and its KV cache.

A batch of rows that all begin with the same long system prompt runs that prefix through the
model once; every row then attends to the one copy of its keys and values (`shared_prefix`)
beside its own, growing cache. A prefill of many positions a row joins that copy to each row's
keys instead, for SDPA's fused kernel. The sampler and the scorer both use it.
"""

from __future__ import annotations

import functools

import torch

MIN_SHARED_PREFIX = 16  # below this, sharing a prefix is not worth a second attention term
# From this many query positions a row (a prefill: a long history, a whole conversation scored),
# the prefix is joined to each row's keys for SDPA's fused kernel instead: the split form builds
# [rows x width x width] scores unfused, 6x slower at width 1024 (bench/README.md).
JOINED_KEYS_WIDTH = 32
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
    their key/value head throughout, so this split form never repeats or copies a key or value.
    It pays off while a row brings few queries (decoding); a prefill of JOINED_KEYS_WIDTH or
    more goes to `joined_keys_attention`, which copies the prefix into every row. Without `shared_prefix` this is plain SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if shared_prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    prefix_keys, prefix_values = shared_prefix[module.layer_idx]
    batch, heads, width, dim = query.shape
    kv_heads, own_len = key.shape[1], key.shape[2]
    if attention_mask is None:  # the mask builder left causality to the kernel: apply it here
        attention_mask = torch.ones(width, own_len, dtype=torch.bool, device=query.device).tril(own_len - width)
    if width >= JOINED_KEYS_WIDTH:
        return joined_keys_attention(module, query, key, value, attention_mask, prefix_keys, prefix_values, scaling)
    rows = heads // kv_heads * width  # query rows per key/value head and batch row
    scale = scaling if scaling is not None else dim ** -0.5
    grouped = query.reshape(batch, kv_heads, rows, dim)
    stacked = grouped.transpose(0, 1).reshape(kv_heads, batch * rows, dim)
    prefix_scores = (stacked @ prefix_keys.transpose(1, 2)) * scale  # [kv_heads, batch*rows, P]
    own_scores = (grouped @ key.transpose(2, 3)) * scale  # [batch, kv_heads, rows, S]
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


def joined_keys_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor, prefix_keys: torch.Tensor, prefix_values: torch.Tensor,
                          scaling: float | None):
    """SDPA over [the prefix ; the row's own keys], the prefix always visible. The prefix is
    copied into every row by the concatenation (and its key/value heads repeated for the query
    heads by transformers' SDPA path), a few MB a layer for a batch, which a prefill's fused
    kernel repays many times over."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, prefix_len = query.shape[0], prefix_keys.shape[1]
    keys = torch.cat([prefix_keys.expand(batch, -1, -1, -1), key], 2)
    values = torch.cat([prefix_values.expand(batch, -1, -1, -1), value], 2)
    mask = attention_mask.expand(batch, 1, *attention_mask.shape[-2:])
    visible = (mask.new_ones if mask.dtype == torch.bool else mask.new_zeros)(*mask.shape[:-1], prefix_len)
    return sdpa_attention_forward(module, query, keys, values, torch.cat([visible, mask], -1), scaling=scaling)


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


@torch.no_grad()
def prefix_kv(decoder, prefix: list[int], device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values) of `prefix`, [kv_heads, len, head_dim]: one copy that every
    row of a batch attends to through shared_prefix_attention. (The decoder alone: no logits.)"""
    cache = new_cache()
    decoder(input_ids=torch.tensor([prefix], device=device), cache=cache, use_cache=True)
    return [(layer.keys[0], layer.values[0]) for layer in cache.layers]


def common_prefix_len(seqs: list[list[int]]) -> int:
    first, n = seqs[0], min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != first[i] for s in seqs):
            return i
    return n

