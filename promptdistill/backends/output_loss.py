"""The output layer and the loss together, a few positions at a time.

A training step's loss needs the model's log-softmax over the whole vocabulary at every
answer position: on a 49k vocabulary and a batch of ~700 answer tokens one such
[positions, vocab] tensor is ~140 MB in fp32, and the plain path makes several (the logits,
their fp32 copy, the log-softmax, the teacher's probabilities, the gradient) and keeps some
for the backward. Each is a fresh allocation the kernel must page in. Here the output layer
runs CHUNK positions at a time: the logits of those positions, their loss, and at once their
gradient with respect to the hidden states (the loss's gradient in the logits is closed-form,
softmax - target), projected back through the output weight. The backward only scales that
small [positions, hidden] tensor by the incoming gradient. Nothing vocabulary-wide outlives a
chunk. This is the "fused linear cross-entropy" of Liger-Kernel and Apple's cut-cross-entropy,
written plainly.

Only for an output layer that is a plain frozen `nn.Linear` without bias or softcapping (the
trained LoRA never touches it); `fusable` says so, and the trainer otherwise takes the plain path.
"""

from __future__ import annotations

import torch

CHUNK = 128  # positions per pass: [128, 49152] in fp32 is 25 MB (glibc keeps blocks under 32 MB on its heap)


def fusable(output, softcap) -> bool:
    return (type(output) is torch.nn.Linear and output.bias is None and not output.weight.requires_grad
            and not softcap)


class _OutputLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
        want_grad = ctx.needs_input_grad[0]
        losses = torch.empty(len(hidden), device=hidden.device)
        grad_hidden = torch.empty(hidden.shape, device=hidden.device) if want_grad else None
        for a in range(0, len(hidden), CHUNK):
            b = a + CHUNK
            logq = torch.log_softmax(torch.nn.functional.linear(hidden[a:b], weight).float(), -1)
            if kind == "nll":  # target: token ids [positions]
                ids = target[a:b, None]
                losses[a:b] = -logq.gather(-1, ids).squeeze(-1)
                if want_grad:
                    g = logq.exp_().scatter_add_(-1, ids, torch.full(ids.shape, -1.0, device=ids.device))
            else:  # forward_kl; target: log-probabilities [positions, vocab], -inf where a token is ruled out
                t = target[a:b].float()
                p = t.exp()
                losses[a:b] = torch.where(p > 0, p * t, 0.0).sum(-1) - (p * logq).sum(-1)
                if want_grad:  # d KL / d logits = softmax(logits) * sum(p) - p   (sum(p) is 1 up to rounding)
                    g = logq.exp_().mul_(p.sum(-1, keepdim=True)).sub_(p)
            if want_grad:
                grad_hidden[a:b] = g.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_hidden)
        ctx.hidden_dtype = hidden.dtype
        return losses

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return (grad_hidden * grad[:, None]).to(ctx.hidden_dtype), None, None, None


def token_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target) at each position, p = softmax(hidden @ weight.T): F.cross_entropy of the
    output layer's logits, chunk by chunk."""
    return _OutputLoss.apply(hidden, weight, targets, "nll")


def forward_kl(hidden: torch.Tensor, weight: torch.Tensor, target_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(hidden @ weight.T)) at each position: divergence.forward_kl with the
    target given as log-probabilities, chunk by chunk."""
    return _OutputLoss.apply(hidden, weight, target_logprobs, "forward_kl")
