"""The teacher WITH its system prompt, one object for every stage that asks it: generate has it
answer the queries, train has it judge tokens (the distribution-level objectives: kl, on_policy,
jsd), eval, chat and serve have it answer and score beside the student.

Its conversation is built here only (`with_prompt`: the system prompt, then the conversation the
student would see; `teacher_messages` for a single query).
Two kinds:

  LocalTeacher   a model on this machine: it samples, and gives its whole next-token
                 distribution at each given token. When teacher and student are the same
                 model, the student's model with its adapter switched off is the teacher:
                 no second copy.
  RemoteTeacher  a teacher on a server: behind an OpenAI-compatible endpoint it only samples
                 (what it recorded with its answers, teacher.jsonl's top-k, is all the
                 scorers have of it); on Tinker it also gives the log-probability of each
                 given token (compute_logprobs), not its whole distribution.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from .backends import make_sampler
from .backends.base import Sampler
from .backends.local_model import load_causal_lm
from .backends.local_sampler import LocalSampler
from .backends.local_scorer import AnswerScorer
from .config import RunConfig
from .models import resolve_model
from .render import Datum, RenderError, render_conversation, sampled_datum, to_datum
from .rundir import StageError


def with_prompt(cfg: RunConfig, conversation: list[dict]) -> list[dict]:
    return [{"role": "system", "content": cfg.system_prompt}, *conversation]


def teacher_messages(cfg: RunConfig, query: str) -> list[dict]:
    return with_prompt(cfg, [{"role": "user", "content": query}])


class Teacher:
    local: bool  # its weights are on this machine
    whole_distribution: bool  # its logits over the vocabulary, not only the given tokens' log-probabilities
    base_of_adapter = False  # the student's own model with its adapter off

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    def with_prompt(self, conversation: list[dict]) -> list[dict]:
        return with_prompt(self.cfg, conversation)

    def datum(self, conversation: list[dict], answer: list[int]) -> Datum:
        """The answer's tokens after the conversation (as the student sees it) WITH the prompt, token for token."""
        return sampled_datum(self.tokenizer, self.with_prompt(conversation), answer)

    def context(self):
        """What must hold while it samples or scores (the adapter off, for the student's own model)."""
        return contextlib.nullcontext()


class LocalTeacher(Teacher):
    local = whole_distribution = True

    def __init__(self, cfg: RunConfig, model, tokenizer, base_of_adapter: bool):
        super().__init__(cfg)
        self.model, self.tokenizer, self.base_of_adapter = model, tokenizer, base_of_adapter
        self.scorer = AnswerScorer(model)

    def sampler(self) -> LocalSampler:
        """A sampler of its answers (token-level decoding, streaming callbacks); use it inside `context()`."""
        return LocalSampler(self.model, self.tokenizer, self.cfg.sampling.batch_size)

    def context(self):
        return self.model.disable_adapter() if self.base_of_adapter else contextlib.nullcontext()

    def rendered(self, messages: list[dict], trained: dict[int, bool], example_id: str) -> Datum:
        """A training example's conversation rendered WITH the prompt, its trained turns weighted as
        the student's example weighs them (`trained`: their indices in `messages`, as render_conversation)."""
        try:
            shifted = {i + 1: with_end for i, with_end in trained.items()}  # past the system message
            return to_datum(render_conversation(self.tokenizer, self.with_prompt(messages), shifted, example_id))
        except RenderError as err:
            raise StageError(str(err)) from None

    @torch.no_grad()
    def logits(self, datums: list[Datum]) -> list[torch.Tensor]:
        """Its logits at the weighted positions of each datum (the prompt's keys and values computed
        once and shared by the batch)."""
        was_training = self.model.training
        self.model.eval()
        with self.context():
            s = self.scorer.scored(datums, share_prefix=True)
        self.model.train(was_training)
        return [logits for logits, _ in s.per_row(len(datums))]

    def distributions(self, conversations: list[list[dict]], answers: list[list[int]]) -> list[torch.Tensor]:
        """Its log-probabilities over the vocabulary at each answer token, WITH the prompt."""
        return [torch.log_softmax(lp, -1) for lp in self.logits([self.datum(c, a) for c, a in zip(conversations, answers)])]

    def token_logprobs(self, conversations: list[list[dict]], answers: list[list[int]]) -> list[torch.Tensor]:
        """Its log-probability of each answer token, WITH the prompt."""
        return [d.gather(-1, torch.tensor(a)[:, None]).squeeze(-1)
                for d, a in zip(self.distributions(conversations, answers), answers)]


class RemoteTeacher(Teacher):
    """A teacher on a server (teacher.backend openai or tinker), reached on first use: a chat that
    never asks the teacher needs neither its server nor its key."""

    local = whole_distribution = False

    @functools.cached_property
    def endpoint(self) -> Sampler:
        return make_sampler(self.cfg.teacher, self.cfg.sampling.batch_size)

    def sampler(self) -> Sampler:
        return self.endpoint

    @property
    def tokenizer(self):
        return self.endpoint.tokenizer

    def token_logprobs(self, conversations: list[list[dict]], answers: list[list[int]]) -> list[torch.Tensor]:
        """Its log-probability of each answer token, WITH the prompt (a server that scores given tokens: Tinker)."""
        if not hasattr(self.endpoint, "target_logprobs"):
            raise StageError(f"the teacher {self.cfg.teacher.served_name!r} (teacher.backend {self.cfg.teacher.backend}) "
                             f"cannot score given tokens")
        datums = [self.datum(c, a) for c, a in zip(conversations, answers)]
        return [torch.tensor(lps) for lps in self.endpoint.target_logprobs(datums)]


def load(cfg: RunConfig, student: tuple | None = None, tinker_on_local_copy: bool = False) -> Teacher:
    """The run's teacher. `student`: the student's (model, tokenizer) when already loaded here: a
    teacher that is the same model is then that model with its adapter off. A teacher on Tinker
    runs on its local copy (`teacher.model`) with `tinker_on_local_copy` (eval, chat, serve)."""
    backend = cfg.teacher.backend
    if backend == "openai" or (backend == "tinker" and not tinker_on_local_copy):
        return RemoteTeacher(cfg)
    if student is not None and cfg.teacher.model == cfg.student.model:
        return LocalTeacher(cfg, *student, base_of_adapter=True)
    model, tokenizer = load_causal_lm(resolve_model(cfg.teacher.model), cfg.teacher.device, dtype=cfg.teacher.dtype)
    return LocalTeacher(cfg, model, tokenizer, base_of_adapter=False)


def for_training(cfg: RunConfig, trainer, judges_samples: bool) -> Teacher | None:
    """The teacher the objectives ask while the student trains: the local one; one on Tinker when
    an objective needs its judgement of the student's own samples (`judges_samples`: it can score
    given tokens there); else None (its judgement then comes only from what generate recorded)."""
    if cfg.teacher.backend == "tinker" and judges_samples:
        return load(cfg)
    if cfg.teacher.backend != "local":
        return None
    return load(cfg, (trainer.model, trainer.tokenizer) if cfg.student.backend == "local" else None)
