"""Fidelity: the KL math on known distributions, top-k renormalisation, and eval's fidelity
scores against an independent plain-transformers computation."""

import json
import math

import numpy as np
import pytest
import torch
from tiny import save_tiny, trained_tiny_run

from promptdistill import divergence
from promptdistill.pipeline import run_stage

SYSTEM = "You are a pirate captain of the seven seas. Answer briefly, with salt and swagger, always."


def test_kl_is_zero_for_identical_distributions_and_matches_a_hand_computed_case():
    logits = torch.randn(3, 7)
    assert torch.allclose(divergence.forward_kl(logits, logits), torch.zeros(3), atol=1e-6)
    p, q = torch.tensor([[0.5, 0.5]]).log(), torch.tensor([[0.9, 0.1]]).log()
    by_hand = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # 0.5108
    assert float(divergence.forward_kl(p, q)) == pytest.approx(by_hand, abs=1e-6)
    # reverse KL(model || teacher) with the model at q and the teacher at p: KL(q || p), another number
    assert float(divergence.reverse_kl(q, p)) == pytest.approx(0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5), abs=1e-6)
    shifted = p + 3.0  # logits, not probabilities: a constant shift changes nothing
    assert float(divergence.forward_kl(shifted, q)) == pytest.approx(by_hand, abs=1e-6)


def test_topk_kl_renormalises_the_teachers_top_tokens():
    # The teacher's top-2 of a 4-token vocabulary: 0.4 and 0.2 -> renormalised 2/3 and 1/3.
    top_ids = torch.tensor([[2, 0]])
    top_logprobs = torch.tensor([[0.4, 0.2]]).log()
    model = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).log()
    by_hand = (2 / 3) * math.log((2 / 3) / 0.3) + (1 / 3) * math.log((1 / 3) / 0.1)
    assert float(divergence.topk_forward_kl(top_ids, top_logprobs, model)) == pytest.approx(by_hand, abs=1e-6)
    assert torch.allclose(divergence.renormalised(top_logprobs).exp().sum(-1), torch.ones(1))


def independent_kl(model_dir, teacher_dir, adapter_dir, system, rows) -> dict[str, float]:
    """Mean forward KL(teacher WITH the prompt || student / base) per answer token, per row
    then averaged: whole prompts in plain forward passes, chat template applied by the tokenizer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    student = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(adapter_dir)).eval()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    out = {"student": [], "base": []}
    for r in rows:
        user = [{"role": "user", "content": r["query"]}]
        answer = tok(r["teacher"], add_special_tokens=False)["input_ids"] + [end]
        own = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        prompted = tok.apply_chat_template([{"role": "system", "content": system}] + user, add_generation_prompt=True,
                                           tokenize=False)
        own, prompted = (tok(t, add_special_tokens=False)["input_ids"] for t in (own, prompted))
        with torch.no_grad():
            t = torch.log_softmax(teacher(input_ids=torch.tensor([prompted + answer])).logits[0, len(prompted) - 1:-1], -1)
            for who, model in (("student", student), ("base", base)):
                m = torch.log_softmax(model(input_ids=torch.tensor([own + answer])).logits[0, len(own) - 1:-1], -1)
                out[who].append(float((t.exp() * (t - m)).sum(-1).mean()))
    return {who: float(np.mean(v)) for who, v in out.items()}


def test_eval_fidelity_equals_an_independent_computation(tmp_path):
    model, teacher = save_tiny(tmp_path / "s"), save_tiny(tmp_path / "t", seed=1)
    # fp32, as the independent computation: bf16 (dtype auto on a CPU with bf16 units) moves a
    # KL by about 1-4% (the demo's, measured), far beyond the 1e-4 this checks
    cfg, run = trained_tiny_run(tmp_path, model, 16, system_prompt=SYSTEM, teacher={"model": str(teacher), "dtype": "float32"},
                                student={"model": str(model), "dtype": "float32"},
                                eval={"classifier_train_size": 8, "latency_queries": 1, "bootstrap": 200})
    run_stage(cfg, "eval")
    summary = json.loads((run.root / "summary.json").read_text())
    rows = [json.loads(l) for l in (run.root / "eval.jsonl").read_text().splitlines()]
    f, on = summary["quality"]["fidelity"], summary["quality"]["on_policy_fidelity"]
    assert f["source"] == "full vocabulary" and f["ceiling"]["mean"] == 0.0 and f["n"] == len(rows) == 4
    mine = independent_kl(model, teacher, run.student, SYSTEM, rows)
    assert f["student"]["mean"] == pytest.approx(mine["student"], rel=1e-4)
    assert f["base"]["mean"] == pytest.approx(mine["base"], rel=1e-4)
    assert f["retained"]["mean"] == pytest.approx(1 - mine["student"] / mine["base"], rel=1e-3)
    assert on["base"]["mean"] > 0 and on["ceiling"]["ci95"] == [0.0, 0.0]
    for r in rows:  # per query, and where the student strays most
        assert r["fidelity_kl"]["student"] >= 0 and r["on_policy_kl"]["base"] >= 0
        worst = r["divergent_tokens"]
        assert 1 <= len(worst) <= 5 and all(w["kl"] >= 0 and isinstance(w["token"], str) for w in worst)
