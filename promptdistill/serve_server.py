"""What a running `distill serve` holds: the loaded models, what each served name means, the
batching worker, and how a chat request becomes that worker's job. serve.py puts it behind HTTP;
serve_runtime.py adds and removes its students while it serves."""

from __future__ import annotations

import random
import sys
import time
from typing import TYPE_CHECKING

from .serve_batcher import Batcher, Job
from .serve_metrics import Metrics
from .serve_openai import ApiError, ChatRequest, check_supported, text_of

if TYPE_CHECKING:
    from .serve_students import Student


class Server:
    """The loaded models, what each served name means, and the batching worker. `runs` (config,
    run dir) are checked by check_runs before anything loads (one base; the first run's models
    loaded, every other run's adapter added to them). serve_runtime.py adds and removes students
    while serving."""

    def __init__(self, runs: list, teacher: bool = False, max_batch: int = 16, max_queue: int = 256,
                 keep_system_prompt: bool = False):
        from .answerers import Models, sampling_params
        from .backends.local_sampler import LocalSampler
        from .serve_students import adapter_memory, check_runs, load_students

        self.shared, self.teacher = check_runs(runs, teacher), teacher
        cfg, run = runs[0]
        # Without --teacher, never load a separate teacher model: make Models see the student twice.
        models_cfg = cfg if teacher else cfg.model_copy(update={"teacher": cfg.student})
        self.models = Models(models_cfg, run)
        self.students: dict[str, Student] = {}
        self.names: dict[str, str] = {}  # served name -> "student" | "teacher"
        self.teacher_prompts: dict[str, str] = {}
        self.serve_students(list(load_students(self.models.student, runs).values()))
        self.adapters_made = len(runs)  # every adapter gets a new name: the prefix cache is keyed by it
        self.samplers = {"student": LocalSampler(self.models.student, self.models.tokenizer, self.models.batch_size)}
        if teacher:
            self.samplers["teacher"] = self.models.sampler("teacher")
        self.defaults = sampling_params(cfg)
        self.keep_system_prompt = keep_system_prompt
        self.started = int(time.time())
        self.metrics = Metrics(list(self.names))
        self.adapters = adapter_memory(self.models.student)  # /metrics; updated by the decoding thread
        # One student decodes through its adapter, the active one; several decode together, each
        # row through its own adapter (Job.adapter).
        self.batcher = Batcher(self.samplers, self.models, max_batch, max_queue)

    def serve_students(self, students: list[Student]) -> list[str]:
        """Serve `students` under their names and, with --teacher, the teacher under each one's run
        name ("<run>-teacher", which the page sends its run's system prompt); the names added,
        the students' first."""
        teachers = {f"{st.cfg.name}-teacher": st.cfg.system_prompt for st in students} if self.teacher else {}
        self.students |= {st.name: st for st in students}
        self.names |= dict.fromkeys((st.name for st in students), "student") | dict.fromkeys(teachers, "teacher")
        self.teacher_prompts |= teachers
        return [st.name for st in students] + list(teachers)

    def model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.started, "owned_by": "promptdistill"}

    def context_length(self, who: str) -> int | None:
        model = self.samplers[who].model
        return getattr(getattr(model, "config", None), "max_position_embeddings", None)

    def prepare(self, req: ChatRequest) -> tuple[Job, int | None]:
        """The request's job, and the prompt tokens saved when the distilled prompt was dropped
        from it (None when nothing was dropped), or an ApiError."""
        from .backends.base import SamplingParams
        from .render import prompt_ids
        from .serve_students import without_distilled_prompt

        who = self.names.get(req.model)
        if who is None:
            raise ApiError(404, f"The model {req.model!r} does not exist; this server has {sorted(self.names)}",
                           code="model_not_found", param="model")
        check_supported(req)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": text_of(m)} for m in req.messages]
        tokenizer = self.samplers[who].tokenizer

        def render(messages: list[dict]) -> list[int]:
            try:
                return prompt_ids(tokenizer, messages)
            except Exception as e:  # noqa: BLE001  RenderError, or the template's own raise_exception (jinja2)
                raise ApiError(400, f"cannot render these messages with the model's chat template: {e}",
                               param="messages") from None

        ids, saved = render(messages), None
        student = self.students.get(req.model)
        if student is not None:
            bare = None if self.keep_system_prompt else without_distilled_prompt(messages, student.cfg.system_prompt)
            if bare is not None:  # answered as trained: without the prompt it was distilled from
                bare_ids = render(bare)
                ids, saved, messages = bare_ids, len(ids) - len(bare_ids), bare
            system = [m for m in messages if m["role"] == "system"]
            if system:  # the length only: a system prompt may be confidential
                print(f"{req.model}: a request's system message ({len(system[0]['content'])} characters) is not the "
                      f"prompt this student was distilled from: answered with it, outside what the student was "
                      f"trained on", file=sys.stderr, flush=True)
        d = self.defaults if student is None else student.defaults
        max_tokens = req.max_completion_tokens or req.max_tokens or d.max_tokens
        limit = self.context_length(who)
        if limit is not None and len(ids) + max_tokens > limit:
            raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{len(ids) + max_tokens} tokens ({len(ids)} in the messages, {max_tokens} in the "
                                f"completion). Please reduce the length of the messages or completion.",
                           param="messages", code="context_length_exceeded")
        params = SamplingParams(
            temperature=d.temperature if req.temperature is None else req.temperature,
            top_p=d.top_p if req.top_p is None else req.top_p,
            max_tokens=max_tokens,
            repetition_penalty=d.repetition_penalty if req.repetition_penalty is None else req.repetition_penalty,
            top_logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        )
        seed = random.getrandbits(63) if req.seed is None else req.seed % 2**63
        # The caller submits the job before it next awaits: a student unloaded meanwhile waits for it.
        return Job(who, ids, params, seed, adapter=None if student is None else student.adapter), saved
