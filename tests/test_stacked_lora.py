"""Per-row adapters (StackedLora): a batch whose rows go through different LoRA adapters of one
tiny base, of different ranks, target modules and scalings, and rows through none, must give
each row what peft's plain forward gives it alone with its own adapter active."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_local_backend import conversations
from tiny import tiny_model, tiny_tokenizer

from promptdistill.backends.base import SamplingParams
from promptdistill.backends.local_model import peft_wrapping
from promptdistill.backends.local_sampler import LocalSampler
from promptdistill.backends.stacked_lora import StackedLora
from promptdistill.render import prompt_ids

# Different ranks (the stack pads to the largest), target modules (a layer an adapter lacks adds
# nothing there) and scalings (rslora's alpha / sqrt(r)).
ADAPTERS = {
    "default": LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    "narrow": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_rslora=True),
    "wide": LoraConfig(r=8, lora_alpha=4, target_modules=["gate_proj", "up_proj", "down_proj", "o_proj"]),
}
ROWS = ["narrow", None, "default", "wide", "narrow", "wide"]  # None: the base model, the teacher


@pytest.fixture(scope="module")
def sampler() -> LocalSampler:
    tok = tiny_tokenizer("chatml")
    with peft_wrapping():
        model = get_peft_model(tiny_model(tok), ADAPTERS["default"])
        for name, config in list(ADAPTERS.items())[1:]:
            model.add_adapter(name, config)
    torch.manual_seed(0)
    with torch.no_grad():  # trained-looking adapters: B away from its zero start
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    model.eval()
    return LocalSampler(model, tok, batch_size=len(ROWS))


def alone(model, name: str | None):
    """The model with `name` the active adapter (peft's plain LoRA forward), or no adapter."""
    if name is None:
        return model.disable_adapter()
    model.set_adapter(name)
    return torch.no_grad()


def test_a_mixed_batch_gives_each_row_its_own_adapters_logits(sampler):
    model = sampler.model
    ids = torch.randint(3, len(sampler.tokenizer), (len(ROWS), 11), generator=torch.Generator().manual_seed(1))
    stacked = StackedLora(model)
    assert stacked.rank == 8
    with torch.no_grad(), stacked.per_row(ROWS):
        together = model(input_ids=ids).logits
    for i, name in enumerate(ROWS):
        with alone(model, name):
            own = model(input_ids=ids[i:i + 1]).logits[0]
        with alone(model, None):
            base = model(input_ids=ids[i:i + 1]).logits[0]
        assert torch.allclose(together[i], own, atol=1e-5), name
        assert name is None or not torch.allclose(own, base, atol=1e-2), name  # the adapter changes the row
    model.set_adapter("default")


def test_generate_decodes_each_row_as_it_decodes_alone(sampler):
    """Greedy, with finished rows leaving and the prompt's common prefix shared when every row
    has one adapter: each row's tokens and top log-probabilities are those of its adapter alone."""
    model, tok = sampler.model, sampler.tokenizer
    params = SamplingParams(temperature=0, max_tokens=10, top_logprobs=3)
    convs = (conversations() * 2)[:len(ROWS)]
    prompts = [prompt_ids(tok, c) for c in convs]
    cases = [ROWS, ["wide"] * len(ROWS), [None] * len(ROWS)]  # the last two share the system prompt's KV
    for names in cases:
        together = sampler.generate(prompts, params, seeds=[0] * len(ROWS), adapters=names)
        for i, name in enumerate(names):
            sampler.forget_prefix()  # a prefix cached alone went through the adapter active then
            with alone(model, name):
                [own] = sampler.generate(prompts[i:i + 1], params, seeds=[0])
            assert together[i].token_ids == own.token_ids, (names, i)
            got = [lp for entry in together[i].logprobs for lp in [entry["logprob"], *[t[2] for t in entry["top"]]]]
            want = [lp for entry in own.logprobs for lp in [entry["logprob"], *[t[2] for t in entry["top"]]]]
            assert got == pytest.approx(want, abs=1e-4)
    model.set_adapter("default")


def test_unknown_adapters_are_refused_and_a_new_one_is_stacked_once_the_sampler_is_told(sampler):
    model = sampler.model
    prompts = [prompt_ids(sampler.tokenizer, c) for c in conversations()[:2]]
    params = SamplingParams(temperature=0, max_tokens=3)
    sampler.generate(prompts, params, seeds=[0, 0], adapters=["wide", "narrow"])
    with peft_wrapping():
        model.add_adapter("late", LoraConfig(r=3, lora_alpha=3, target_modules=["k_proj"]))
    with pytest.raises(ValueError, match="late"):
        sampler.generate(prompts, params, seeds=[0, 0], adapters=["late", "wide"])
    sampler.adapters_changed()
    try:
        assert len(sampler.generate(prompts, params, seeds=[0, 0], adapters=["late", "wide"])) == 2
    finally:
        model.delete_adapter("late")
        sampler.adapters_changed()
