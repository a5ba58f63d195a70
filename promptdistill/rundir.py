"""The run directory: where each file lives, atomic writes, JSONL append, and the manifest.

Every stage reads and writes plain files here. The manifest records, per stage, the
inputs that produced its outputs (a fingerprint), the outputs' hashes and the time it
took, so `distill run` can skip finished stages and refuse to mix results made from
different inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from . import machine


class StageError(RuntimeError):
    """A stage cannot go on; the message says why and what to do."""


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(obj: Any) -> str:
    return sha256_text(json.dumps(obj, sort_keys=True, ensure_ascii=False))[:16]


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file and rename, so a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def json_safe(obj: Any) -> Any:
    """NaN and infinities become null (strict JSON has no NaN); numpy scalars become floats."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    return obj


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def append_jsonl(path: Path, rows: list[dict]) -> None:
    """Append whole lines and fsync: after a crash the file holds complete rows plus at
    most one torn last line, which `read_jsonl(..., repair=True)` cuts off."""
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) for each non-blank line; a malformed line is an error naming it."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise StageError(f"{path}:{lineno}: malformed JSON ({e.msg}); fix or delete that line") from None
            if not isinstance(row, dict):
                raise StageError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def read_jsonl(path: Path, repair: bool = False) -> list[dict]:
    """All rows of a JSONL file. With repair=True a torn last line (no newline, not valid
    JSON: the trace of a killed writer) is reported and cut off instead of failing."""
    if not path.exists():
        return []
    if repair:
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            print(f"note: {path}: cutting a torn last line ({len(data) - cut} bytes) left by an interrupted run")
            with open(path, "r+b") as f:
                f.truncate(cut)
    return [row for _, row in iter_jsonl(path)]


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def queries(self) -> Path:
        return self.root / "queries.jsonl"

    @property
    def teacher(self) -> Path:
        return self.root / "teacher.jsonl"

    @property
    def student(self) -> Path:
        return self.root / "student"

    @property
    def checkpoints(self) -> Path:
        return self.student / "checkpoints"

    @property
    def checkpoints_log(self) -> Path:
        return self.root / "checkpoints.jsonl"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def read_manifest(self) -> dict:
        if not self.manifest_path.exists():
            return {"stages": {}}
        return json.loads(self.manifest_path.read_text(encoding="utf-8"))

    def changed_inputs(self, stage: str, inputs: dict) -> list[str]:
        """The input fields that differ from those the stage's outputs were made with."""
        record = self.read_manifest()["stages"].get(stage)
        if record is None:
            return []
        return sorted(k for k in set(inputs) | set(record["inputs"]) if inputs.get(k) != record["inputs"].get(k))

    def stage_done(self, stage: str, inputs: dict, resumable: tuple[str, ...] = ()) -> bool:
        """True if `stage` finished from exactly these inputs and its outputs are intact.
        Raises if its (finished or partial) outputs came from other inputs: mixing old
        and new results is refused, except for the `resumable` fields, whose change just
        means the stage has more to do."""
        changed = self.changed_inputs(stage, inputs)
        refused = [k for k in changed if k not in resumable]
        if refused:
            raise StageError(
                f"{stage}: {self.root} holds results made with a different {', '.join(refused)}; "
                f"re-run with --force to move the old outputs aside, or use another run_dir"
            )
        record = self.read_manifest()["stages"].get(stage)
        if changed or record is None or "finished" not in record:
            return False
        for rel, digest in record.get("outputs", {}).items():
            path = self.root / rel
            if not path.exists() or (path.is_file() and sha256_file(path) != digest):
                return False
        return True

    def start_stage(self, stage: str, inputs: dict) -> None:
        manifest = self.read_manifest()
        previous = manifest["stages"].get(stage, {})
        manifest["stages"][stage] = {"inputs": inputs, "started": _now(), "seconds_before": previous.get("seconds_total", 0.0)}
        manifest["versions"] = machine.facts()
        atomic_write_json(self.manifest_path, manifest)

    def finish_stage(self, stage: str, outputs: list[Path], seconds: float, summary: str) -> None:
        manifest = self.read_manifest()
        record = manifest["stages"][stage]
        record["finished"] = _now()
        record["seconds"] = round(seconds, 2)
        record["seconds_total"] = round(record.pop("seconds_before", 0.0) + seconds, 2)
        record["summary"] = summary
        record["outputs"] = {str(p.relative_to(self.root)): sha256_file(p) for p in outputs}
        atomic_write_json(self.manifest_path, manifest)

    def move_aside(self, paths: list[Path]) -> Path | None:
        """--force: move old outputs to <run>/old/<timestamp>/, never delete them."""
        existing = [p for p in paths if p.exists()]
        if not existing:
            return None
        dest = self.root / "old" / datetime.now().strftime("%Y%m%d-%H%M%S")
        dest.mkdir(parents=True, exist_ok=True)
        for p in existing:
            p.rename(dest / p.name)
        return dest

    def restore_stage(self, stage: str, record: dict | None) -> None:
        """Put back a stage's manifest record as it was before a failed start."""
        manifest = self.read_manifest()
        if record is None:
            manifest["stages"].pop(stage, None)
        else:
            manifest["stages"][stage] = record
        atomic_write_json(self.manifest_path, manifest)

    def forget_stages(self, stages: list[str]) -> None:
        manifest = self.read_manifest()
        for stage in stages:
            manifest["stages"].pop(stage, None)
        atomic_write_json(self.manifest_path, manifest)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Timer:
    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def fmt_seconds(s: float) -> str:
    return f"{s:.1f}s" if s < 60 else f"{int(s // 60)}m{int(s % 60):02d}s"
