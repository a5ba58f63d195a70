"""The local sampler: batched generation with our own decoding loop, so that the common prefix
of a batch (the long system prompt) is run through the model once and its KV cache shared by
every row, finished rows leave the batch, and each row draws from its own seeded generator."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F

from ..render import Message, prompt_ids, stop_token_ids
from .base import Completion, SamplingParams
from .local_attention import MIN_SHARED_PREFIX, common_prefix_len, new_cache, prefix_kv, use_shared_prefix_attention
from .local_model import DecoderAndHead, load_causal_lm, lora_merged
from .stacked_lora import StackedLora

class LocalSampler:
    def __init__(self, model, tokenizer, batch_size: int = 16, merge_lora: bool = False):
        self.model = model
        self.merge_lora = merge_lora  # decode with the adapter folded into the weights (lora_merged)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.stop_ids = stop_token_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        # (adapter, tokens) and the prefix's per-layer keys and values
        self._prefix: tuple[tuple[str | None, tuple[int, ...]], list] | None = None
        self.shares_prefix = use_shared_prefix_attention(model)
        self.parts = DecoderAndHead(model)
        self._stacked: StackedLora | None = None  # the adapters stacked for per-row decoding, at its first batch

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

    def adapters_changed(self) -> None:
        """Forget what was computed from the model's adapters, after one was loaded or deleted:
        the prefix's keys and values (through the active adapter, which may be another now) and
        the stacked adapters."""
        self.forget_prefix()
        self._stacked = None

    def _prefix_kv(self, prefix: list[int], live_adapters: list[str] | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The prefix's keys and values, reused while batches share the prefix (and adapter).
        With per-row adapters every row has the same one here (None: the base): the prefix is one row."""
        through = "active adapter" if live_adapters is None else ("row adapter", live_adapters[0])
        key = (through, tuple(prefix))
        if self._prefix is None or self._prefix[0] != key:
            rows = None if live_adapters is None else live_adapters[:]
            if rows is not None:
                live_adapters[:] = rows[:1]
            try:
                self._prefix = (key, prefix_kv(self.parts.decoder, prefix, self.device))
            finally:
                if rows is not None:
                    live_adapters[:] = rows
        return self._prefix[1]

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams, seeds: list[int], on_token=None,
                 adapters: list[str] | None = None) -> list[Completion]:
        """Decode a batch. `on_token(row, token_id)` is called as tokens are produced (streaming).
        `adapters` names each row's LoRA adapter (the model holds several: `distill serve` with
        many runs; None: no adapter, the base model), so rows of different students decode
        together (StackedLora); none: the active adapter."""
        if adapters is None:
            return self._generate(prompts, params, seeds, on_token, None)
        if self._stacked is None:
            self._stacked = StackedLora(self.model)
        live = list(adapters)  # each live row's adapter, kept in step as finished rows leave
        with self._stacked.per_row(live):
            return self._generate(prompts, params, seeds, on_token, live)

    def _generate(self, prompts: list[list[int]], params: SamplingParams, seeds: list[int], on_token,
                  live_adapters: list[str] | None) -> list[Completion]:
        self.model.eval()
        batch = len(prompts)
        shared = min(common_prefix_len(prompts), min(len(p) for p in prompts) - 1)
        # The prefix's keys and values depend on the adapter: rows of several students share none.
        one_adapter = live_adapters is None or len(set(live_adapters)) == 1
        if shared >= MIN_SHARED_PREFIX and self.shares_prefix and one_adapter:
            prefix = {"shared_prefix": self._prefix_kv(prompts[0][:shared], live_adapters)}
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
                if live_adapters is not None:
                    live_adapters[:] = [live_adapters[i] for i in keep.tolist()]
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

