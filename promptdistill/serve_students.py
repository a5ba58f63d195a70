"""The students one `distill serve` holds: the runs checked before anything loads (one base
model, one name each, an adapter that is there and whole), their adapters on that one base,
and the distilled prompt dropped from a request that still carries it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .config_errors import ConfigError
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


@dataclass(frozen=True)
class SharedModels:
    """What every served run must share with the first one: its student's base model (path,
    dtype, device) and, with --teacher, its teacher (None without)."""

    base: tuple[Path, str, str]
    teacher: tuple[Path, str, str] | None


def check_runs(runs: list[tuple[RunConfig, RunDir]], teacher: bool, shared: SharedModels | None = None,
               served: dict[str, Path] | None = None) -> SharedModels:
    """Refuse, naming the run, anything that would make a server serve some students and not
    others: a run name served twice, a run without its adapter or with a corrupt adapter file,
    a student on another base model (or dtype, device) than the first run's, and with
    --teacher a teacher other than the first run's (one teacher is served for all runs) or one
    served elsewhere. At start `shared` is None (the first run sets it) and nothing is served
    yet; a run loaded into a running server is checked against its `shared` and the run names
    it `served` (by run dir). Returns what the runs share."""
    from safetensors import safe_open

    seen = dict(served or {})
    for cfg, run in runs:
        where = f"run {cfg.name!r} ({run.root})"
        if cfg.name in seen:
            raise AdapterError(f"{where}: a run named {cfg.name!r} is already served from {seen[cfg.name]}; "
                               f"every run needs its own name (its students are '<run name>-student')")
        seen[cfg.name] = run.root
        if teacher and cfg.teacher.backend != "local":
            raise ConfigError(f"--teacher: run {cfg.name!r}'s teacher {cfg.teacher.served_name!r} is served by "
                               f"{cfg.teacher.base_url} already (backend {cfg.teacher.backend}); serve the student alone")
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
        this = SharedModels((base.resolve(), cfg.student.dtype, cfg.student.device),
                            (resolve_model(cfg.teacher.model).resolve(), cfg.teacher.dtype, cfg.teacher.device)
                            if teacher else None)
        if shared is None:
            shared = this
        elif this.base != shared.base:
            raise AdapterError(f"{where}: its student is {this.base[0]} ({cfg.student.dtype}, device "
                               f"{cfg.student.device}), but the first run's is {shared.base[0]} ({shared.base[1]}, "
                               f"device {shared.base[2]}); one server serves students of one base model: serve it apart")
        elif this.teacher != shared.teacher:
            raise AdapterError(f"{where}: --teacher serves one teacher for every run, the first run's "
                               f"({shared.teacher[0]}), and this run's is {this.teacher[0]}; serve it apart")
    return shared


def load_students(model, runs: list[tuple[RunConfig, RunDir]]) -> dict[str, Student]:
    """The students by served name. `model` is the first run's student as Models loaded it
    (the base with that run's adapter, peft's FIRST_ADAPTER); every other run's adapter is
    added beside it, named `student<i>`."""
    students = [student_of(*runs[0], FIRST_ADAPTER)]
    students += [load_student(model, cfg, run, f"student{i}") for i, (cfg, run) in enumerate(runs) if i]
    return {s.name: s for s in students}


def student_of(cfg: RunConfig, run: RunDir, adapter: str) -> Student:
    from .answerers import sampling_params

    return Student(f"{cfg.name}-student", run, cfg, adapter, sampling_params(cfg))


def load_student(model, cfg: RunConfig, run: RunDir, adapter: str) -> Student:
    """Run `cfg`'s adapter added to `model` (the shared base) as `adapter`, a name peft allows
    (no dots; run names may have them). A load that fails leaves the model as it was."""
    from .backends.local_model import peft_wrapping

    try:
        with peft_wrapping():
            model.load_adapter(str(run.student), adapter_name=adapter)
    except Exception as e:  # noqa: BLE001  whatever peft or safetensors raise, named for the run
        if adapter in model.peft_config:  # peft registers the adapter before it fills it
            model.delete_adapter(adapter)
        raise AdapterError(f"run {cfg.name!r} ({run.root}): cannot load its adapter {run.student}: "
                           f"{type(e).__name__}: {e}") from None
    return student_of(cfg, run, adapter)


def unload_adapter(model, adapter: str) -> None:
    """`adapter` deleted from `model` (its weights freed). If it was the active adapter, another
    one is made active first (peft would pick one itself, with a warning): when one adapter is
    left the server decodes through the active one."""
    if model.active_adapter == adapter:
        model.set_adapter(next(a for a in model.peft_config if a != adapter), inference_mode=True)
    model.delete_adapter(adapter)


def adapter_memory(model) -> dict:
    """The LoRA adapters `model` holds and the bytes of their weights (/metrics: an unloaded
    student's adapter must give its memory back)."""
    loras = [p for name, p in model.named_parameters() if ".lora_" in name]
    return {"loaded": len(model.peft_config), "bytes": sum(p.numel() * p.element_size() for p in loras)}


def normalised(text: str) -> str:
    return " ".join(text.split())


def without_distilled_prompt(messages: list[dict], prompt: str) -> list[dict] | None:
    """`messages` without their leading system message when it is the distilled prompt (equal
    after whitespace normalisation): what the student was trained to answer. None when there
    is nothing to drop."""
    if messages and messages[0]["role"] == "system" and normalised(messages[0]["content"]) == normalised(prompt):
        return messages[1:]
    return None
