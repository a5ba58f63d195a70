"""The students one `distill serve` holds: the runs checked before anything loads (one base
model, one name each, an adapter that is there and whole), their adapters on that one base,
and the distilled prompt dropped from a request that still carries it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .models import ADAPTER_FILES, AdapterError, check_adapter, resolve_model
from .rundir import RunDir

if TYPE_CHECKING:
    from .backends.base import SamplingParams
    from .config import RunConfig


FIRST_ADAPTER = "default"  # peft's name for the adapter Models loads with the base (the first run's)


@dataclass
class Student:
    """One run's student as served: its name, run, config and adapter in the shared model."""

    name: str  # "<run name>-student", the request's `model`
    run: RunDir
    cfg: RunConfig
    adapter: str
    defaults: SamplingParams  # the run's sampling section: what a request leaves unset


def check_runs(runs: list[tuple[RunConfig, RunDir]], teacher: bool) -> None:
    """Refuse, naming the run, anything that would make a server serve some students and not
    others: a run name served twice, a run without its adapter or with a corrupt adapter file,
    a student on another base model (or dtype, device) than the first run's, and with
    --teacher a teacher other than the first run's (one teacher is served for all runs)."""
    from safetensors import safe_open

    seen: dict[str, Path] = {}
    first_base = first_teacher = None
    for cfg, run in runs:
        where = f"run {cfg.name!r} ({run.root})"
        if cfg.name in seen:
            raise AdapterError(f"{where}: a run named {cfg.name!r} is already served from {seen[cfg.name]}; "
                               f"every run needs its own name (its students are '<run name>-student')")
        seen[cfg.name] = run.root
        try:
            base = check_adapter(run.student, cfg.student.model)
        except AdapterError as e:
            raise AdapterError(f"{where}: {e}") from None
        weights = run.student / ADAPTER_FILES[1]
        try:
            with safe_open(weights, "pt") as f:  # reads the header; a truncated file fails on its tensors
                for key in f.keys():
                    f.get_tensor(key)
        except Exception as e:  # noqa: BLE001  safetensors raises its own error types and OSError
            raise AdapterError(f"{where}: the adapter file {weights} is corrupt or truncated ({type(e).__name__}: {e}); "
                               f"re-train it or restore it") from None
        this_base = (base.resolve(), cfg.student.dtype, cfg.student.device)
        if first_base is None:
            first_base = this_base
        elif this_base != first_base:
            raise AdapterError(f"{where}: its student is {this_base[0]} ({cfg.student.dtype}, device "
                               f"{cfg.student.device}), but the first run's is {first_base[0]} ({first_base[1]}, "
                               f"device {first_base[2]}); one server serves students of one base model: serve it apart")
        if teacher:
            this_teacher = (resolve_model(cfg.teacher.model).resolve(), cfg.teacher.dtype, cfg.teacher.device)
            if first_teacher is None:
                first_teacher = this_teacher
            elif this_teacher != first_teacher:
                raise AdapterError(f"{where}: --teacher serves one teacher for every run, the first run's "
                                   f"({first_teacher[0]}), and this run's is {this_teacher[0]}; serve it apart")


def load_students(model, runs: list[tuple[RunConfig, RunDir]]) -> dict[str, Student]:
    """The students by served name. `model` is the first run's student as Models loaded it
    (the base with that run's adapter); every other run's adapter is added beside it."""
    from .answerers import sampling_params
    from .backends.local_model import peft_wrapping

    students = {}
    for i, (cfg, run) in enumerate(runs):
        adapter = FIRST_ADAPTER if i == 0 else f"student{i}"  # peft names must not contain dots; run names may
        if i:
            try:
                with peft_wrapping():
                    model.load_adapter(str(run.student), adapter_name=adapter)
            except Exception as e:  # noqa: BLE001  whatever peft or safetensors raise, named for the run
                raise AdapterError(f"run {cfg.name!r} ({run.root}): cannot load its adapter {run.student}: "
                                   f"{type(e).__name__}: {e}") from None
        students[f"{cfg.name}-student"] = Student(f"{cfg.name}-student", run, cfg, adapter, sampling_params(cfg))
    return students


def normalised(text: str) -> str:
    return " ".join(text.split())


def without_distilled_prompt(messages: list[dict], prompt: str) -> list[dict] | None:
    """`messages` without their leading system message when it is the distilled prompt (equal
    after whitespace normalisation): what the student was trained to answer. None when there
    is nothing to drop."""
    if messages and messages[0]["role"] == "system" and normalised(messages[0]["content"]) == normalised(prompt):
        return messages[1:]
    return None
