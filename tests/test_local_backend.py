"""The local backend on tiny models built in-process: the optimised paths (shared prefix
cache, rows leaving the batch, output layer only at answer positions) must give the
same results as plain transformers."""

import contextlib

import pytest
import torch
from tiny import save_tiny, tiny_model, tiny_tokenizer

from promptdistill.backends.base import SamplingParams
from promptdistill.backends.local_attention import JOINED_KEYS_WIDTH, MIN_SHARED_PREFIX, common_prefix_len
from promptdistill.backends.local import LocalTrainer
from promptdistill.backends.local_model import lora_at_base_precision, lora_merged
from promptdistill.backends.local_sampler import LocalSampler
from promptdistill.render import prompt_ids, render_example, to_datum

SYSTEM = "You are a pirate captain of the seven seas. Answer briefly, with salt and swagger, always."
QUERIES = ["Hi", "Where is the treasure buried, captain?", "Why?", "Tell me a long story about the sea and the wind."]


def conversations(system: str | None = SYSTEM) -> list[list[dict]]:
    head = [{"role": "system", "content": system}] if system else []
    return [head + [{"role": "user", "content": q}] for q in QUERIES]


@pytest.fixture(scope="module")
def sampler():
    tok = tiny_tokenizer("chatml")
    return LocalSampler(tiny_model(tok), tok, batch_size=4)


@pytest.mark.parametrize("system", [SYSTEM, None])
def test_greedy_batch_equals_transformers_generate(sampler, system):
    convs = conversations(system)
    got = sampler.sample(convs, SamplingParams(temperature=0, max_tokens=12), seeds=[0] * len(convs))
    if system:
        assert sampler.shares_prefix and sampler._prefix is not None  # the system prompt's KV was computed once
    for conv, completion in zip(convs, got):
        ids = torch.tensor([prompt_ids(sampler.tokenizer, conv)])
        ref = sampler.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                     eos_token_id=sampler.stop_ids, pad_token_id=sampler.pad_id)
        assert completion.token_ids == ref[0, ids.shape[1]:].tolist()
        assert completion.prompt_tokens == ids.shape[1]


def test_a_carried_on_conversation_decodes_what_a_plain_forward_gives(sampler):
    """Each row brings a history far longer than JOINED_KEYS_WIDTH after the shared system
    prompt: its prefill goes through the prefix joined to its keys, its decoding through the
    split form."""
    def chat(first: str, *later: str) -> list[dict]:
        turns = [{"role": "user", "content": first}, {"role": "assistant", "content": "Arr, the wind blew " * 6}]
        for i, q in enumerate(later):
            turns += [{"role": "user", "content": q}, {"role": "assistant", "content": "Under the old oak. " * i}]
        return [{"role": "system", "content": SYSTEM}, *turns[:-1]]

    convs = [chat(QUERIES[3], QUERIES[1], "Why?"), chat(QUERIES[1], "And then?"), chat("Hi", QUERIES[3])]
    prompts = [prompt_ids(sampler.tokenizer, c) for c in convs]
    shared = common_prefix_len(prompts)
    assert shared >= MIN_SHARED_PREFIX and min(len(p) for p in prompts) - shared > JOINED_KEYS_WIDTH
    got = sampler.sample(convs, SamplingParams(temperature=0, max_tokens=12, top_logprobs=0), seeds=[0] * len(convs))
    for prompt, completion in zip(prompts, got):
        ids = torch.tensor([prompt + completion.token_ids])
        with torch.no_grad():  # every position's log-probabilities, the whole row in one plain forward
            logp = torch.log_softmax(sampler.model(ids).logits[0, len(prompt) - 1:-1].float(), -1)
        assert completion.token_ids == logp.argmax(-1).tolist()
        want = logp.gather(-1, torch.tensor(completion.token_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor([e["logprob"] for e in completion.logprobs]), want, atol=1e-5, rtol=0)


def test_shared_prefix_attention_samples_what_per_row_prompts_sample(sampler):
    """Sampling (not only greedy) with the prefix stored once must draw the same tokens as
    with every row carrying its whole prompt: same logits, same seeded draws."""
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, repetition_penalty=1.2)
    convs = conversations()
    shared = sampler.sample(convs, params, seeds=[1, 2, 3, 4])
    sampler.shares_prefix = False
    try:
        plain = sampler.sample(convs, params, seeds=[1, 2, 3, 4])
    finally:
        sampler.shares_prefix = True
    assert [c.token_ids for c in shared] == [c.token_ids for c in plain]


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    from promptdistill.backends import local_sampler as local

    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]])
    kept, ids = local.nucleus(probs, top_p=0.75)
    assert ids[0, :2].tolist() == [0, 1] and torch.allclose(kept[0], torch.tensor([0.5, 0.3, 0.0, 0.0]))
    assert ids[1, :3].tolist() == [3, 2, 1] and torch.allclose(kept[1], torch.tensor([0.4, 0.3, 0.2, 0.0]))
    flat = torch.full((1, 3000), 1 / 3000)  # nucleus wider than the top-k candidates: the full sort decides
    kept, _ = local.nucleus(flat, top_p=0.9)
    assert abs(int((kept > 0).sum()) - 2700) <= 1  # float32 cumsum may move the edge by one


def plain_choose_tokens(logits, seen, params, generators):
    """The sampling step written plainly, as the reference: the penalty over the whole
    vocabulary, the nucleus from a full sort of every row."""
    p = params.repetition_penalty
    logits = torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)
    probs, ids = torch.softmax(logits / params.temperature, -1).sort(-1, descending=True)
    kept = probs.masked_fill(probs.cumsum(-1) - probs > params.top_p, 0.0)
    cdf = kept.cumsum(-1)
    u = torch.stack([torch.rand((), generator=g) for g in generators]) * cdf[:, -1]
    return ids.gather(-1, torch.searchsorted(cdf, u[:, None]).clamp(max=cdf.shape[-1] - 1)).squeeze(-1)


def test_sampling_step_draws_what_the_plain_full_sort_draws():
    """choose_tokens cuts rows at their top 64, widens the few whose nucleus is wider (to 1024,
    then a full sort) and penalises only the tokens a row produced: the same draws as the plain
    form, over rows from peaked to flat (nuclei of a few tokens to thousands)."""
    from promptdistill.backends import local_sampler as local

    torch.manual_seed(0)
    vocab, rows = 5000, 48
    spread = torch.logspace(-1, 1.3, rows)[:, None]  # logit scale per row: 0.1 (flat) to 20 (peaked)
    logits = torch.randn(rows, vocab) * spread
    seen = torch.rand(rows, vocab) < 0.01
    params = SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.15)
    widths = (local.nucleus(torch.softmax(logits / 0.7, -1), 0.9)[0] > 0).sum(-1)
    assert widths.min() <= 8 and ((widths > 64) & (widths <= 1024)).any() and widths.max() > 1024
    for draw in range(20):
        gens = lambda: [torch.Generator().manual_seed(1000 * draw + r) for r in range(rows)]
        assert torch.equal(local.choose_tokens(logits, seen, params, gens()), plain_choose_tokens(logits, seen, params, gens()))
    p = params.repetition_penalty
    assert torch.equal(local.penalise_repeats(logits, seen, p), torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits))


def test_a_row_answer_does_not_depend_on_its_batch(sampler):
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=10, repetition_penalty=1.2)
    convs = conversations()
    together = sampler.sample(convs, params, seeds=[11, 12, 13, 14])
    alone = sampler.sample(convs[1:2], params, seeds=[12])
    assert together[1].token_ids == alone[0].token_ids
    other_seed = sampler.sample(convs[1:2], params, seeds=[99])
    assert other_seed[0].token_ids != alone[0].token_ids


def test_max_tokens_truncates_with_finish_reason_length(sampler):
    out = sampler.sample(conversations()[:1], SamplingParams(temperature=0, max_tokens=3), seeds=[0])
    assert out[0].completion_tokens == 3 and out[0].finish_reason == "length"


def test_rows_stop_at_the_end_of_turn_token(sampler):
    """Force the end-of-turn token to be the model's favourite: every row stops after one token."""
    stop = sampler.stop_ids[0]
    bias = torch.zeros(sampler.model.config.vocab_size)
    bias[stop] = 100.0
    handle = sampler.model.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    try:
        out = sampler.sample(conversations(), SamplingParams(temperature=0, max_tokens=8), seeds=[0] * 4)
    finally:
        handle.remove()
    assert all(c.finish_reason == "stop" and c.token_ids == [stop] and c.text == "" for c in out)


@pytest.fixture()
def trainer(tmp_path):
    return LocalTrainer(save_tiny(tmp_path), rank=4, alpha=8, dropout=0.0, target_modules="all-linear", seed=0)


def examples(tokenizer) -> list:
    pairs = [("Where is the gold?", "Under the old oak, matey."), ("Who are you?", "Captain Redbeard, scourge of the sea!"),
             ("Hi", "Ahoy!")]
    return [render_example(tokenizer, [{"role": "user", "content": q}], a, f"e{i}") for i, (q, a) in enumerate(pairs)]


def test_answer_only_loss_equals_transformers_masked_loss(trainer):
    exs = examples(trainer.tokenizer)
    total = sum(e.n_trainable for e in exs)
    ours = trainer.forward([to_datum(e, 1.0 / total) for e in exs])
    nll = 0.0
    for e in exs:  # plain transformers, one example at a time, labels -100 outside the answer
        ids = torch.tensor([e.tokens])
        labels = torch.tensor([[t if m else -100 for t, m in zip(e.tokens, e.mask)]])
        with torch.no_grad():
            out = trainer.model(input_ids=ids, labels=labels)
        nll += float(out.loss) * sum(e.mask[1:])
    assert ours.tokens == total
    assert ours.loss == pytest.approx(nll / total, rel=1e-5)
    assert ours.nll_sum == pytest.approx(nll, rel=1e-5)


def test_micro_batches_accumulate_the_same_gradient(tmp_path):
    model_dir = save_tiny(tmp_path)
    grads = []
    for groups in ([[0, 1, 2]], [[0], [1, 2]]):
        t = LocalTrainer(model_dir, rank=4, alpha=8, dropout=0.0, target_modules="all-linear", seed=0)
        with torch.no_grad():  # LoRA B starts at zero; give it weight so A gets a gradient too
            for p in t.params:
                p.add_(torch.randn_like(p) * 0.01)
        exs = examples(t.tokenizer)
        total = sum(e.n_trainable for e in exs)
        for g in groups:
            t.forward_backward([to_datum(exs[i], 1.0 / total) for i in g])
        grads.append(torch.cat([p.grad.flatten() for p in t.params]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_training_lowers_the_loss_and_state_resumes_exactly(trainer, tmp_path):
    exs = examples(trainer.tokenizer)
    total = sum(e.n_trainable for e in exs)
    batch = [to_datum(e, 1.0 / total) for e in exs]
    start = trainer.forward(batch).loss
    for _ in range(30):
        trainer.forward_backward(batch)
        trainer.optim_step(lr=1e-2)
    assert trainer.forward(batch).loss < start - 0.5
    trainer.save_state(tmp_path / "ckpt")
    trainer.forward_backward(batch)
    trainer.optim_step(lr=1e-2)
    expected = trainer.forward(batch).loss
    resumed = LocalTrainer(save_tiny(tmp_path), rank=4, alpha=8, dropout=0.0, target_modules="all-linear", seed=0)
    resumed.load_state(tmp_path / "ckpt")
    resumed.forward_backward(batch)
    resumed.optim_step(lr=1e-2)
    assert resumed.forward(batch).loss == pytest.approx(expected, rel=1e-6)
    assert (tmp_path / "ckpt" / "adapter_config.json").is_file()


def test_sampler_from_trainer_uses_the_trained_weights(trainer):
    conv = conversations()[:1]
    before = trainer.sampler().sample(conv, SamplingParams(temperature=0, max_tokens=6), seeds=[0])[0].token_ids
    with torch.no_grad():
        for p in trainer.params:
            p.add_(torch.randn_like(p))
    after = trainer.sampler().sample(conv, SamplingParams(temperature=0, max_tokens=6), seeds=[0])[0].token_ids
    assert before != after


def test_merged_lora_decodes_what_the_adapter_path_decodes_and_restores_the_weights(trainer):
    """on_policy samples through lora_merged: the same logits and tokens as peft's adapter path,
    the base weights bit-identical afterwards, and nothing merged while the adapter is off."""
    with torch.no_grad():  # a trained-looking adapter: B away from its zero start
        for p in trainer.params:
            p.add_(torch.randn_like(p) * 0.05)
    model, convs = trainer.model, conversations()
    base = {n: t.clone() for n, t in model.named_parameters() if "lora_" not in n}
    ids = torch.tensor([prompt_ids(trainer.tokenizer, convs[1])])
    with torch.no_grad():
        adapter_path = model(input_ids=ids).logits
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits
        with lora_merged(model):
            merged = model(input_ids=ids).logits
        with model.disable_adapter(), lora_merged(model):
            off = model(input_ids=ids).logits
    assert not torch.allclose(adapter_path, base_logits, atol=1e-3)  # the adapter changes the answer
    assert torch.allclose(merged, adapter_path, atol=1e-5)
    assert torch.equal(off, base_logits)
    assert all(torch.equal(t, base[n]) for n, t in model.named_parameters() if "lora_" not in n)
    greedy = SamplingParams(temperature=0, max_tokens=12)
    plain = LocalSampler(model, trainer.tokenizer, batch_size=4).sample(convs, greedy, seeds=[0] * len(convs))
    fast = trainer.sampler()
    assert fast.merge_lora
    assert [c.token_ids for c in fast.sample(convs, greedy, seeds=[0] * len(convs))] == [c.token_ids for c in plain]
    assert all(torch.equal(t, base[n]) for n, t in model.named_parameters() if "lora_" not in n)


def test_per_example_scores_do_not_depend_on_batching(trainer):
    from promptdistill.backends.local_scorer import AnswerScorer

    scorer = AnswerScorer(trainer.model)
    datums = [to_datum(e) for e in examples(trainer.tokenizer)]
    together = scorer.per_example(datums)
    alone = [scorer.per_example([d])[0] for d in datums]
    assert [n for _, n in together] == [n for _, n in alone] == [sum(d.weights) for d in datums]
    for (a, _), (b, _) in zip(together, alone):
        assert a == pytest.approx(b, rel=1e-5)


def test_dtype_auto_is_bf16_only_where_the_cpu_multiplies_it(monkeypatch):
    from promptdistill.backends import local_model as local

    cpu = torch.device("cpu")
    for units, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(local, "cpu_has_bf16_units", lambda: units)
        assert local.pick_dtype("auto", cpu) == expected
        assert local.pick_dtype("float32", cpu) == torch.float32 and local.pick_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="float16"):
        local.pick_dtype("float16", cpu)


def test_a_bf16_trainer_keeps_lora_and_losses_in_fp32_and_learns_what_fp32_learns(tmp_path):
    """bf16 base weights (dtype auto on a CPU with bf16 units): the LoRA weights, their
    gradients and AdamW's state stay fp32, the loss is fp32's within bf16's rounding, and three
    steps move the loss as fp32's do. Decoding with the adapter merged puts the bf16 base
    weights back bit for bit."""
    model_dir = save_tiny(tmp_path)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        trainer = LocalTrainer(model_dir, rank=4, alpha=8, dropout=0.0, target_modules="all-linear", dtype=dtype, seed=0)
        exs = examples(trainer.tokenizer)
        batch = [to_datum(e, 1.0 / sum(x.n_trainable for x in exs)) for e in exs]
        losses = []
        for _ in range(3):
            losses.append(trainer.forward_backward(batch).loss)
            trainer.optim_step(1e-2)
        losses.append(trainer.forward(batch).loss)
        runs[dtype] = (trainer, losses)
    trainer, bf16 = runs["bfloat16"]
    assert {p.dtype for p in trainer.params} == {torch.float32}
    assert {s["exp_avg"].dtype for s in trainer.optimizer.state.values()} == {torch.float32}
    assert next(p for n, p in trainer.model.named_parameters() if "lora_" not in n).dtype == torch.bfloat16
    fp32 = runs["float32"][1]
    assert bf16 == pytest.approx(fp32, rel=2e-2)
    assert bf16[-1] < bf16[0] - 0.5 * (fp32[0] - fp32[-1])  # it learns, about as much
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    sampler = trainer.sampler()
    sampler.sample([[{"role": "user", "content": "Where is the gold?"}]], SamplingParams(temperature=0, max_tokens=4), [0])
    assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_lora_at_base_precision_rounds_no_worse_than_peft_and_leaves_the_base_bit_for_bit(tmp_path):
    """Over bf16 weights the scorer runs LoRA's matmuls in bf16 (lora_at_base_precision): the
    student's hidden states are then as close to an fp32 model's (same weights) as peft's own
    fp32-adapter path gets; with the adapter off, and over fp32 weights, nothing changes at all."""
    model_dir = save_tiny(tmp_path)
    made = {dtype: LocalTrainer(model_dir, rank=4, alpha=8, dropout=0.0, target_modules="all-linear", dtype=dtype, seed=0)
            for dtype in ("float32", "bfloat16")}
    lora = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.05
            for i, (n, p) in enumerate(made["float32"].model.named_parameters()) if "lora_" in n}
    ids = torch.tensor([prompt_ids(made["float32"].tokenizer, c) for c in conversations()[:1]] * 3)

    def hidden(trainer, lowered: bool, adapter: bool = True) -> torch.Tensor:
        with (contextlib.nullcontext() if adapter else trainer.model.disable_adapter()), \
                (lora_at_base_precision(trainer.model) if lowered else contextlib.nullcontext()):
            return trainer.scorer.parts.decoder(input_ids=ids).last_hidden_state.float()

    with torch.no_grad():
        for trainer in made.values():
            for n, p in trainer.model.named_parameters():
                if n in lora:
                    p.copy_(lora[n])
        exact, bf16 = made["float32"], made["bfloat16"]
        assert torch.equal(hidden(exact, True), hidden(exact, False))
        assert torch.equal(hidden(bf16, True, adapter=False), hidden(bf16, False, adapter=False))
        reference = hidden(exact, False)
        off = {lowered: float((hidden(bf16, lowered) - reference).norm() / reference.norm()) for lowered in (False, True)}
        delta = float((reference - hidden(exact, False, adapter=False)).norm() / reference.norm())
    assert delta > 10 * off[False]  # the adapter moves the states far more than bf16 rounds them
    assert off[True] < 1.5 * off[False]


def test_the_sampler_gives_the_frozen_output_layer_two_dimensional_states(trainer):
    """A peft-wrapped model's output weight is frozen, and torch's matmul serves a frozen
    weight against a strided [rows, 1, hidden] view (transformers' logits_to_keep=1 after a
    prefill) by copying the weight once per row (5.2 GB for a 96-row prefill of SmolLM2). The
    sampler hands the output layer each row's last state as a 2-D tensor instead."""
    output = trainer.model.get_output_embeddings()
    assert not output.weight.requires_grad
    shapes = []
    handle = output.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    try:
        out = trainer.sampler().sample(conversations(), SamplingParams(temperature=0, max_tokens=3), seeds=[0] * 4)
    finally:
        handle.remove()
    assert len(shapes) >= 2 and all(len(s) == 2 and s[0] <= 4 for s in shapes)  # the prefill, then each step
    assert all(c.completion_tokens >= 1 for c in out)
