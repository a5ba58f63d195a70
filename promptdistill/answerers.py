"""What every stage that answers a run's queries shares (generate, eval, chat, serve): the
conversation each answerer sees, the run's sampling settings and seeds, and the finished
run's models loaded once. The four answerers:
  teacher   the teacher model WITH the system prompt
  student   the student model + adapter, NO prompt
  base      the student model, NO adapter, NO prompt
(`teacher_again` in eval is the teacher with another seed.)
"""

from __future__ import annotations

import contextlib

from .backends.base import SamplingParams
from .backends.local import LocalSampler, load_causal_lm
from .config import RunConfig
from .models import check_adapter, resolve_model
from .rundir import RunDir


def teacher_messages(cfg: RunConfig, query: str) -> list[dict]:
    return [{"role": "system", "content": cfg.system_prompt}, {"role": "user", "content": query}]


def student_messages(query: str) -> list[dict]:
    return [{"role": "user", "content": query}]


def sampling_params(cfg: RunConfig) -> SamplingParams:
    """How to answer, for every stage that samples; only `generate` adds top_logprobs."""
    s = cfg.sampling
    return SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
                          repetition_penalty=s.repetition_penalty, seed=s.seed)


def answer_settings(cfg: RunConfig) -> dict:
    """The sampling settings an answer depends on: batching does not change one, and an
    unset option is left out so that adding an option keeps older runs' keys. best_of
    chooses among answers rather than shaping one, so it is in generate's inputs instead."""
    return cfg.sampling.model_dump(exclude={"batch_size", "best_of"}, exclude_none=True)


def row_seed(key: str, base_seed: int) -> int:
    return (int(key[:12], 16) + base_seed) % (2**63)


class Models:
    """The student base model with its adapter (switchable off for `base`) and the
    teacher, loaded once; when teacher and student are the same model, one copy serves both."""

    def __init__(self, cfg: RunConfig, run: RunDir):
        student_dir = check_adapter(run.student, cfg.student.model)
        self.student, self.tokenizer = load_causal_lm(student_dir, cfg.student.device, adapter_dir=run.student)
        if cfg.teacher.model == cfg.student.model:
            self.teacher, self.teacher_tokenizer, self.shared = self.student, self.tokenizer, True
        else:
            self.teacher, self.teacher_tokenizer = load_causal_lm(resolve_model(cfg.teacher.model), cfg.teacher.device)
            self.shared = False
        # KL over the full vocabulary needs both models to number the tokens alike.
        self.full_vocab = self.shared or self.teacher_tokenizer.get_vocab() == self.tokenizer.get_vocab()
        self.batch_size = cfg.sampling.batch_size

    def adapter(self, on: bool):
        return contextlib.nullcontext() if on else self.student.disable_adapter()

    def teacher_context(self):
        return self.student.disable_adapter() if self.shared else contextlib.nullcontext()

    def sampler(self, who: str) -> LocalSampler:
        if who == "teacher":
            return LocalSampler(self.teacher, self.teacher_tokenizer, self.batch_size)
        return LocalSampler(self.student, self.tokenizer, self.batch_size)

    def context(self, who: str):
        return self.teacher_context() if who == "teacher" else self.adapter(on=(who == "student"))
