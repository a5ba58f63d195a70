"""The output layer and the loss chunk by chunk (backends/output_loss.py) against the plain
path: the whole [positions, vocab] logits, then the loss, differentiated by autograd."""

import pytest
import torch
import torch.nn.functional as F

from promptdistill import divergence
from promptdistill.backends import output_loss
from promptdistill.backends.local import LocalTrainer
from promptdistill.loss import CROSS_ENTROPY
from promptdistill.objectives.kl import FORWARD_KL
from promptdistill.render import Datum, render_example, to_datum

from tiny import save_tiny


@pytest.fixture()
def small_chunks(monkeypatch):
    monkeypatch.setattr(output_loss, "CHUNK", 4)  # 10 positions: chunks of 4, 4 and 2


def case():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 8, generator=g)
    weight = torch.randn(50, 8, generator=g)
    teacher = 3 * torch.randn(10, 50, generator=g)
    teacher[0, :10] = float("-inf")  # tokens the teacher rules out: 0 log 0 = 0, no nan
    teacher = torch.log_softmax(teacher, -1)
    ids = torch.randint(0, 50, (10,), generator=g)
    weights = torch.rand(10, generator=g)  # the incoming gradient differs by position
    return hidden, weight, teacher, ids, weights


@pytest.mark.parametrize("kind", ["forward_kl", "nll"])
def test_chunked_loss_has_the_plain_value_and_gradient(small_chunks, kind):
    hidden, weight, teacher, ids, weights = case()
    ours = hidden.clone().requires_grad_()
    per_token = (output_loss.forward_kl(ours, weight, teacher) if kind == "forward_kl"
                 else output_loss.token_nll(ours, weight, ids))
    (per_token * weights).sum().backward()
    plain = hidden.double().requires_grad_()
    logits = F.linear(plain, weight.double())
    expected = (divergence.forward_kl(teacher.double(), logits) if kind == "forward_kl"
                else F.cross_entropy(logits, ids, reduction="none"))
    (expected * weights.double()).sum().backward()
    assert torch.allclose(per_token.double(), expected.detach().double(), atol=1e-5)
    assert torch.allclose(ours.grad.double(), plain.grad.double(), atol=1e-5)
    with torch.no_grad():  # validation: the same values, no gradient computed
        again = (output_loss.forward_kl(hidden, weight, teacher) if kind == "forward_kl"
                 else output_loss.token_nll(hidden, weight, ids))
    assert torch.equal(again, per_token.detach())


def test_the_trainer_takes_the_same_step_chunked_or_plain(tmp_path, small_chunks):
    """A LoRA trainer's losses and LoRA gradients, sft and kl (the teacher's whole distribution),
    with the output layer chunked and with the plain path, on the tiny model in fp32."""
    model_dir = save_tiny(tmp_path)
    results = []
    for fused in (True, False):
        t = LocalTrainer(model_dir, rank=4, alpha=8, dropout=0.0, target_modules="all-linear", seed=0)
        assert t.scorer.fused  # a tied, frozen output layer: the chunked path applies
        t.scorer.fused = fused
        with torch.no_grad():  # LoRA B starts at zero; give it weight so A gets a gradient too
            for p in t.params:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01)
        pairs = [("Where is the gold?", "Under the old oak, matey."), ("Hi", "Ahoy!")]
        exs = [render_example(t.tokenizer, [{"role": "user", "content": q}], a, f"e{i}") for i, (q, a) in enumerate(pairs)]
        total = sum(e.n_trainable for e in exs)
        sft = [to_datum(e, 1.0 / total) for e in exs]
        g = torch.Generator().manual_seed(1)
        kl = [Datum(d.input_tokens, d.target_tokens, d.weights,
                    teacher_logprobs=torch.log_softmax(torch.randn(sum(w > 0 for w in d.weights), len(t.tokenizer), generator=g), -1))
              for d in sft]
        out = []
        for batch, loss in ((sft, CROSS_ENTROPY), (kl, FORWARD_KL)):
            r = t.forward_backward(batch, loss)
            out.append((r.loss, r.nll_sum, r.tokens, torch.cat([p.grad.flatten() for p in t.params])))
            t.optimizer.zero_grad(set_to_none=True)
            out.append(t.forward(batch, loss).loss)
        results.append(out)
    for ours, plain in zip(*results):
        if isinstance(ours, float):
            assert ours == pytest.approx(plain, rel=1e-6)
            continue
        assert ours[:3] == pytest.approx(plain[:3], rel=1e-6)
        assert torch.allclose(ours[3], plain[3], atol=1e-7)
        assert ours[3].abs().max() > 1e-4  # a gradient to compare
