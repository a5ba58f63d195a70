"""Shared-prefix attention against attention written out by hand: one softmax over
[prefix ; the row's own keys], in float64, for a decoding step (the split form) and a prefill
(the prefix joined to the keys), with each kind of mask the model hands it."""

import types

import pytest
import torch

from promptdistill.backends.local_attention import JOINED_KEYS_WIDTH, shared_prefix_attention

HEADS, KV_HEADS, DIM, PREFIX, BATCH = 6, 2, 8, 20, 3


def by_hand(query, key, value, prefix_keys, prefix_values, visible, scale):
    """visible: [batch, width, own_len] bool. Every key/value head serves HEADS // KV_HEADS query heads."""
    q = query.double()
    k = torch.cat([prefix_keys.expand(len(q), -1, -1, -1), key], 2).double().repeat_interleave(HEADS // KV_HEADS, 1)
    v = torch.cat([prefix_values.expand(len(q), -1, -1, -1), value], 2).double().repeat_interleave(HEADS // KV_HEADS, 1)
    seen = torch.cat([torch.ones(*visible.shape[:2], PREFIX, dtype=torch.bool), visible], -1)[:, None]
    scores = (q @ k.transpose(2, 3) * scale).masked_fill(~seen, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)  # [batch, width, heads, dim]


@pytest.mark.parametrize("width", [1, 5, JOINED_KEYS_WIDTH, JOINED_KEYS_WIDTH + 9])
@pytest.mark.parametrize("mask_kind", ["causal by the kernel", "bool, left padded", "additive, left padded"])
def test_shared_prefix_attention_is_one_softmax_over_prefix_and_own_keys(width, mask_kind):
    g = torch.Generator().manual_seed(width)
    own = width + 4  # a decoding step or a prefill on top of earlier cached tokens
    query = torch.randn(BATCH, HEADS, width, DIM, generator=g)
    key, value = (torch.randn(BATCH, KV_HEADS, own, DIM, generator=g) for _ in range(2))
    prefix_keys, prefix_values = (torch.randn(KV_HEADS, PREFIX, DIM, generator=g) for _ in range(2))
    visible = torch.ones(width, own, dtype=torch.bool).tril(own - width).expand(BATCH, -1, -1).clone()
    if mask_kind == "causal by the kernel":
        mask = None
    else:
        visible[1, :, :3] = False  # row 1 has three padding positions; its padded queries see only the prefix
        visible[2, :, :own - 1] = False
        bool_mask = visible[:, None]
        mask = bool_mask if mask_kind.startswith("bool") else torch.zeros(bool_mask.shape).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    module = types.SimpleNamespace(layer_idx=0, num_key_value_groups=HEADS // KV_HEADS, is_causal=True)
    got, _ = shared_prefix_attention(module, query, key, value, mask, scaling=0.3, shared_prefix=[(prefix_keys, prefix_values)])
    want = by_hand(query, key, value, prefix_keys, prefix_values, visible, 0.3)
    assert got.shape == want.shape
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
