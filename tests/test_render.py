"""render.py: loss masks found by rendering with each family's chat template, checked."""

from __future__ import annotations

import pytest

from promptdistill.render import (
    Example,
    RenderError,
    _answer_span,
    check_mask,
    prompt_ids,
    render_conversation,
    render_example,
    render_text,
    stop_token_ids,
    student_view,
    to_datum,
)
from tiny import (
    CHATML,
    END_OF_TURN,
    FAMILIES,
    SMOL_DEFAULT_SYSTEM,
    save_tiny,
    tiny_model,
    tiny_tokenizer,
    tiny_tokenizer_with_template,
)

TRIMS = {"llama3", "gemma"}  # templates that `| trim` the message content
AFTER_END_OF_TURN = {"chatml": "\n", "chatml_default_system": "\n", "llama3": "", "gemma": "\n"}
SYSTEM = "You are Ludwig van Beethoven. Answer in one sentence."

ANSWERS = [
    "Hello there!",
    "line one\nline two\n\n- item three",
    "  padded answer with spaces  ",
    "ends with a newline\n",
    "Tags <b>bold</b> and {braces} and {{ jinja }} and {% raw %}",
    "Grüße aus Köln: Äpfel, Öl, Übermaß 😀🎻",
    "a<b && c>d; x = {'k': [1, 2]}",
]


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def tok(family):
    return tiny_tokenizer(family)


def conversation(query="Who are you?", system=SYSTEM):
    msgs = [{"role": "system", "content": system}] if system is not None else []
    return msgs + [{"role": "user", "content": query}]


def expected_answer(family, answer):
    return answer.strip() if family in TRIMS else answer


def trainable_text(tok, ex: Example) -> str:
    return tok.decode([t for t, m in zip(ex.tokens, ex.mask) if m], skip_special_tokens=False)


def split_by_mask(tok, ex: Example) -> tuple[str, str, str]:
    """(text before, text of, text after) the single run of trainable tokens."""
    marked = [i for i, m in enumerate(ex.mask) if m]
    first, last = marked[0], marked[-1]
    assert marked == list(range(first, last + 1)), "mask is not one contiguous run"
    dec = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731
    return dec(ex.tokens[:first]), dec(ex.tokens[first:last + 1]), dec(ex.tokens[last + 1:])


def eot_id(tok, family):
    i = tok.convert_tokens_to_ids(END_OF_TURN[family])
    assert i is not None and i != tok.unk_token_id
    return i


# --- the tiny tokenizers themselves ----------------------------------------------------


def test_tiny_tokenizer_roundtrips_text_and_gives_offsets(tok, family):
    text = "Grüße 😀 <x> {y}\n\n  tabs\tand spaces  " + END_OF_TURN[family]
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert tok.decode(enc["input_ids"], skip_special_tokens=False) == text
    assert len(enc["offset_mapping"]) == len(enc["input_ids"])
    assert enc["input_ids"][-1] == eot_id(tok, family)  # the marker is one special token
    assert enc["offset_mapping"][-1] == (len(text) - len(END_OF_TURN[family]), len(text))
    assert 300 <= len(tok) <= 500


# --- the mask: exactly the answer plus its end-of-turn token -------------------------


@pytest.mark.parametrize("answer", ANSWERS)
def test_trainable_tokens_are_exactly_answer_and_end_of_turn(tok, family, answer):
    prompt = conversation()
    ex = render_example(tok, prompt, answer, "ex-1")
    before, trained, after = split_by_mask(tok, ex)

    assert trained == expected_answer(family, answer) + END_OF_TURN[family]
    # Everything before is exactly the prompt with its generation prompt: no system prompt,
    # query or role header is trainable.
    assert before == render_text(tok, prompt, generation_prompt=True)
    assert SYSTEM not in trained and "Who are you?" not in trained
    for header in ("assistant", "model", "<|im_start|>", "<|start_header_id|>", "<start_of_turn>"):
        assert header not in trained.replace(answer, "")
    # The token after the end-of-turn marker (ChatML's / Gemma's trailing "\n") is not trained.
    assert after == AFTER_END_OF_TURN[family]
    assert ex.tokens[ex.mask.index(1) + ex.n_trainable - 1] == eot_id(tok, family)
    if after:
        assert ex.mask[-1] == 0
    # Tokens + mask cover the whole rendering, and the mask is 0/1 of the same length.
    full = render_text(tok, prompt + [{"role": "assistant", "content": answer}], generation_prompt=False)
    assert tok.decode(ex.tokens, skip_special_tokens=False) == full
    assert len(ex.mask) == len(ex.tokens) and set(ex.mask) <= {0, 1}


@pytest.mark.parametrize("answer", ANSWERS[:3])
def test_prompt_tokens_are_the_served_prompt_ids_and_untrained(tok, family, answer):
    """Training reads the prompt exactly as `prompt_ids` (what the sampler feeds) tokenizes it."""
    prompt = conversation()
    ex = render_example(tok, prompt, answer, "ex-2")
    head = prompt_ids(tok, prompt)
    assert ex.tokens[: len(head)] == head
    assert ex.mask[: len(head)] == [0] * len(head)
    assert ex.mask[len(head)] == 1  # training starts at the first answer token


def test_bos_appears_once_and_is_not_trainable(tok, family):
    ex = render_example(tok, conversation(), "Hello there!", "ex-bos")
    if tok.bos_token is None or family.startswith("chatml"):
        # ChatML templates emit no BOS (SmolLM2's bos <|im_start|> opens every turn instead).
        assert ex.tokens[0] == tok.convert_tokens_to_ids("<|im_start|>")
        return
    assert ex.tokens[0] == tok.bos_token_id
    assert ex.tokens.count(tok.bos_token_id) == 1  # the template's BOS, none added on top
    assert ex.mask[0] == 0
    assert prompt_ids(tok, conversation()).count(tok.bos_token_id) == 1


def test_trimming_templates_drop_outer_whitespace_from_the_trained_text(family):
    tok = tiny_tokenizer(family)
    ex = render_example(tok, conversation(), "\n  Bonjour.  \n", "ex-ws")
    trained = trainable_text(tok, ex)
    if family in TRIMS:
        assert trained == "Bonjour." + END_OF_TURN[family]
    else:
        # ChatML keeps the whitespace. The answer's first "\n" merges with the header's "\n"
        # into one prompt-side token, so it is not trained, but every answer character after
        # it is, and no prompt character is.
        assert trained == "  Bonjour.  \n" + END_OF_TURN[family]


@pytest.mark.parametrize("system", [SYSTEM, "Always say hello.", None])
def test_answer_text_inside_the_query_masks_only_the_answer_turn(tok, family, system):
    prompt = conversation(query="Say hello", system=system)
    ex = render_example(tok, prompt, "hello", "ex-hello")
    before, trained, _ = split_by_mask(tok, ex)
    assert trained == "hello" + END_OF_TURN[family]
    assert "Say hello" in before
    assert ex.n_trainable == len(tok("hello" + END_OF_TURN[family], add_special_tokens=False)["input_ids"])
    assert ex.mask.index(1) == len(prompt_ids(tok, prompt))


def test_earlier_assistant_turns_with_the_same_text_are_not_trained(tok, family):
    prompt = conversation(query="Say hello", system=None) + [
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Again: say hello"},
    ]
    ex = render_example(tok, prompt, "hello", "ex-multi")
    before, trained, _ = split_by_mask(tok, ex)
    assert trained == "hello" + END_OF_TURN[family]
    assert before.count("hello") == 3  # query, earlier answer, second query: all prompt-side
    assert ex.mask.index(1) == len(prompt_ids(tok, prompt))


def trained_runs_text(tok, ex: Example) -> list[str]:
    """The text of each contiguous run of trainable tokens, in order."""
    runs, previous = [], 0
    for t, m in zip(ex.tokens, ex.mask):
        if m and not previous:
            runs.append([])
        if m:
            runs[-1].append(t)
        previous = m
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


@pytest.mark.parametrize("system", [SYSTEM, None])
def test_a_whole_conversation_trains_exactly_its_trained_assistant_turns(tok, family, system):
    """One example per conversation: each trained answer is its own run of trainable tokens, its
    end-of-turn token trained only where asked (an answer cut off at max_tokens did not end
    itself); user turns, role headers, an untrained answer and the system prompt are not trained."""
    messages = conversation(query="Say hello", system=system) + [
        {"role": "assistant", "content": "hello, cut off mid"},
        {"role": "user", "content": "Again: say hello"},
        {"role": "assistant", "content": "  hello again.  "},
        {"role": "user", "content": "And a third time?"},
        {"role": "assistant", "content": "not trained"},
        {"role": "user", "content": "Last one"},
        {"role": "assistant", "content": "hello, the last."},
    ]
    first = 1 if system is None else 2
    trained = {first: False, first + 2: True, first + 6: True}
    ex = render_conversation(tok, messages, trained, "conv-1")
    eot = END_OF_TURN[family]
    assert trained_runs_text(tok, ex) == ["hello, cut off mid", expected_answer(family, "  hello again.  ") + eot,
                                          "hello, the last." + eot]
    assert tok.decode(ex.tokens, skip_special_tokens=False) == render_text(tok, messages, generation_prompt=False)
    # each run starts exactly where the generation prompt after its history ends
    starts = [i for i, m in enumerate(ex.mask) if m and (i == 0 or not ex.mask[i - 1])]
    assert starts == [len(prompt_ids(tok, messages[:i])) for i in sorted(trained)]
    # one turn alone renders as render_example does
    single = render_conversation(tok, messages[:first + 1], {first: True}, "one")
    assert single == render_example(tok, messages[:first], messages[first]["content"], "one")


def test_a_trained_message_that_is_not_an_answer_is_an_error(tok):
    with pytest.raises(RenderError, match="conv-2: message 0 is trained but is a user turn"):
        render_conversation(tok, conversation(system=None) + [{"role": "assistant", "content": "Hi."}], {0: True}, "conv-2")


def test_gemma_merges_the_system_prompt_into_the_user_turn_and_does_not_train_it():
    tok = tiny_tokenizer("gemma")
    ex = render_example(tok, conversation(query="Hi"), "Hello!", "ex-g")
    before, trained, _ = split_by_mask(tok, ex)
    assert before == f"<bos><start_of_turn>user\n{SYSTEM}\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert trained == "Hello!<end_of_turn>"


# --- student_view: what a student without a system prompt really reads ---------------


def test_student_view(tok, family):
    view = student_view(tok)
    assert "{query}" in view
    assert view == render_text(tok, [{"role": "user", "content": "{query}"}], generation_prompt=True)
    if family == "chatml_default_system":
        assert view.startswith(f"<|im_start|>system\n{SMOL_DEFAULT_SYSTEM}<|im_end|>\n")
    else:
        assert "system" not in view and SMOL_DEFAULT_SYSTEM not in view
    ends = {
        "chatml": "{query}<|im_end|>\n<|im_start|>assistant\n",
        "chatml_default_system": "{query}<|im_end|>\n<|im_start|>assistant\n",
        "llama3": "{query}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "gemma": "{query}<end_of_turn>\n<start_of_turn>model\n",
    }
    assert view.endswith(ends[family])  # the student's prompt ends with the generation prompt


def test_injected_default_system_prompt_is_shown_but_never_trained():
    tok = tiny_tokenizer("chatml_default_system")
    prompt = conversation(query="Who made you?", system=None)
    ex = render_example(tok, prompt, "Hugging Face made me.", "ex-smol")
    before, trained, _ = split_by_mask(tok, ex)
    assert SMOL_DEFAULT_SYSTEM in student_view(tok)
    assert SMOL_DEFAULT_SYSTEM in before  # the student is trained reading it ...
    assert trained == "Hugging Face made me.<|im_end|>"  # ... but never on it
    # An explicit system prompt replaces the default one.
    ex2 = render_example(tok, conversation(query="Who made you?"), "Hugging Face made me.", "ex-smol2")
    assert SMOL_DEFAULT_SYSTEM not in tok.decode(ex2.tokens)


# --- to_datum ---------------------------------------------------------------------------


@pytest.mark.parametrize("weight", [1.0, 0.25])
def test_to_datum_shifts_by_one(tok, family, weight):
    answer = "Grüße, {world}!"
    ex = render_example(tok, conversation(), answer, "ex-d")
    d = to_datum(ex, weight=weight)
    assert d.input_tokens == ex.tokens[:-1]
    assert d.target_tokens == ex.tokens[1:]
    assert d.weights == [m * weight for m in ex.mask[1:]]
    assert len(d.input_tokens) == len(d.target_tokens) == len(d.weights) == len(ex.tokens) - 1
    assert sum(d.weights) == pytest.approx(weight * ex.n_trainable)

    weighted = [i for i, w in enumerate(d.weights) if w]
    first = weighted[0]
    answer_ids = tok(expected_answer(family, answer), add_special_tokens=False)["input_ids"]
    # The first weighted target is the answer's first token, read after the full prompt.
    assert d.target_tokens[first] == answer_ids[0]
    assert d.input_tokens[: first + 1] == prompt_ids(tok, conversation())
    # The last weighted target is the end-of-turn token: the student learns to stop.
    assert d.target_tokens[weighted[-1]] == eot_id(tok, family)
    assert [d.target_tokens[i] for i in weighted] == answer_ids + [eot_id(tok, family)]


# --- stop_token_ids ---------------------------------------------------------------------


def test_stop_token_ids_contain_end_of_turn_and_eos(tok, family):
    ids = stop_token_ids(tok)
    assert eot_id(tok, family) in ids
    assert tok.eos_token_id in ids
    assert ids == sorted(set(ids))
    # Only special tokens: never the "\n" that follows ChatML's / Gemma's marker.
    assert tok.convert_tokens_to_ids("Ċ") not in ids
    assert all(tok.convert_ids_to_tokens(i) in tok.added_tokens_encoder for i in ids)


def test_stop_token_ids_when_end_of_turn_is_not_a_named_special_token():
    """Llama-3-Instruct as first released: eos <|end_of_text|>, <|eot_id|> only a special
    added token; generation must still stop at <|eot_id|>."""
    tok = tiny_tokenizer("llama3")
    assert tok.eos_token == "<|end_of_text|>"
    assert "<|eot_id|>" not in tok.all_special_tokens  # the setting under test
    assert set(stop_token_ids(tok)) == {tok.convert_tokens_to_ids("<|eot_id|>"), tok.eos_token_id}


# --- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("answer", ["", "   ", "\n\t \n"])
def test_empty_answer_is_an_error_naming_the_example(tok, answer):
    with pytest.raises(RenderError, match=r"example q-17\b.*empty"):
        render_example(tok, conversation(), answer, "q-17")


NO_SPECIAL_END = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
# DeepSeek-R1-like: the generation prompt opens a think block the rendered turn lacks.
THINK_IN_GENERATION_PROMPT = CHATML.replace(
    "{{ '<|im_start|>assistant\n' }}", "{{ '<|im_start|>assistant\n<think>\n' }}"
)
# The last assistant turn is rendered with a prefix the generation prompt does not have.
PREFIXED_LAST_TURN = (
    "{% for m in messages %}"
    "{% if loop.last and m['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant [final]\n' + m['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen3-like: an empty think block between the generation prompt and the answer.
THINK_BLOCK_BEFORE_ANSWER = (
    "{% for m in messages %}"
    "{% if loop.last and m['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + m['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_template_without_special_end_of_turn_is_an_error():
    tok = tiny_tokenizer_with_template(NO_SPECIAL_END)
    with pytest.raises(RenderError, match=r"example bad-1\b.*no special end-of-turn token"):
        render_example(tok, conversation(), "Hello there!", "bad-1")
    with pytest.raises(RenderError, match="end-of-turn"):
        stop_token_ids(tok)


@pytest.mark.parametrize("template", [THINK_IN_GENERATION_PROMPT, PREFIXED_LAST_TURN], ids=["think-gen-prompt", "prefixed-turn"])
def test_rendering_that_does_not_start_with_the_generation_prompt_is_an_error(template):
    assert "<think>" in template or "[final]" in template  # the template really differs
    tok = tiny_tokenizer_with_template(template)
    head = render_text(tok, conversation(), generation_prompt=True)
    full = render_text(tok, conversation() + [{"role": "assistant", "content": "Hi"}], generation_prompt=False)
    assert not full.startswith(head)
    with pytest.raises(RenderError, match=r"example bad-2\b.*differently from its generation prompt"):
        render_example(tok, conversation(), "Hi", "bad-2")


def test_text_between_generation_prompt_and_answer_is_an_error():
    tok = tiny_tokenizer_with_template(THINK_BLOCK_BEFORE_ANSWER)
    with pytest.raises(RenderError, match=r"example bad-3\b.*does not follow the generation prompt"):
        render_example(tok, conversation(), "Hi", "bad-3")


# --- check_mask directly ----------------------------------------------------------------


def rendered(tok, answer="one two three four"):
    prompt = conversation()
    full, answer_start, content_start, end = _answer_span(tok, prompt, answer, "cm")
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    good = render_example(tok, prompt, answer, "cm")
    assert good.tokens == enc["input_ids"]
    return good, enc["offset_mapping"], answer_start, content_start, end


def with_mask(ex, mask):
    return Example(ex.id, ex.tokens, mask)


def test_check_mask_accepts_the_rendered_mask(tok):
    good, offsets, a, c, e = rendered(tok)
    check_mask(good, offsets, [(a, c, e)])  # no error


def test_check_mask_rejects_an_all_zero_mask(tok):
    good, offsets, a, c, e = rendered(tok)
    with pytest.raises(RenderError, match="no trainable token"):
        check_mask(with_mask(good, [0] * len(good.mask)), offsets, [(a, c, e)])


def test_check_mask_rejects_a_marked_prompt_token(tok):
    good, offsets, a, c, e = rendered(tok)
    first = good.mask.index(1)
    mask = list(good.mask)
    mask[first - 1] = 1  # the last token of the generation prompt
    with pytest.raises(RenderError, match="outside the answer"):
        check_mask(with_mask(good, mask), offsets, [(a, c, e)])
    mask = list(good.mask)
    mask[0] = 1  # a token far into the prompt (a gap, too)
    with pytest.raises(RenderError, match="outside the answer"):
        check_mask(with_mask(good, mask), offsets, [(a, c, e)])


def test_check_mask_rejects_a_gap(tok):
    good, offsets, a, c, e = rendered(tok)
    marked = [i for i, m in enumerate(good.mask) if m]
    assert len(marked) >= 4
    mask = list(good.mask)
    mask[marked[2]] = 0
    with pytest.raises(RenderError, match="do not cover the whole answer"):
        check_mask(with_mask(good, mask), offsets, [(a, c, e)])


def test_check_mask_rejects_a_mask_missing_the_start_or_the_end_of_turn(tok):
    good, offsets, a, c, e = rendered(tok)
    marked = [i for i, m in enumerate(good.mask) if m]
    no_eot = list(good.mask)
    no_eot[marked[-1]] = 0
    with pytest.raises(RenderError, match="do not cover"):
        check_mask(with_mask(good, no_eot), offsets, [(a, c, e)])
    no_first = list(good.mask)
    no_first[marked[0]] = 0
    with pytest.raises(RenderError, match="do not cover"):
        check_mask(with_mask(good, no_first), offsets, [(a, c, e)])


@pytest.mark.parametrize("family", [f for f in FAMILIES if AFTER_END_OF_TURN[f]])
def test_check_mask_rejects_the_token_after_end_of_turn(family):
    tok = tiny_tokenizer(family)
    good, offsets, a, c, e = rendered(tok)
    assert good.mask[-1] == 0
    mask = list(good.mask)
    mask[mask.index(1) + good.n_trainable] = 1  # the "\n" after the marker
    with pytest.raises(RenderError, match="outside the answer"):
        check_mask(with_mask(good, mask), offsets, [(a, c, e)])


# --- save_tiny / tiny_model -------------------------------------------------------------


def test_save_tiny_roundtrips_tokenizer_template_and_model(tmp_path, family):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = save_tiny(tmp_path, family)
    tok, tok2 = tiny_tokenizer(family), AutoTokenizer.from_pretrained(path)
    assert tok2.chat_template == tok.chat_template
    assert stop_token_ids(tok2) == stop_token_ids(tok)
    assert student_view(tok2) == student_view(tok)
    a = render_example(tok, conversation(), "Grüße 😀 {x}", "rt")
    b = render_example(tok2, conversation(), "Grüße 😀 {x}", "rt")
    assert (a.tokens, a.mask) == (b.tokens, b.mask)

    model = AutoModelForCausalLM.from_pretrained(path)
    ref = tiny_model(tok)
    assert model.dtype == torch.float32
    assert model.config.vocab_size == len(tok)
    assert (model.config.eos_token_id, model.config.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    ids = torch.tensor([a.tokens])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model: more threads only add contention
    try:
        with torch.no_grad():
            logits = model(ids).logits
            ref_logits = ref(ids).logits
    finally:
        torch.set_num_threads(threads)
    assert logits.shape == (1, len(a.tokens), len(tok))
    assert torch.allclose(logits, ref_logits, atol=1e-5)


def test_tiny_model_is_seeded():
    import torch

    tok = tiny_tokenizer("chatml")
    a, b, c = tiny_model(tok, seed=0), tiny_model(tok, seed=0), tiny_model(tok, seed=1)
    assert not a.training
    assert a.config.tie_word_embeddings and a.lm_head.weight.data_ptr() == a.model.embed_tokens.weight.data_ptr()
    w = lambda m: m.model.layers[0].self_attn.q_proj.weight  # noqa: E731
    assert torch.equal(w(a), w(b)) and not torch.equal(w(a), w(c))
