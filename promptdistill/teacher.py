"""The teacher WITH its system prompt, judging answers it is given: what the distribution-level
objectives (kl, on_policy, jsd) ask of it while the student trains.

It scores given tokens after its own conversation (`answerers.teacher_messages`: the system
prompt, then the query), in one of two ways:

  LocalTeacher   a model on this machine: its whole next-token distribution at each answer
                 token (`distributions`). When teacher and student are the same model, the
                 trainer's own model with its adapter switched off is the teacher: no second copy.
  RemoteTeacher  a teacher on Tinker (compute_logprobs): the log-probability of each given
                 token, not its whole distribution.

A teacher behind an OpenAI-compatible endpoint cannot score given tokens; what it recorded with
its answers (teacher.jsonl's top-k) is all the objectives have of it (`for_run` gives None).
"""

from __future__ import annotations

import contextlib

import torch

from .answerers import teacher_messages
from .backends import make_sampler
from .backends.local_model import load_causal_lm
from .backends.local_scorer import AnswerScorer
from .config import RunConfig
from .models import resolve_model
from .render import Datum, RenderError, render_example, sampled_datum, to_datum
from .rundir import StageError


class Teacher:
    whole_distribution: bool  # its logits over the vocabulary, not only the given tokens' log-probabilities

    def __init__(self, cfg: RunConfig, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer

    def datum(self, query: str, answer: list[int]) -> Datum:
        """The answer's tokens after the teacher's conversation, token for token."""
        return sampled_datum(self.tokenizer, teacher_messages(self.cfg, query), answer)


class LocalTeacher(Teacher):
    whole_distribution = True

    def __init__(self, cfg: RunConfig, model, tokenizer, base_of_adapter: bool):
        super().__init__(cfg, tokenizer)
        self.model, self.base_of_adapter = model, base_of_adapter
        self.scorer = AnswerScorer(model)

    def rendered(self, query: str, answer: str, example_id: str) -> Datum:
        """The answer's text rendered after the teacher's conversation (as the student's examples are)."""
        try:
            return to_datum(render_example(self.tokenizer, teacher_messages(self.cfg, query), answer, example_id))
        except RenderError as err:
            raise StageError(str(err)) from None

    @torch.no_grad()
    def logits(self, datums: list[Datum]) -> list[torch.Tensor]:
        """Its logits at the weighted positions of each datum (the prompt's keys and values computed
        once and shared by the batch)."""
        was_training = self.model.training
        self.model.eval()
        off = self.model.disable_adapter() if self.base_of_adapter else contextlib.nullcontext()
        with off:
            s = self.scorer.scored(datums, share_prefix=True)
        self.model.train(was_training)
        return [logits for logits, _ in s.per_row(len(datums))]

    def distributions(self, queries: list[str], answers: list[list[int]]) -> list[torch.Tensor]:
        """Its log-probabilities over the vocabulary at each answer token, WITH the prompt."""
        return [torch.log_softmax(lp, -1) for lp in self.logits([self.datum(q, a) for q, a in zip(queries, answers)])]

    def token_logprobs(self, queries: list[str], answers: list[list[int]]) -> list[torch.Tensor]:
        """Its log-probability of each answer token, WITH the prompt."""
        return [d.gather(-1, torch.tensor(a)[:, None]).squeeze(-1) for d, a in zip(self.distributions(queries, answers), answers)]


class RemoteTeacher(Teacher):
    """A teacher on a server that scores given tokens WITH its prompt (Tinker's compute_logprobs)."""

    whole_distribution = False

    def __init__(self, cfg: RunConfig, sampler):
        super().__init__(cfg, sampler.tokenizer)
        self.sampler = sampler

    def token_logprobs(self, queries: list[str], answers: list[list[int]]) -> list[torch.Tensor]:
        datums = [self.datum(q, a) for q, a in zip(queries, answers)]
        return [torch.tensor(lps) for lps in self.sampler.target_logprobs(datums)]


def for_run(cfg: RunConfig, trainer, judges_samples: bool) -> Teacher | None:
    """The local teacher; a teacher on Tinker when an objective needs its judgement of the student's
    own samples (`judges_samples`: it can score given tokens there); else None (its judgement then
    comes only from what generate recorded)."""
    if cfg.teacher.backend == "tinker" and judges_samples:
        return RemoteTeacher(cfg, make_sampler(cfg.teacher, cfg.sampling.batch_size))
    if cfg.teacher.backend != "local":
        return None
    if cfg.teacher.model == cfg.student.model and cfg.student.backend == "local":
        return LocalTeacher(cfg, trainer.model, trainer.tokenizer, base_of_adapter=True)
    model, tokenizer = load_causal_lm(resolve_model(cfg.teacher.model), cfg.teacher.device, dtype=cfg.teacher.dtype)
    return LocalTeacher(cfg, model, tokenizer, base_of_adapter=False)
