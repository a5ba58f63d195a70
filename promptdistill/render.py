"""Chat rendering and loss masks: the one place that knows about chat templates.

The mask is found by rendering, never by guessing token ids: we render the prompt
(with the generation prompt) and the full conversation, check that the first is a
prefix of the second, locate the answer text and the end-of-turn marker that follows
it, and mark exactly the tokens whose characters lie in that span. Then we check the
result: no trainable token, or a trainable token outside the answer, is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

Message = dict[str, str]


class RenderError(ValueError):
    """A conversation that cannot be rendered into a correct training example."""


@dataclass(frozen=True)
class Example:
    """A rendered conversation: `tokens` and a 0/1 `mask` marking the answer tokens."""

    id: str
    tokens: list[int]
    mask: list[int]

    @property
    def n_trainable(self) -> int:
        return sum(self.mask)


@dataclass(frozen=True)
class Datum:
    """What a trainer consumes, in Tinker's shape: the model reads `input_tokens` and is
    scored on predicting `target_tokens` (the inputs shifted by one), weighted by `weights`."""

    input_tokens: list[int]
    # One token per position, or K per position for soft labels (a teacher's top-K tokens,
    # each weighted by its probability: Tinker's 2-D cross_entropy targets).
    target_tokens: list[int] | list[list[int]]
    weights: list[float] | list[list[float]]
    # loss "reverse_kl" (local trainer only): the teacher's log-probabilities over the whole
    # vocabulary at each weighted position, a [positions, vocab] tensor.
    teacher_logprobs: object = None
    # loss "importance_sampling" (Tinker's policy-gradient loss, -sum(exp(logp - sampling_logprobs) * advantages)),
    # one value per position, 0 where the weight is 0: the sampler's log-probability of each target and its advantage.
    sampling_logprobs: list[float] | None = None
    advantages: list[float] | None = None

    @property
    def soft(self) -> bool:
        """K targets per position (soft labels), not one."""
        return isinstance(self.target_tokens[0], (list, tuple))

    def trained_positions(self) -> int:
        """How many positions the loss reads (a weight above 0)."""
        return sum(1 for w in self.weights if (max(w) if self.soft else w) > 0)

    def scaled(self, factor: float) -> "Datum":
        """The same datum with every weight times `factor` (and every advantage, which carries its
        weight). K weights per position are scaled in float32, the precision they were made in."""
        if self.soft:
            import torch

            weights = (torch.tensor(self.weights, dtype=torch.float32) * factor).tolist()
        else:
            weights = [w * factor for w in self.weights]
        advantages = None if self.advantages is None else [a * factor for a in self.advantages]
        return replace(self, weights=weights, advantages=advantages)

    def reweighted(self, factors: list[float]) -> "Datum":
        """The same datum with position i's weight (or K weights) times `factors[i]`, one factor a
        target position (per-turn loss weights)."""
        if len(factors) != len(self.weights):
            raise ValueError(f"{len(factors)} factors for a datum of {len(self.weights)} positions")
        if self.soft:
            weights = [[w * f for w in ws] for ws, f in zip(self.weights, factors)]
        else:
            weights = [w * f for w, f in zip(self.weights, factors)]
        advantages = None if self.advantages is None else [a * f for a, f in zip(self.advantages, factors)]
        return replace(self, weights=weights, advantages=advantages)


def render_text(tokenizer, messages: list[Message], generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "this tokenizer"
        raise RenderError(f"model {name}: its tokenizer has no chat template (a base model?); "
                          f"distillation needs a chat model whose template can render a system prompt")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def encode(tokenizer, text: str) -> list[int]:
    # The rendered text already holds BOS and every special token the template wants.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, messages: list[Message]) -> list[int]:
    """Token ids of a conversation up to and including the assistant's generation prompt."""
    return encode(tokenizer, render_text(tokenizer, messages, generation_prompt=True))


def _special_strings(tokenizer) -> list[str]:
    added = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    return sorted(set(added) | set(tokenizer.all_special_tokens), key=len, reverse=True)


def _end_of_turn(tokenizer, tail: str, example_id: str) -> str:
    """The special token that closes the assistant turn: the first one in `tail`."""
    hits = [(tail.find(s), s) for s in _special_strings(tokenizer) if s and tail.find(s) >= 0]
    if not hits:
        raise RenderError(
            f"example {example_id}: the chat template puts no special end-of-turn token after the answer "
            f"(text after the answer: {tail[:40]!r}); the student could never learn to stop"
        )
    return min(hits)[1]


def _answer_span(tokenizer, prompt: list[Message], answer: str, example_id: str) -> tuple[str, int, int, int]:
    """Render; return (full text, where the answer turn starts, where its text starts,
    where its end-of-turn token ends)."""
    full = render_text(tokenizer, prompt + [{"role": "assistant", "content": answer}], generation_prompt=False)
    return (full, *_turn_span(tokenizer, full, prompt, answer, True, example_id))


def _turn_span(tokenizer, full: str, before: list[Message], answer: str, with_end: bool,
               example_id: str) -> tuple[int, int, int]:
    """In the rendering `full`, the assistant turn that follows the messages `before`: where the
    turn starts (after its generation prompt), where its text starts, and where the trained span
    ends (after its end-of-turn token, or after its text)."""
    if not answer.strip():
        raise RenderError(f"example {example_id}: the answer is empty")
    head = render_text(tokenizer, before, generation_prompt=True)
    if not full.startswith(head):
        raise RenderError(
            f"example {example_id}: the chat template renders the conversation differently from its generation "
            f"prompt, so the answer cannot be located (prompt ends {head[-40:]!r})"
        )
    content = answer.strip()  # several templates trim the message content
    start = full.find(content, len(head))
    if start < 0 or full[len(head):start].strip():
        raise RenderError(f"example {example_id}: the answer text does not follow the generation prompt in the rendering")
    end = start + len(content)
    if with_end:
        marker = _end_of_turn(tokenizer, full[end:], example_id)
        end = full.index(marker, end) + len(marker)
    return len(head), start, end


def render_example(tokenizer, prompt: list[Message], answer: str, example_id: str) -> Example:
    """Render prompt + answer and mask everything but the answer and its end-of-turn token."""
    return render_conversation(tokenizer, prompt + [{"role": "assistant", "content": answer}], {len(prompt): True},
                               example_id)


def render_conversation(tokenizer, messages: list[Message], trained: dict[int, bool], example_id: str) -> Example:
    """Render a whole conversation and mask everything but its trained assistant turns: `trained`
    maps a message's index to whether its end-of-turn token is trained too (an answer cut off at
    max_tokens did not end itself; the template's end-of-turn after it is not the teacher's)."""
    full = render_text(tokenizer, messages, generation_prompt=False)
    spans = []
    for i, with_end in sorted(trained.items()):
        if messages[i]["role"] != "assistant":
            raise RenderError(f"example {example_id}: message {i} is trained but is a {messages[i]['role']} turn")
        spans.append(_turn_span(tokenizer, full, messages[:i], messages[i]["content"], with_end, example_id))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    tokens, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = [int(b > a and any(turn <= a and b <= end for turn, _, end in spans)) for a, b in offsets]
    example = Example(example_id, tokens, mask)
    check_mask(example, offsets, spans)
    return example


def check_mask(example: Example, offsets: list[tuple[int, int]], spans: list[tuple[int, int, int]]) -> None:
    """Each trained turn's tokens must be one contiguous run that lies inside that assistant turn
    and covers its text from the first character through the span's end (its end-of-turn token,
    where that is trained); no token outside the turns may be trained. `spans`: per trained turn,
    (where the turn starts, where its text starts, where the trained span ends)."""
    if example.n_trainable == 0:
        raise RenderError(f"example {example.id}: the loss mask has no trainable token")
    marked = [i for i, m in enumerate(example.mask) if m]
    for i in marked:
        a, b = offsets[i]
        if not any(turn <= a and b <= end for turn, _, end in spans):
            raise RenderError(f"example {example.id}: trainable tokens outside the answer (characters {a}..{b})")
    for turn, content_start, end in spans:
        run = [i for i in marked if offsets[i][0] >= turn and offsets[i][1] <= end]
        if (not run or len(run) != run[-1] - run[0] + 1 or offsets[run[0]][0] > content_start
                or offsets[run[-1]][1] != end):
            raise RenderError(
                f"example {example.id}: trainable tokens do not cover the whole answer and its end-of-turn token "
                f"(in this template a token may straddle the prompt/answer boundary)"
            )


def to_datum(example: Example, weight: float = 1.0) -> Datum:
    return Datum(
        input_tokens=example.tokens[:-1],
        target_tokens=example.tokens[1:],
        weights=[m * weight for m in example.mask[1:]],
    )


def sampled_datum(tokenizer, messages: list[Message], answer: list[int], weight: float = 1.0) -> Datum:
    """A sampled answer after `messages`, token for token: its ids are the sampler's, never a
    re-tokenisation of its text, so a score or a loss sees exactly what was sampled."""
    prompt = prompt_ids(tokenizer, messages)
    ids = prompt + answer
    return Datum(ids[:-1], ids[1:], [0.0] * (len(prompt) - 1) + [weight] * len(answer))


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: EOS plus the template's end-of-turn marker."""
    probe = [{"role": "user", "content": "Hi"}]
    full, _, content_start, end = _answer_span(tokenizer, probe, "Hello there", "probe")
    # Special by the tokenizer's added-token table, as in `_end_of_turn`: Llama 3's <|eot_id|>
    # is a special added token without being EOS or in `all_special_ids`.
    special = set(tokenizer.all_special_ids) | set(tokenizer.convert_tokens_to_ids(_special_strings(tokenizer)))
    ids = set(encode(tokenizer, full[content_start + len("Hello there"):end])) & special
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def student_view(tokenizer) -> str:
    """What a student with NO system prompt really reads: many templates insert a default
    system prompt when none is given, and the student is trained and served with it."""
    return render_text(tokenizer, [{"role": "user", "content": "{query}"}], generation_prompt=True)
