"""Runs stages in order against one run directory: skip what is done, refuse to mix
results made from different inputs, time each stage and record it in the manifest.
Under a launcher (`accelerate launch`, torchrun; see distributed.py) every process runs the
stage and rank 0 alone keeps the books."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import distributed, validate
from .config import RunConfig
from .rundir import RunDir, StageError, Timer, atomic_write_text
from .stages import evaluate, generate, queries, report, train


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: Callable[[RunConfig, RunDir], dict]
    run: Callable[[RunConfig, RunDir], str]
    outputs: Callable[[RunDir], list[Path]]  # the files it finishes with (hashed in the manifest)
    resumable: tuple[str, ...] = ()  # inputs whose change means "more to do", not "conflict"
    aside: Callable[[RunDir], list[Path]] | None = None  # what --force moves away, if more than `outputs`


STAGES = [
    Stage("queries", queries.stage_inputs, queries.run, lambda r: [r.queries, r.root / queries.STATS_FILE]),
    Stage("generate", generate.stage_inputs, generate.run, lambda r: [r.teacher], resumable=("queries",),
          aside=lambda r: [r.teacher, r.root / "teacher_errors.jsonl"]),
    Stage("train", train.stage_inputs, train.run,
          lambda r: [r.student / "adapter_model.safetensors", r.student / "adapter_config.json", r.metrics, r.checkpoints_log],
          aside=lambda r: [r.student, r.metrics, r.checkpoints_log]),
    Stage("eval", evaluate.stage_inputs, evaluate.run,
          lambda r: [r.root / "eval.jsonl", r.root / "summary.json", r.root / "eval_conversations.jsonl"]),
    Stage("report", report.stage_inputs, report.run, report.outputs, resumable=("summary",)),
]
BY_NAME = {s.name: s for s in STAGES}


def run_stage(cfg: RunConfig, name: str, force: bool = False) -> str:
    stage = BY_NAME[name]
    run = RunDir(cfg.run_path)
    main = distributed.is_main()
    if main:
        run.root.mkdir(parents=True, exist_ok=True)
    if force and main:
        later = STAGES[STAGES.index(stage):]
        moved = run.move_aside([p for s in later for p in (s.aside or s.outputs)(run)])
        run.forget_stages([s.name for s in later])
        if moved:
            print(f"{name}: --force moved earlier outputs to {moved}")
    distributed.barrier()  # the others read the run dir once --force has moved things aside
    inputs = stage.inputs(cfg, run)
    # Every process reads the same files, so all skip, refuse or go on alike.
    if run.stage_done(name, inputs, stage.resumable):  # refuses results made from other inputs
        summary = run.read_manifest()["stages"][name].get("summary", "")
        print(f"{name}: already done, skipped ({summary})")
        return summary
    distributed.barrier()  # all have read the manifest before rank 0 rewrites it
    if main:
        # Only now, with nothing refused, does the run dir take this config as its own.
        atomic_write_text(run.config, cfg.to_yaml())
        record, files = run.read_manifest()["stages"].get(name), _snapshot(stage.outputs(run))
        run.start_stage(name, inputs)
    try:
        with Timer() as t:
            summary = stage.run(cfg, run)
    except BaseException:
        if main and _snapshot(stage.outputs(run)) == files:
            run.restore_stage(name, record)  # it changed nothing: a corrected re-run is not a "change"
        raise
    if main:
        run.finish_stage(name, [p for p in stage.outputs(run) if p.exists()], t.seconds, summary)
    print(summary, flush=True)
    return summary


def _will_run(cfg: RunConfig, run: RunDir, stage: Stage) -> bool:
    """True if `stage` has work to do; one that is done spends nothing, so needs no checks,
    and one whose inputs changed is refused by run_stage with its own message."""
    try:
        return not run.stage_done(stage.name, stage.inputs(cfg, run), stage.resumable)
    except StageError:
        return False


def _snapshot(paths: list[Path]) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) if p.exists() else None for p in paths}


def run_all(cfg: RunConfig, force: bool = False, checks: bool = True) -> None:
    """Every stage in order; with `checks`, validate's cheap checks before generate and its
    answer checks before train (errors stop the run there, warnings are printed)."""
    run = RunDir(cfg.run_path)
    with Timer() as t:
        for stage in STAGES:
            if checks and stage.name in ("generate", "train") and _will_run(cfg, run, stage):
                validate.gate(cfg, run, stage.name)
            run_stage(cfg, stage.name, force=force and stage is STAGES[0])
    summary = json.loads((cfg.run_path / "summary.json").read_text(encoding="utf-8"))
    print(f"\nrun: all stages done in {t.seconds:.1f}s; report in {cfg.run_path / 'report.md'}\n")
    print(report.first_paragraph(summary) + "\n")
    print("\n".join(report.headline(summary)))
