"""What a training loss is to the trainers, and cross_entropy, the loss every trainer has.

A loss is written once, as a small class beside the objective that uses it (objectives/kl.py,
on_policy.py, jsd.py); the trainers only call it:

- the local trainer hands `local` the student's output at the batch's weighted positions
  (`backends/local_scorer.Scored`: `.logits`, `.target`, `.weight`, and `.token_nll()` /
  `.forward_kl(target)`, which take the output layer chunk by chunk where it can) and
  backpropagates the first value it returns;
- the Tinker backend sends each datum as `tinker_inputs` under the loss's Tinker name (the wire
  format; a loss without one has no Tinker form) and reads its figures back with `from_tinker`,
  from the target log-probabilities Tinker returns.

Both return the loss as sum(weight x per-position loss) and the per-position values the metrics
report (train_loss is their token mean).
"""

from __future__ import annotations

import torch

from .render import Datum


class Loss:
    tinker: str | None = None  # Tinker's name for this loss, where Tinker computes it

    def local(self, out, batch: list[Datum]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of weight x loss over the weighted positions, each position's loss, detached)."""
        raise NotImplementedError

    def tinker_inputs(self, d: Datum) -> dict[str, tuple[list, str, list[int]]]:
        """Tinker's loss_fn_inputs for one datum: name -> (flat data, dtype, shape)."""
        raise NotImplementedError(f"{type(self).__name__} has no Tinker form")

    def from_tinker(self, d: Datum, logprobs: list) -> tuple[float, float, int]:
        """(loss, per-position losses summed, positions) from Tinker's target log-probabilities."""
        raise NotImplementedError(f"{type(self).__name__} has no Tinker form")


def teacher_logprobs(batch: list[Datum]) -> torch.Tensor:
    """The teacher's log-probabilities over the vocabulary at every weighted position of the batch,
    [positions, vocab], in the order the scorer flattens them."""
    return torch.cat([d.teacher_logprobs for d in batch])


class CrossEntropy(Loss):
    """-log p(target) at each position; with K weighted targets per position (soft labels) the
    soft cross-entropy sum_k w_k (-log p(target_k)), whose per-position value divides by sum_k w_k."""

    tinker = "cross_entropy"

    def local(self, out, batch):
        if out.target.dim() == 1:
            nll = out.token_nll()
            return (nll * out.weight).sum(), nll.detach()
        picked = -torch.log_softmax(out.logits, -1).gather(-1, out.target)  # [positions, K]
        return (picked * out.weight).sum(), ((picked * out.weight).sum(-1) / out.weight.sum(-1)).detach()

    def tinker_inputs(self, d):
        n = len(d.target_tokens)
        if d.soft:
            targets, weights = [t for row in d.target_tokens for t in row], [w for row in d.weights for w in row]
            shape = [n, len(d.target_tokens[0])]
        else:
            targets, weights, shape = list(d.target_tokens), list(d.weights), [n]
        return {"target_tokens": (targets, "int64", shape), "weights": (weights, "float32", shape)}

    def from_tinker(self, d, logprobs):
        loss = per_position = 0.0
        tokens = 0
        for w, lp in zip(d.weights, logprobs, strict=True):
            ws, lps = (w, lp) if isinstance(w, (list, tuple)) else ([w], [lp])
            if sum(ws) > 0:
                weighted = sum(x * -y for x, y in zip(ws, lps))
                loss += weighted
                per_position += weighted / sum(ws)
                tokens += 1
        return loss, per_position, tokens


CROSS_ENTROPY = CrossEntropy()
