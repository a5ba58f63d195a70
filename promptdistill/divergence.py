"""Divergences between next-token distributions, per position: the fidelity scores and
the distribution-level objectives share these few lines.

All take logits (or log-probabilities) of shape [positions, vocab] and return one value
per position. Forward KL(teacher || model) is what off-policy distillation minimises on
the teacher's answers; reverse KL(model || teacher) is what on-policy distillation
minimises on the model's own answers (it punishes the model for putting mass where the
teacher puts none, the failure a student shows when it is on its own).
"""

from __future__ import annotations

import torch


def forward_kl(teacher_logits: torch.Tensor, model_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || model) = sum_v p_t(v) (log p_t(v) - log p_m(v)), over the full vocabulary."""
    t = torch.log_softmax(teacher_logits.float(), -1)
    m = torch.log_softmax(model_logits.float(), -1)
    p = t.exp()
    return (p * (t - m)).masked_fill(p == 0, 0.0).sum(-1)  # 0 log 0 = 0: a teacher may rule a token out (-inf)


def reverse_kl(model_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(model || teacher): the forward KL with the roles swapped."""
    return forward_kl(model_logits, teacher_logits)


def renormalised(top_logprobs: torch.Tensor) -> torch.Tensor:
    """A teacher's top-k log-probabilities as a distribution over those k tokens alone."""
    return top_logprobs - torch.logsumexp(top_logprobs, -1, keepdim=True)


def topk_forward_kl(top_ids: torch.Tensor, top_logprobs: torch.Tensor, model_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher's renormalised top-k || model), when only the teacher's k likeliest tokens
    and their log-probabilities are known (an API teacher, or stored soft labels). The
    model keeps its full distribution: mass it puts outside the k tokens is not forgiven."""
    q = renormalised(top_logprobs.float())
    m = torch.log_softmax(model_logits.float(), -1).gather(-1, top_ids)
    return (q.exp() * (q - m)).sum(-1)


def sampled_reverse_kl(advantage, weight):
    """The one-sample reverse-KL estimate log p_model(x) - log p_teacher(x) at each sampled
    token x, read back from an on-policy datum's advantage = weight x (log p_teacher - log p_model)
    (the importance_sampling loss's inputs). Tensors or plain floats."""
    return -advantage / weight
