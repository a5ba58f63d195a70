"""The two small interfaces every backend implements; stages talk only to these.

Sampler: turn conversations into completions. Trainer: Tinker's primitives
(forward_backward, optim_step, save, sampler), so a recipe's training loop runs
unchanged on the local backend or a remote one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeVar

from ..loss import CROSS_ENTROPY, Loss
from ..render import Datum, Message


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 1.0
    max_tokens: int = 96
    repetition_penalty: float = 1.0
    seed: int = 0
    # None: no log-probabilities; k >= 0: each answer token's log-probability under the
    # model (before temperature and penalties) and, for k > 0, the k most likely tokens there.
    top_logprobs: int | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (end-of-turn token), "length" (hit max_tokens) or "error" (remote: gave up)
    error: str | None = None  # with finish_reason "error": why the row failed (never holds a secret)
    # With SamplingParams.top_logprobs: one {"token", "id", "logprob", "top": [[token, id, logprob], ...]}
    # per answer token; "id" is None when a remote server gives token text only.
    logprobs: list[dict] | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class Sampler(Protocol):
    def sample(self, conversations: list[list[Message]], params: SamplingParams, seeds: list[int]) -> list[Completion]:
        """One completion per conversation. `seeds[i]` seeds row i alone, so a row's
        answer does not depend on which other rows share its batch."""
        ...

    def count_prompt_tokens(self, conversation: list[Message]) -> int: ...


T = TypeVar("T", covariant=True)


class Pending(Protocol[T]):
    """A submitted call's result. A remote trainer returns one at once, so the recipe can
    submit a whole optimiser step (every forward_backward, then optim_step) before waiting."""

    def result(self) -> T: ...


@dataclass(frozen=True)
class StepResult:
    loss: float  # sum over tokens of weight * nll: what was backpropagated
    nll_sum: float  # unweighted nll over weighted (trainable) tokens
    tokens: int  # number of trainable tokens

    def result(self) -> "StepResult":
        """A local step is computed when called: its result is already there (a done Pending)."""
        return self


class Trainer(Protocol):
    def takes(self, loss: Loss) -> bool:
        """Whether this trainer can compute `loss` (every trainer takes cross_entropy)."""
        ...

    def forward_backward(self, batch: list[Datum], loss: Loss = CROSS_ENTROPY) -> Pending[StepResult]:
        """Accumulate gradients of sum(weights * loss) (loss.py; cross_entropy: one or K target
        tokens per position). Call `.result()` only after the step's optim_step is submitted:
        a remote backend then pipelines them."""
        ...

    def forward(self, batch: list[Datum], loss: Loss = CROSS_ENTROPY) -> StepResult:
        """The same loss, no gradients (validation)."""
        ...

    def optim_step(self, lr: float) -> dict:
        """Clip, step AdamW at `lr`, zero the gradients; returns {'grad_norm': ...}."""
        ...

    def save(self, path: str) -> None:
        """Write a standard PEFT adapter dir."""
        ...

    def save_state(self, path: str) -> None:
        """Adapter + optimiser + RNG state: everything needed to resume."""
        ...

    def is_checkpoint(self, path: str) -> bool:
        """Whether save_state finished writing `path` (a killed save leaves an incomplete one)."""
        ...

    def load_state(self, path: str) -> None: ...

    def sampler(self) -> Sampler:
        """Sample from the current weights."""
        ...
