"""The jsd objective: its divergence by hand on a three-token case, its gradient against autograd
through the JSD written in probabilities, its two ends against kl's and on_policy's losses, runs
of both forms on a tiny model, and a killed run resumed to the same adapter."""

import math

import pytest
import torch
from tiny import killed_and_resumed, save_pirate_tiny, save_tiny, trained_tiny_run

from promptdistill.backends.local import LocalTrainer
from promptdistill.objectives import jsd, kl, on_policy
from promptdistill.render import Datum, render_example, to_datum

SYSTEM = "You are a pirate captain of the seven seas. Answer briefly, with salt and swagger, always."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("jsd"))


def test_the_divergence_by_hand_on_three_tokens():
    # T = (1/2, 1/4, 1/4), S = (1/4, 1/2, 1/4). At beta 1/2, M = (3/8, 3/8, 1/4) and
    # KL(T || M) = KL(S || M) = 1/2 ln(4/3) + 1/4 ln(2/3) = 0.0424747...
    t, s = torch.tensor([[0.5, 0.25, 0.25]]).log(), torch.tensor([[0.25, 0.5, 0.25]]).log()
    # (computed in float32, as the loss is: equal to ~6 digits)
    assert float(jsd.generalized_jsd(s, t, 0.5)) == pytest.approx(0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3), rel=1e-5)
    # At beta 1/5, M = 1/5 T + 4/5 S = (0.3, 0.45, 0.25).
    by_hand = 0.2 * (0.5 * math.log(0.5 / 0.3) + 0.25 * math.log(0.25 / 0.45)) \
        + 0.8 * (0.25 * math.log(0.25 / 0.3) + 0.5 * math.log(0.5 / 0.45))
    assert float(jsd.generalized_jsd(s, t, 0.2)) == pytest.approx(by_hand, rel=1e-5)
    # Where the teacher rules a token out, the divergence stays finite (the KLs would not).
    ruled_out = torch.tensor([[0.5, 0.5, 0.0]]).log()
    assert math.isfinite(float(jsd.generalized_jsd(s, ruled_out, 0.5)))


def new_trainer(model_dir):
    return LocalTrainer(model_dir, rank=4, alpha=8, dropout=0.0, target_modules="all-linear", seed=0)


def judged(trainer, seed: int = 1) -> list[Datum]:
    """Two answers with a random teacher distribution at each answer token, weights summing to 1."""
    pairs = [("Where is the treasure?", "Under the palm, matey."), ("Hi", "Ahoy!")]
    examples = [render_example(trainer.tokenizer, [{"role": "user", "content": q}], a, f"e{i}") for i, (q, a) in enumerate(pairs)]
    total, g = sum(e.n_trainable for e in examples), torch.Generator().manual_seed(seed)
    return [Datum(d.input_tokens, d.target_tokens, d.weights,
                  teacher_logprobs=torch.log_softmax(2 * torch.randn(e.n_trainable, len(trainer.tokenizer), generator=g), -1))
            for e, d in ((e, to_datum(e, 1.0 / total)) for e in examples)]


def test_the_gradient_is_autograd_through_the_jsd_in_probabilities(model_dir):
    trainer = new_trainer(model_dir)
    with torch.no_grad():  # LoRA B starts at zero; give it weight so A gets a gradient too
        for p in trainer.params:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01)
    batch, beta = judged(trainer), 0.3
    ours = trainer.forward_backward(batch, jsd.GeneralizedJSD(beta))
    grads = [p.grad.clone() for p in trainer.params]
    trainer.optimizer.zero_grad(set_to_none=True)

    explicit = 0.0
    for d in batch:
        logits = trainer.model(input_ids=torch.tensor([d.input_tokens])).logits[0].double()
        positions = [i for i, w in enumerate(d.weights) if w > 0]
        s, t = torch.softmax(logits[positions], -1), d.teacher_logprobs.double().exp()
        m = beta * t + (1 - beta) * s
        per_token = beta * (t * (t / m).log()).sum(-1) + (1 - beta) * (s * (s / m).log()).sum(-1)
        explicit = explicit + (per_token * torch.tensor([d.weights[i] for i in positions])).sum()
    explicit.backward()
    assert ours.loss == pytest.approx(float(explicit), rel=1e-5)
    for a, p in zip(grads, trainer.params):
        assert torch.allclose(a, p.grad.float(), atol=1e-7, rtol=1e-4)


def test_its_ends_are_the_kl_and_on_policy_losses(model_dir):
    trainer = new_trainer(model_dir)
    batch = judged(trainer)
    forward_kl, reverse_kl = trainer.forward(batch, kl.FORWARD_KL), trainer.forward(batch, on_policy.REVERSE_KL)
    at_0, at_1 = trainer.forward(batch, jsd.GeneralizedJSD(0.0)), trainer.forward(batch, jsd.GeneralizedJSD(1.0))
    # beta 0: kl's loss, which here takes the output layer chunk by chunk (output_loss.py): equal up to rounding.
    assert at_0.loss == pytest.approx(forward_kl.loss, rel=1e-5) and at_0.nll_sum == pytest.approx(forward_kl.nll_sum, rel=1e-5)
    assert (at_1.loss, at_1.nll_sum, at_1.tokens) == (reverse_kl.loss, reverse_kl.nll_sum, reverse_kl.tokens)
    between = trainer.forward(batch, jsd.GeneralizedJSD(0.5))
    assert 0 < between.loss < min(forward_kl.loss, reverse_kl.loss)


@pytest.mark.parametrize("on_policy_form", [False, True])
def test_a_run_of_either_form_lowers_its_divergence(tmp_path, model_dir, on_policy_form):
    teacher = save_pirate_tiny(tmp_path / "teacher", SYSTEM)  # taught to answer as a pirate WITH the prompt: far from the student
    train = {"objective": "jsd", "jsd": {"beta": 0.5, "on_policy": on_policy_form}, "steps": 6, "batch_size": 4,
             "lr": 3e-2, "eval_every": 6, "on_policy": {"max_tokens": 6}}
    cfg, run = trained_tiny_run(tmp_path, model_dir, 16, system_prompt=SYSTEM, teacher={"model": str(teacher)}, train=train)
    assert cfg.train.options("jsd").on_policy is on_policy_form
    losses = [r["train_loss"] for r in map(__import__("json").loads, run.metrics.read_text().splitlines()) if "train_loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_a_killed_run_resumes_to_the_same_adapter(tmp_path, model_dir):
    a, b = killed_and_resumed(tmp_path, model_dir, SYSTEM, {"objective": "jsd", "jsd": {"beta": 0.5, "on_policy": True}})
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
