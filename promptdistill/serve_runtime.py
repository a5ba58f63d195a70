"""Students loaded into and unloaded from a running `distill serve` (--allow-runtime-students),
in the manner of vLLM's dynamic LoRA endpoints, with a run dir where vLLM takes an adapter
path (a student is a run: its adapter, its distilled prompt, its sampling settings):

  POST /v1/load_lora_adapter    {"lora_path": RUN_DIR, "lora_name": "<run name>-student" (optional)}
  POST /v1/unload_lora_adapter  {"lora_name": "<run name>-student"}

Both answer {"object": "list", "data": [model cards]}: the names added or removed (the student,
and with --teacher its run's teacher). Behind the bearer token like /v1.

A run is loaded only if it passes the checks the runs given at start pass (serve_students.
check_runs: the same base, dtype and device; its adapter there and whole; its name not served;
with --teacher the same teacher); else 400 naming the run and the reason, and nothing changes.
Unloading a name stops new requests for it at once (404, as for any unknown model); requests
already waiting or decoding for it finish first, and its adapter is then deleted from the
model. The last student is not unloaded (a server with none would serve nothing).

The decoding thread is the only one that runs the model: it adds and deletes adapters itself,
between two batches (Batcher.between_batches). One change is made at a time.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING, Callable

from fastapi import FastAPI, Request
from pydantic import BaseModel, Field

from .serve_openai import ApiError, parse_body

if TYPE_CHECKING:
    from .serve_server import Server
    from .serve_students import Student

RUNTIME_OFF = ("this server does not load or unload students while serving; start `distill serve` with "
               "--allow-runtime-students")


class LoadRequest(BaseModel):
    lora_path: str = Field(min_length=1)  # the run dir
    lora_name: str | None = None  # if given, must be the name the run is served as


class UnloadRequest(BaseModel):
    lora_name: str = Field(min_length=1)


class RuntimeStudents:
    """Adds and removes a running server's students (and with --teacher their runs' teachers)."""

    def __init__(self, server: Server):
        self.server = server
        self.changing = asyncio.Lock()  # one load or unload at a time: each checks what the last one left

    async def load(self, req: LoadRequest) -> list[str]:
        from .config_file import load_config
        from .rundir import RunDir
        from .serve_students import check_runs
        from .terminal import USER_ERRORS

        s = self.server
        async with self.changing:
            try:
                cfg = await asyncio.to_thread(load_config, req.lora_path)
                run = RunDir(cfg.run_path)
                name = f"{cfg.name}-student"
                if req.lora_name not in (None, name):
                    raise ApiError(400, f"run {cfg.name!r} ({run.root}) is served as {name!r}, not {req.lora_name!r} "
                                        f"(a student is served under its run's name)", param="lora_name")
                served = {st.cfg.name: st.run.root for st in s.students.values()}
                await asyncio.to_thread(check_runs, [(cfg, run)], s.teacher, s.shared, served)
                adapter = f"student{s.adapters_made}"
                s.adapters_made += 1
                student = await asyncio.wrap_future(s.batcher.between_batches(lambda: self._add(cfg, run, adapter)))
            except USER_ERRORS as e:
                raise ApiError(400, f"cannot load {req.lora_path!r}: {e}", param="lora_path") from None
            added = s.serve_students([student])
            for n in added:
                s.metrics.add(n)
        print(f"loaded {', '.join(added)} from {run.root}", file=sys.stderr, flush=True)
        return added

    async def unload(self, req: UnloadRequest) -> list[str]:
        s, name = self.server, req.lora_name
        async with self.changing:
            student = s.students.get(name)
            if student is None and s.names.get(name) == "teacher":
                raise ApiError(400, f"{name!r} is a run's teacher: unload its run's student and the teacher goes with it",
                               param="lora_name")
            if student is None:
                raise ApiError(404, f"no student {name!r} is served; this server has {sorted(s.students)}",
                               code="model_not_found", param="lora_name")
            if len(s.students) == 1:
                raise ApiError(400, f"{name!r} is the last student served; a server with none serves nothing: stop "
                                    f"it instead", param="lora_name")
            its_teacher = f"{student.cfg.name}-teacher"
            removed = [name] + ([its_teacher] if its_teacher in s.teacher_prompts else [])
            # From here on a request for it is refused; the ones already submitted are decoded first.
            for n in removed:
                del s.names[n]
                s.teacher_prompts.pop(n, None)
            del s.students[name]

            def its_own(job) -> bool:
                return job.adapter == student.adapter

            waited = s.batcher.waiting_for(its_own)
            await asyncio.wrap_future(s.batcher.between_batches(lambda: self._delete(student), after=its_own))
        print(f"unloaded {', '.join(removed)} (run {student.run.root}) once the {waited} requests waiting for it "
              f"were answered", file=sys.stderr, flush=True)
        return removed

    # --- on the decoding thread, between batches -------------------------------------------

    def _add(self, cfg, run, adapter: str) -> Student:
        from .serve_students import load_student

        student = load_student(self.server.models.student, cfg, run, adapter)
        self._adapters_changed()
        return student

    def _delete(self, student: Student) -> None:
        from .serve_students import unload_adapter

        unload_adapter(self.server.models.student, student.adapter)
        self._adapters_changed()

    def _adapters_changed(self) -> None:
        from .serve_students import adapter_memory

        s, model = self.server, self.server.models.student
        s.samplers["student"].adapters_changed()
        s.adapters = adapter_memory(model)


def add_runtime_students(app: FastAPI, server: Server, authorize: Callable[[Request], None], allowed: bool) -> None:
    """POST /v1/load_lora_adapter and /v1/unload_lora_adapter; without `allowed` both answer 404
    saying how to turn them on."""
    students = RuntimeStudents(server)

    async def change(request: Request, shape: type[BaseModel], how) -> dict:
        authorize(request)
        if not allowed:
            raise ApiError(404, RUNTIME_OFF, code="runtime_students_off")
        req = parse_body(await request.body(), shape)
        # Shielded: a client that hangs up does not stop a change half-made (an adapter loaded
        # and never served, or a name gone and its adapter kept).
        names = await asyncio.shield(asyncio.ensure_future(how(req)))
        return {"object": "list", "data": [server.model_card(n) for n in names]}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        return await change(request, LoadRequest, students.load)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        return await change(request, UnloadRequest, students.unload)
