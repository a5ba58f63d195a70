"""The local scorer: a model's output at the weighted target positions of a batch of datums,
teacher-forced. What the trainer's losses, a prompted teacher's judgement and eval's likelihood
scores all read."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import divergence
from ..render import Datum
from . import output_loss
from .local_attention import MIN_SHARED_PREFIX, common_prefix_len, prefix_kv, use_shared_prefix_attention
from .local_model import DecoderAndHead, lora_at_base_precision

@dataclass
class Scored:
    """A model's output at every position with weight > 0, flattened over the batch: `row[i]`
    is the datum position i belongs to, `target[i]` the token (or K tokens) it predicts. The
    decoder's hidden states are kept and the output layer applied on demand: `logits` when a
    loss reads the whole distribution, or, where the output layer is a plain frozen linear map,
    `token_nll` and `forward_kl` take it chunk by chunk with their loss (output_loss.py)."""

    hidden: torch.Tensor  # [positions, hidden size]: the decoder's output, before the output layer
    target: torch.Tensor  # [positions] (1-D targets) or [positions, K] (soft targets)
    weight: torch.Tensor  # same shape as target
    row: torch.Tensor  # [positions]
    head: DecoderAndHead
    fused: bool  # the output layer may run chunk by chunk with the loss

    @functools.cached_property
    def logits(self) -> torch.Tensor:
        """[positions, vocab], float32."""
        return self.head.logits(self.hidden)

    def token_nll(self) -> torch.Tensor:
        """-log p(target) at each position (1-D targets)."""
        if self.fused:
            return output_loss.token_nll(self.hidden, self.head.output.weight, self.target)
        return F.cross_entropy(self.logits, self.target, reduction="none")

    def forward_kl(self, target_logprobs: torch.Tensor) -> torch.Tensor:
        """KL(target || model) at each position, the target given as log-probabilities over the vocabulary."""
        target_logprobs = target_logprobs.to(self.hidden.device)
        if self.fused:
            return output_loss.forward_kl(self.hidden, self.head.output.weight, target_logprobs)
        return divergence.forward_kl(target_logprobs, self.logits)

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

    def scored(self, batch: list[Datum], share_prefix: bool = False) -> Scored:
        first_weighted = min(next(i for i, w in enumerate(d.weights) if _weighs(w)) for d in batch)
        shared = min(common_prefix_len([d.input_tokens for d in batch]), first_weighted) if share_prefix else 0
        extra = {}
        if shared >= MIN_SHARED_PREFIX and use_shared_prefix_attention(self.model):
            key = tuple(batch[0].input_tokens[:shared])
            if self._prefix is None or self._prefix[0] != key:
                self._prefix = (key, prefix_kv(self.parts.decoder, list(key), self.device))
            extra["shared_prefix"] = self._prefix[1]
        else:
            shared = 0
        width = max(len(d.input_tokens) for d in batch) - shared
        soft = batch[0].soft
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
        with lora_at_base_precision(self.model):  # the decoder only: the output layer and the losses stay as they are
            hidden = self.parts.decoder(input_ids=ids, attention_mask=attention, position_ids=positions,
                                        **extra).last_hidden_state
        scored = (weights > 0).any(-1) if soft else weights > 0
        rows = torch.arange(len(batch), device=self.device)[:, None].expand(-1, width)[scored]
        return Scored(hidden[scored], targets[scored], weights[scored], rows, self.parts, self.fused)

    @torch.no_grad()
    def per_example(self, batch: list[Datum]) -> list[tuple[float, int]]:
        """(summed nll, token count) for each datum: per-query likelihood scores."""
        self.model.eval()
        s = self.scored(batch)
        nll, rows = s.token_nll(), s.row
        sums = torch.zeros(len(batch), device=nll.device).index_add_(0, rows, nll)
        counts = torch.bincount(rows, minlength=len(batch))
        return [(float(s), int(c)) for s, c in zip(sums, counts)]


def _weighs(w) -> bool:
    return any(x > 0 for x in w) if isinstance(w, (list, tuple)) else w > 0

