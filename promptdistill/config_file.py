"""A run config from its YAML file: read, --set overrides applied, validated, paths resolved.

Paths to inputs (system prompt file, queries files, local models) are relative to the config
file; `run_dir` is relative to the current directory. `resolve_config` turns every input path
absolute and inlines the system prompt, so the copy written into the run directory is
self-contained and can be re-run from anywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .config import HUB_PREFIX, RunConfig
from .config_errors import ConfigError, explain


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], 0.0003); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.lr=3e-4")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            if node.get(part) is None:  # absent, or a section a run dir's config.yaml holds as null (pricing)
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: '{part}' is not a section")
        node[path[-1]] = value
    return data


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read, override, validate and resolve a config file (or the config.yaml of a run dir)."""
    path = Path(path)
    run_dir = None
    if path.is_dir():  # a run dir: its config, and the run lives where it now is
        run_dir, path = str(path), path / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: YAML syntax error: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config fields at the top level")
    if run_dir is not None:
        data["run_dir"] = run_dir
    data = apply_overrides(data, list(overrides))
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        raise explain(e, str(path), RunConfig) from None
    return resolve_config(cfg, path.parent)


def resolve_config(cfg: RunConfig, base: Path) -> RunConfig:
    """Make input paths absolute, inline the system prompt, and check it is not empty."""
    data = cfg.model_dump()
    if cfg.system_prompt_file is not None:
        prompt_path = (base / cfg.system_prompt_file).resolve()
        if not prompt_path.is_file():
            raise ConfigError(f"system_prompt_file: {prompt_path} not found")
        try:
            data["system_prompt"] = prompt_path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{prompt_path}: not UTF-8 text (byte {e.start})") from None
        data["system_prompt_file"] = None
    judge = data["eval"]["judge"]
    if judge and judge["rubric_file"]:
        judge["rubric_file"] = str((base / judge["rubric_file"]).resolve())
    if cfg.eval.skills not in ("builtin", "none"):
        data["eval"]["skills"] = str((base / cfg.eval.skills).resolve())
    if not data["system_prompt"].strip():
        raise ConfigError("system_prompt: the system prompt is empty; there is nothing to distill")
    data["queries"]["files"] = [f if f.startswith(HUB_PREFIX) else str((base / f).resolve()) for f in cfg.queries.files]
    for model in (data["teacher"], data["student"], data["queries"]["synthesize"]["model"],
                  data["queries"]["follow_ups"]["model"]):
        spec = model["model"] if model else ""
        if spec and (spec.endswith(".gguf") or (base / spec).exists()):
            model["model"] = str((base / spec).resolve())
    return RunConfig.model_validate(data)
