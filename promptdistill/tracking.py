"""Experiment tracking: `train` and `eval` also send their numbers where users already look.

`tracking:` in the config picks one backend; without it nothing is imported or written.

  tensorboard  event files under <run_dir>/tb (or tracking.dir), offline: `tensorboard --logdir runs/NAME/tb`
  wandb        Weights & Biases: project tracking.project (default: the run name), one W&B run per stage,
               grouped by the run name; its files under tracking.dir (default: the run dir)
  mlflow       MLflow: experiment tracking.project (default: the run name), one MLflow run per stage;
               tracking.dir is the tracking URI (default: MLflow's own, or $MLFLOW_TRACKING_URI)

Each vendor package is an extra (`pip install 'promptdistill[tensorboard]'`, `[wandb]`, `[mlflow]`),
imported here only when chosen. `train` logs every metrics.jsonl row as it is written
(`train/<key>`, at its step); `eval` logs the headline numbers of summary.json (`eval/...`) at
the last training step. Tracking settings are not stage inputs: turning it on, off or
elsewhere never invalidates a run; a stage that is already done is skipped and logs nothing.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from . import distributed
from .config import RunConfig
from .rundir import RunDir, StageError

TRAIN_KEYS = ("train_loss", "val_loss", "lr", "grad_norm")  # of a metrics.jsonl row
EVAL_SECTIONS = ("tokens", "latency", "cost")  # of summary.json, beside quality
MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # extras: the backend names


class Tracker:
    """What a stage calls; this base class tracks nothing (no `tracking:` section, or not rank 0)."""

    def log(self, values: dict[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


def _require(backend: str):
    try:
        return importlib.import_module(MODULES[backend])
    except ImportError as e:
        raise StageError(f"tracking.backend {backend!r} needs the {backend!r} package, which is not installed ({e}); "
                         f"pip install 'promptdistill[{backend}]', or remove the tracking section") from None


def check(cfg: RunConfig) -> None:
    """Raise before a stage spends anything if the chosen backend's package is not installed."""
    if cfg.tracking is not None and distributed.is_main():
        _require(cfg.tracking.backend)


class TensorBoard(Tracker):
    def __init__(self, logdir: Path, purge_step: int | None):
        writer = _require("tensorboard").SummaryWriter
        # TensorBoard drops earlier events at steps >= purge_step: a resumed train replaces what the
        # killed run logged after its checkpoint, and a fresh one (0) an earlier attempt's curves.
        self.writer = writer(str(logdir), purge_step=purge_step)

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a killed process keeps what it logged

    def close(self) -> None:
        self.writer.close()


class WandB(Tracker):
    def __init__(self, cfg: RunConfig, run: RunDir, stage: str):
        wandb = _require("wandb")
        t = cfg.tracking
        self.run = wandb.init(project=t.project or cfg.name, group=cfg.name, name=f"{cfg.name}-{stage}", job_type=stage,
                              dir=t.dir or str(run.root), config=public_config(cfg))

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow(Tracker):
    def __init__(self, cfg: RunConfig, run: RunDir, stage: str):
        self.mlflow = _require("mlflow")
        t = cfg.tracking
        if t.dir:
            self.mlflow.set_tracking_uri(t.dir)
        self.mlflow.set_experiment(t.project or cfg.name)
        self.mlflow.start_run(run_name=f"{cfg.name}-{stage}",
                              tags={"promptdistill.run": cfg.name, "promptdistill.stage": stage})
        self.mlflow.log_params({k: str(v) for k, v in flatten(public_config(cfg)).items()})

    def log(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def start(cfg: RunConfig, run: RunDir, stage: str, step: int = 0) -> Tracker:
    """The tracker for `stage` of this run, first logging at `step` (train: where it resumes)."""
    t = cfg.tracking
    if t is None or not distributed.is_main():
        return Tracker()
    if t.backend == "tensorboard":
        purge = (step + 1 if step else 0) if stage == "train" else None
        return TensorBoard(Path(t.dir) if t.dir else run.root / "tb", purge_step=purge)
    if t.backend == "wandb":
        return WandB(cfg, run, stage)
    return MLflow(cfg, run, stage)


def train_values(row: dict) -> dict[str, float]:
    """The tracked numbers of one metrics.jsonl row."""
    return {f"train/{k}": row[k] for k in TRAIN_KEYS if row.get(k) is not None}


def eval_values(summary: dict) -> dict[str, float]:
    """The headline numbers of summary.json: per score its retained, student, base and ceiling
    means (whatever scores there are), the kept skills' accuracies, then every number of the tokens,
    latency and cost sections."""
    values = {}
    for name, q in (summary.get("quality") or {}).items():
        for part in ("retained", "student", "base", "ceiling"):
            values[f"eval/{name}/{part}"] = (q.get(part) or {}).get("mean")
    ks = summary.get("kept_skills") or {}
    values |= {f"eval/kept_skills/{who}": (ks.get(who) or {}).get("accuracy") for who in ("base", "student", "teacher")}
    values["eval/kept_skills/student_minus_base"] = (ks.get("student_minus_base") or {}).get("mean")
    for section in EVAL_SECTIONS:
        values |= {f"eval/{section}/{k.replace('.', '/')}": v for k, v in flatten(summary.get(section) or {}).items()}
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def log_eval(cfg: RunConfig, run: RunDir, summary: dict) -> None:
    """Eval's hook: the summary's numbers, at the last training step."""
    if cfg.tracking is None:
        return
    tracker = start(cfg, run, "eval")
    tracker.log(eval_values(summary), step=(summary.get("training") or {}).get("steps", 0))
    tracker.close()


def public_config(cfg: RunConfig) -> dict:
    """The config as sent to a tracking server: the system prompt itself stays in the run dir."""
    return cfg.model_dump(mode="json", exclude={"system_prompt", "system_prompt_file"})


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists and empty dicts are values."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out
