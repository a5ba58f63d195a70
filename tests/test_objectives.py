"""The distribution-level objectives on tiny models: the kl loss is the soft cross-entropy
computed by hand, its gradient is that of an explicit KL, on_policy lowers the reverse KL
to a fixed teacher, and runs of both resume exactly after a kill."""

import json

import pytest
import torch
from transformers import AutoTokenizer
from tiny import killed_and_resumed, save_tiny, trained_tiny_run

from promptdistill import divergence
from promptdistill.backends.local import LocalTrainer
from promptdistill.objectives import kl as kl_objective
from promptdistill.objectives import on_policy
from promptdistill.objectives.step import answer_tokens
from promptdistill.render import render_example
from promptdistill.stages.train import load_split, render_all, step_datums, step_examples

SYSTEM = "You are a pirate captain of the seven seas. Answer briefly, with salt and swagger, always."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("obj"))


def new_trainer(model_dir, seed=0):
    return LocalTrainer(model_dir, rank=4, alpha=8, dropout=0.0, target_modules="all-linear", seed=seed)


def example(trainer, query="Where is the treasure?", answer="Under the palm, matey."):
    return render_example(trainer.tokenizer, [{"role": "user", "content": query}], answer, "q1")


def test_kl_loss_is_the_soft_cross_entropy_by_hand(model_dir):
    trainer = new_trainer(model_dir)
    e = example(trainer)
    n, k = e.n_trainable, 5
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(trainer.tokenizer), (n, k), generator=gen)
    logprobs = torch.log_softmax(torch.randn(n, k, generator=gen), -1) - 0.3  # not normalised: renormalised inside
    datum = kl_objective.soft_datum(e, ids, logprobs, weight=0.5, sft_weight=0.0)
    got = trainer.forward([datum]).loss

    with torch.no_grad():  # by hand: the model's log-probabilities at the answer positions
        logits = trainer.model(input_ids=torch.tensor([e.tokens[:-1]])).logits[0]
    positions = [i for i, m in enumerate(e.mask[1:]) if m]
    logp = torch.log_softmax(logits[positions].double(), -1)
    q = torch.softmax(logprobs.double(), -1)
    expected = 0.5 * -(q * logp.gather(-1, ids)).sum()
    assert got == pytest.approx(float(expected), rel=1e-5)


def test_kl_gradient_equals_autograd_through_an_explicit_kl(model_dir):
    trainer = new_trainer(model_dir)
    e = example(trainer)
    n, vocab = e.n_trainable, len(trainer.tokenizer)
    teacher_logp = torch.log_softmax(torch.randn(n, vocab, generator=torch.Generator().manual_seed(1)), -1)
    top_lp, top_ids = teacher_logp.topk(vocab)  # every token: the soft CE is then KL(teacher || student) + const
    trainer.forward_backward([kl_objective.soft_datum(e, top_ids, top_lp, weight=1.0, sft_weight=0.0)])
    ours = [p.grad.clone() for p in trainer.params]
    trainer.optimizer.zero_grad(set_to_none=True)

    logits = trainer.model(input_ids=torch.tensor([e.tokens[:-1]])).logits[0]
    positions = [i for i, m in enumerate(e.mask[1:]) if m]
    explicit = divergence.forward_kl(teacher_logp, logits[positions]).sum()
    explicit.backward()
    for a, p in zip(ours, trainer.params):
        assert torch.allclose(a, p.grad, atol=1e-6, rtol=1e-4)


def test_kl_with_rest_is_the_forward_kl_over_the_top_k_and_one_bin_for_the_rest(model_dir):
    # The local trainer's top-k loss: the teacher's k tokens at their own probabilities and one
    # more bin, every other token together. Loss and gradient against the explicit k+1-bin KL.
    trainer = new_trainer(model_dir)
    e = example(trainer)
    n, k = e.n_trainable, 5
    teacher_logp = torch.log_softmax(2 * torch.randn(n, len(trainer.tokenizer), generator=torch.Generator().manual_seed(2)), -1)
    top_lp, top_ids = teacher_logp.topk(k)
    datum = kl_objective.soft_datum(e, top_ids, top_lp, weight=0.5, sft_weight=0.0, rest=True)
    assert sum(row[-1] == -1 for row in datum.target_tokens) == n  # one rest bin per answer position
    result = trainer.forward_backward([datum], kl_objective.REST)
    ours = [p.grad.clone() for p in trainer.params]
    trainer.optimizer.zero_grad(set_to_none=True)

    logits = trainer.model(input_ids=torch.tensor([e.tokens[:-1]])).logits[0]
    positions = [i for i, m in enumerate(e.mask[1:]) if m]
    student = torch.log_softmax(logits[positions].double(), -1)
    p_top, q_top = top_lp.double().exp(), student.gather(-1, top_ids).exp()
    p_bins = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
    q_bins = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    cross_entropy = -(p_bins * q_bins.log()).sum()
    assert result.loss == pytest.approx(0.5 * float(cross_entropy), rel=1e-5)
    binned_kl = (p_bins * (p_bins.log() - q_bins.log())).sum()  # the same gradient: the teacher's entropy is constant
    (0.5 * binned_kl).backward()
    for a, p in zip(ours, trainer.params):
        assert torch.allclose(a, p.grad.float(), atol=1e-6, rtol=1e-4)


def test_sft_weight_mixes_in_the_sampled_token(model_dir):
    trainer = new_trainer(model_dir)
    e = example(trainer)
    ids = torch.zeros((e.n_trainable, 2), dtype=torch.long)
    d = kl_objective.soft_datum(e, ids, torch.zeros((e.n_trainable, 2)), weight=1.0, sft_weight=0.25)
    answer = [w for w in d.weights if sum(w) > 0]
    assert len(answer) == e.n_trainable and all(w == pytest.approx([0.375, 0.375, 0.25]) for w in answer)
    assert [t[-1] for t, w in zip(d.target_tokens, d.weights) if sum(w) > 0] == answer_tokens(e)


@pytest.mark.parametrize("sft_weight", [0.0, 0.3])
def test_kl_over_the_whole_vocabulary_is_forward_kl_to_the_prompted_teacher(tmp_path, model_dir, sft_weight):
    """train.topk null: each step the teacher (here a second tiny model) scores the answers WITH
    the prompt, and the loss of a datum is, by plain forward passes, sum_t w KL(target_t || student_t)
    with target = (1 - s) teacher + s one_hot(sampled token)."""
    from promptdistill.config import RunConfig
    from promptdistill.backends.local_model import load_causal_lm
    from promptdistill.objectives.step import StepContext
    from promptdistill.teacher import LocalTeacher
    from promptdistill.render import prompt_ids

    teacher_dir = save_tiny(tmp_path / "teacher", seed=1)
    trainer = new_trainer(model_dir)
    cfg = RunConfig.model_validate({"name": "t", "system_prompt": SYSTEM, "queries": {"files": ["q.jsonl"]}, "teacher": {"model": str(teacher_dir)},
                                    "student": {"model": str(model_dir)}, "train": {"objective": "kl", "topk": None,
                                                                                  "sft_weight": sft_weight, "steps": 1}})
    teacher_model, teacher_tok = load_causal_lm(teacher_dir, "cpu")
    e = example(trainer)
    ctx = StepContext(cfg, None, trainer, rows={"q1": {"messages": [{"role": "user", "content": "Where is the treasure?"},
                                                        {"role": "assistant", "content": "Under the palm, matey."}],
                                           "trained": {1: True}}},
                      teacher=LocalTeacher(cfg, teacher_model, teacher_tok, base_of_adapter=False))
    kl_objective.prepare(ctx, [e])
    (batch,), total = step_datums(ctx, kl_objective, [e], 0)  # as the training loop builds a step
    loss = kl_objective.loss(ctx)
    assert loss is kl_objective.FORWARD_KL and total == e.n_trainable
    got = trainer.forward(batch, loss).loss

    answer = answer_tokens(e)
    prompted = prompt_ids(teacher_tok, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Where is the treasure?"}])
    with torch.no_grad():
        t = torch.log_softmax(teacher_model(input_ids=torch.tensor([prompted + answer])).logits[0, len(prompted) - 1:-1].double(), -1)
        m = torch.log_softmax(trainer.model(input_ids=torch.tensor([e.tokens[:-1]])).logits[0].double(), -1)
    m = m[[i for i, w in enumerate(e.mask[1:]) if w]]
    target = (1 - sft_weight) * t.exp() + sft_weight * torch.nn.functional.one_hot(torch.tensor(answer), t.shape[-1])
    expected = (target * (target.clamp_min(1e-300).log() - m)).sum() / total
    assert got == pytest.approx(float(expected), rel=1e-4)


@pytest.mark.parametrize("objective,topk", [("kl", None), ("kl", 8), ("sft", None)])
def test_a_conversation_in_one_pass_is_the_sum_of_its_turns(tmp_path, model_dir, objective, topk):
    """One example per conversation, the teacher scoring all its turns in one pass WITH the prompt,
    gives the loss the same turns give as examples of their own (each after the same history):
    the causal model sees the same tokens before every trained position."""
    from promptdistill.backends.local_model import load_causal_lm
    from promptdistill.config import RunConfig
    from promptdistill.objectives import sft
    from promptdistill.objectives.step import StepContext
    from promptdistill.render import render_conversation
    from promptdistill.rundir import RunDir
    from promptdistill.teacher import LocalTeacher

    teacher_dir = save_tiny(tmp_path / "teacher", seed=1)
    trainer = new_trainer(model_dir)
    cfg = RunConfig.model_validate({"name": "t", "system_prompt": SYSTEM, "queries": {"files": ["q.jsonl"]},
                                    "teacher": {"model": str(teacher_dir)}, "student": {"model": str(model_dir)},
                                    "train": {"objective": objective, "topk": topk, "steps": 1}})
    messages = [{"role": "user", "content": "Where is the treasure?"}, {"role": "assistant", "content": "Under the palm, mat"},
                {"role": "user", "content": "And the map?"}, {"role": "assistant", "content": "Burnt, arr."}]
    rows = {"conv": {"messages": messages, "trained": {1: False, 3: True}, "keys": ["k1", "k2"]},
            "t1": {"messages": messages[:2], "trained": {1: False}, "keys": ["k1"]},
            "t2": {"messages": messages, "trained": {3: True}, "keys": ["k2"]}}
    examples = [render_conversation(trainer.tokenizer, r["messages"], r["trained"], i) for i, r in rows.items()]
    teacher_model, teacher_tok = load_causal_lm(teacher_dir, "cpu")
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    ctx = StepContext(cfg, run, trainer, rows=rows, teacher=LocalTeacher(cfg, teacher_model, teacher_tok, base_of_adapter=False))
    module = kl_objective if objective == "kl" else sft
    if hasattr(module, "prepare"):
        module.prepare(ctx, examples)
    loss = module.loss(ctx)
    whole, first, second = (trainer.forward(module.datums(ctx, [e], 0), loss).loss for e in examples)
    assert examples[0].n_trainable == examples[1].n_trainable + examples[2].n_trainable
    assert whole == pytest.approx(first + second, rel=1e-5)


@pytest.mark.parametrize("objective", ["kl", "sft"])
def test_a_step_cut_by_length_has_the_gradient_of_one_micro_batch(tmp_path, model_dir, objective):
    """A step mixing a long conversation with single answers is cut into micro-batches of similar
    lengths (teacher passes included); the summed gradient is the one padded micro-batch's."""
    from promptdistill.backends.local_model import load_causal_lm
    from promptdistill.config import RunConfig
    from promptdistill.objectives import sft
    from promptdistill.objectives.step import StepContext
    from promptdistill.render import render_conversation
    from promptdistill.teacher import LocalTeacher

    teacher_dir = save_tiny(tmp_path / "teacher", seed=1)
    cfg = RunConfig.model_validate({"name": "t", "system_prompt": SYSTEM, "queries": {"files": ["q.jsonl"]},
                                    "teacher": {"model": str(teacher_dir)}, "student": {"model": str(model_dir)},
                                    "train": {"objective": objective, "topk": None, "steps": 1, "batch_size": 8}})
    chat = [m for i in range(6) for m in ({"role": "user", "content": f"And the map number {i}, where is it kept?"},
                                           {"role": "assistant", "content": f"Burnt in the galley fire {i}, arr, every scrap."})]
    rows = {"conv": {"messages": chat, "trained": {i: True for i in range(1, len(chat), 2)}},
            **{f"q{i}": {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "trained": {1: True}}
               for i, (q, a) in enumerate([("Hi", "Ahoy!"), ("Who are you?", "Redbeard."), ("Gold?", "Buried, matey.")])}}
    grads = []
    for cut in (True, False):
        trainer = new_trainer(model_dir)
        with torch.no_grad():  # LoRA B starts at zero; give it weight so A gets a gradient too
            for p in trainer.params:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01)
        examples = [render_conversation(trainer.tokenizer, r["messages"], r["trained"], i) for i, r in rows.items()]
        teacher_model, teacher_tok = load_causal_lm(teacher_dir, "cpu")
        ctx = StepContext(cfg, None, trainer, rows=rows, teacher=LocalTeacher(cfg, teacher_model, teacher_tok, base_of_adapter=False))
        module = kl_objective if objective == "kl" else sft
        if hasattr(module, "prepare"):
            module.prepare(ctx, examples)
        total = sum(e.n_trainable for e in examples)
        if cut:
            batches, counted = step_datums(ctx, module, examples, 0)
            assert counted == total and len(batches) == 2 and sorted(map(len, batches)) == [1, 3]
        else:
            batches = [[d.scaled(1.0 / total) for d in module.datums(ctx, examples, 0)]]
        for batch in batches:
            trainer.forward_backward(batch, module.loss(ctx))
        grads.append(torch.cat([p.grad.flatten() for p in trainer.params]))
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


def reverse_kl_to_teacher(cfg, run, adapter: bool) -> float:
    """Mean reverse KL(student || prompted teacher) on greedy answers to the train queries,
    computed outside the trainer: plain forward passes of the teacher and of base or base + adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from promptdistill.render import prompt_ids

    tok = AutoTokenizer.from_pretrained(cfg.student.model)
    teacher = AutoModelForCausalLM.from_pretrained(cfg.teacher.model).eval()
    model = AutoModelForCausalLM.from_pretrained(cfg.student.model).eval()
    if adapter:
        model = PeftModel.from_pretrained(model, str(run.student)).eval()
    queries = [json.loads(l) for l in run.queries.read_text().splitlines()]
    values = []
    for q in [q for q in queries if q["split"] == "train"]:
        user = [{"role": "user", "content": q["query"]}]
        own = prompt_ids(tok, user)
        with torch.no_grad():
            out = model.generate(torch.tensor([own]), max_new_tokens=8, do_sample=False)[0, len(own):].tolist()
            prompted = prompt_ids(tok, [{"role": "system", "content": cfg.system_prompt}] + user)
            m = model(input_ids=torch.tensor([own + out])).logits[0, len(own) - 1:-1]
            t = teacher(input_ids=torch.tensor([prompted + out])).logits[0, len(prompted) - 1:-1]
        values.append(float(divergence.reverse_kl(m, t).mean()))
    return sum(values) / len(values)


def test_on_policys_policy_gradient_form_is_the_exact_reverse_kl_gradient_in_expectation(model_dir):
    """Tinker takes on_policy as importance_sampling with advantage = teacher - student log-probability.
    Summed over every token x the student could sample at one position, each weighted by its
    probability p(x), that loss's gradient is exactly the gradient of KL(p || teacher) there:
    sum_x p(x) (log p(x) - log q(x)) grad log p(x) = grad KL, since sum_x p(x) grad log p(x) = 0."""
    from promptdistill.backends.base import Completion
    from promptdistill.objectives.on_policy import advantage_datum, exact_datum
    from promptdistill.render import sampled_datum

    trainer = new_trainer(model_dir)
    user = [{"role": "user", "content": "Where is the treasure?"}]
    vocab = len(trainer.tokenizer)
    teacher = torch.log_softmax(2 * torch.randn(1, vocab, generator=torch.Generator().manual_seed(3)), -1)
    probe = sampled_datum(trainer.tokenizer, user, [0])
    with torch.no_grad():
        student = torch.log_softmax(trainer.model(input_ids=torch.tensor([probe.input_tokens])).logits[0, -1].float(), -1)

    trainer.forward_backward([exact_datum(probe, teacher)], on_policy.REVERSE_KL)
    exact = [p.grad.clone() for p in trainer.params]
    trainer.optimizer.zero_grad(set_to_none=True)

    datums = []
    for x in range(vocab):
        answer = Completion(text="", token_ids=[x], prompt_tokens=0, finish_reason="length",
                            logprobs=[{"token": "", "id": x, "logprob": float(student[x]), "top": []}])
        datums.append(advantage_datum(sampled_datum(trainer.tokenizer, user, [x], float(student[x].exp())), answer,
                                      teacher[0, [x]]))
    assert datums[7].advantages[-1] == pytest.approx(float(student[7].exp() * (teacher[0, 7] - student[7])))
    result = trainer.forward_backward(datums, on_policy.IMPORTANCE_SAMPLING)
    for a, p in zip(exact, trainer.params):
        assert torch.allclose(a, p.grad, atol=1e-6, rtol=1e-3)
    # And the advantages, so weighted, sum to the exact KL itself.
    assert sum(-d.advantages[-1] for d in datums) == pytest.approx(
        float(divergence.reverse_kl(student[None], teacher)), rel=1e-4)
    assert result.tokens == vocab


def test_on_policy_lowers_the_reverse_kl_to_a_fixed_teacher(tmp_path, model_dir):
    # The teacher: another tiny model over the same tokenizer (a seed apart), far from the student.
    teacher = save_tiny(tmp_path / "teacher", seed=1)
    cfg, run = trained_tiny_run(tmp_path, model_dir, 24, system_prompt=SYSTEM, teacher={"model": str(teacher)},
                                train={"objective": "on_policy", "steps": 12, "batch_size": 4, "lr": 1e-2,
                                       "eval_every": 6, "on_policy": {"max_tokens": 8}})
    metrics = [json.loads(l) for l in run.metrics.read_text().splitlines()]
    assert [m["objective"] for m in metrics if "objective" in m] == ["on_policy"] * 12
    before, after = reverse_kl_to_teacher(cfg, run, adapter=False), reverse_kl_to_teacher(cfg, run, adapter=True)
    print(f"reverse KL to the teacher: base {before:.4f}, after on_policy {after:.4f}")
    assert after < 0.7 * before, (before, after)


def test_sample_ahead_draws_a_groups_answers_in_one_decode(tmp_path, model_dir, monkeypatch):
    # sample_ahead 3 over 5 steps: steps 1-3 are sampled in one decode with step 1's weights,
    # steps 4-5 (the run ends there) in another, each row with its own step's seed.
    decodes = []
    sampler = LocalTrainer.sampler

    def recording(self):
        s = sampler(self)
        sample = s.sample
        s.sample = lambda conversations, params, seeds: decodes.append(seeds) or sample(conversations, params, seeds)
        return s

    monkeypatch.setattr(LocalTrainer, "sampler", recording)
    train = {"objective": "on_policy", "steps": 5, "batch_size": 4, "lr": 1e-2, "eval_every": 5,
             "on_policy": {"max_tokens": 6, "sample_ahead": 3}}
    (tmp_path / "ahead").mkdir()
    (tmp_path / "plain").mkdir()
    cfg, run = trained_tiny_run(tmp_path / "ahead", model_dir, 16, system_prompt=SYSTEM, train=train)
    tokenizer = AutoTokenizer.from_pretrained(cfg.student.model)
    examples, _ = render_all(tokenizer, load_split(cfg, run)["train"], cfg.train.max_seq_len)
    expected = [[on_policy.sample_seed(e.id, 0, cfg.train.seed, s) for s in group for e in step_examples(examples, s, cfg.train)]
                for group in ([0, 1, 2], [3, 4])]
    assert [sorted(d) for d in decodes] == [sorted(e) for e in expected]
    ahead = [json.loads(l) for l in run.metrics.read_text().splitlines() if "train_loss" in json.loads(l)]

    # Step 1 is the same step as without sample_ahead (same weights, examples and seeds).
    decodes.clear()
    _, plain = trained_tiny_run(tmp_path / "plain", model_dir, 16, system_prompt=SYSTEM,
                                train=train | {"on_policy": {"max_tokens": 6}})
    assert len(decodes) == 5
    first = [json.loads(l) for l in plain.metrics.read_text().splitlines() if "train_loss" in json.loads(l)][0]
    assert ahead[0]["tokens"] == first["tokens"] and ahead[0]["train_loss"] == pytest.approx(first["train_loss"], rel=1e-5)


def test_a_schedule_runs_its_phases_in_order(tmp_path, model_dir):
    cfg, run = trained_tiny_run(tmp_path, model_dir, 16, system_prompt=SYSTEM,
                                train={"phases": [{"objective": "kl", "steps": 2}, {"objective": "on_policy", "steps": 2}],
                                       "batch_size": 4, "topk": 8, "eval_every": 2, "on_policy": {"max_tokens": 6}})
    metrics = [json.loads(l) for l in run.metrics.read_text().splitlines()]
    assert [m["objective"] for m in metrics if "objective" in m] == ["kl", "kl", "on_policy", "on_policy"]
    stored = kl_objective.load_targets(run.root / kl_objective.TARGETS_DIR)
    assert len(stored) == 8 and all(ids.shape[1] == 8 for ids, _ in stored.values())  # the 8 train answers, top-8 each


@pytest.mark.parametrize("objective", ["on_policy", "kl"])
def test_a_killed_run_resumes_to_the_same_adapter(tmp_path, model_dir, objective):
    a, b = killed_and_resumed(tmp_path, model_dir, SYSTEM, {"objective": objective, "topk": 8})
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_turn_weights_weigh_each_answer_by_its_turn(model_dir):
    """train.turn_weights [1, 2, 4]: a conversation's first answer weighs 1, its second 2, its third
    and fourth 4, a query asked alone 1; the step's loss is sum(w * nll) / sum(w) over its trained
    tokens, each token's nll from one plain forward pass."""
    from promptdistill.config import RunConfig
    from promptdistill.loss import CROSS_ENTROPY
    from promptdistill.objectives import sft
    from promptdistill.objectives.step import StepContext, trained_runs
    from promptdistill.render import render_conversation

    cfg = RunConfig.model_validate({"name": "t", "system_prompt": SYSTEM, "queries": {"files": ["q.jsonl"]},
                                    "teacher": {"model": str(model_dir)}, "student": {"model": str(model_dir)},
                                    "train": {"objective": "sft", "steps": 1, "batch_size": 8, "turn_weights": [1, 2, 4]}})
    chat = [m for i in range(4) for m in ({"role": "user", "content": f"Where is chest {i}?"},
                                           {"role": "assistant", "content": f"Sunk off cape {i}, arr."})]
    rows = {"conv": {"messages": chat, "trained": {i: True for i in range(1, len(chat), 2)}},
            "q": {"messages": [{"role": "user", "content": "Gold?"}, {"role": "assistant", "content": "Buried, matey."}],
                  "trained": {1: True}}}
    trainer = new_trainer(model_dir)
    examples = [render_conversation(trainer.tokenizer, r["messages"], r["trained"], i) for i, r in rows.items()]
    batches, total = step_datums(StepContext(cfg, None, trainer, rows=rows), sft, examples, 0)
    got = sum(trainer.forward(batch, CROSS_ENTROPY).loss for batch in batches)

    weighted = weight_sum = 0.0
    for e, turn_weights in zip(examples, ([1, 2, 4, 4], [1])):
        assert len(trained_runs(e)) == len(turn_weights)
        with torch.no_grad():
            logp = torch.log_softmax(trainer.model(input_ids=torch.tensor([e.tokens[:-1]])).logits[0].double(), -1)
        nll = -logp.gather(-1, torch.tensor(e.tokens[1:])[:, None])[:, 0]
        runs = iter(turn_weights)
        w, previous = 0, 0
        for i, m in enumerate(e.mask[1:]):
            w = next(runs) if m and not previous else w
            if m:
                weighted, weight_sum = weighted + w * float(nll[i]), weight_sum + w
            previous = m
    assert total == sum(e.n_trainable for e in examples)
    assert got == pytest.approx(weighted / weight_sum, rel=1e-5)


def test_turn_weights_reject_all_zero_and_turn_by_turn_objectives(tmp_path, model_dir):
    from pydantic import ValidationError

    from promptdistill.config import TrainConfig
    from promptdistill.rundir import StageError

    with pytest.raises(ValidationError, match="turn_weights: every weight is 0"):
        TrainConfig.model_validate({"turn_weights": [0, 0]})
    with pytest.raises(StageError, match="train.turn_weights weighs the answers of whole conversations; on_policy learns "
                                         "one sampled turn at a time"):
        trained_tiny_run(tmp_path, model_dir, 8, train={"objective": "on_policy", "steps": 1, "turn_weights": [1, 2]})


def test_reweighting_a_soft_datum_scales_each_positions_k_weights():
    from promptdistill.render import Datum

    d = Datum([1, 2, 3], [[4, 5], [6, 7], [8, 9]], [[0.0, 0.0], [0.75, 0.25], [0.5, 0.5]])
    assert d.reweighted([1.0, 2.0, 0.0]).weights == [[0.0, 0.0], [1.5, 0.5], [0.0, 0.0]]
    assert d.reweighted([1.0, 2.0, 0.0]).trained_positions() == 1
    with pytest.raises(ValueError, match="2 factors for a datum of 3 positions"):
        d.reweighted([1.0, 2.0])
