"""distill export: hand the trained student over, as a PEFT adapter, a merged model dir, or a GGUF file.

- adapter: the LoRA adapter files plus a model card (base model, a hash of the system
  prompt -- never its text --, training figures, how to load it);
- merged: base + adapter with the LoRA folded into the weights (`merge_and_unload`),
  saved as a plain transformers model dir (safetensors) with the tokenizer;
- gguf: that merged model as one GGUF file for llama.cpp and friends, converted by
  export_gguf.py.

Output is written next to OUT under a temporary name and renamed at the end, so an
interrupted or failed export never leaves a partial model behind.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from ..config import RunConfig

from ..config_file import load_config
from ..models import ADAPTER_FILES, check_adapter, read_adapter_config
from ..rundir import RunDir, read_jsonl, sha256_text
from .export_gguf import GGUF_DTYPES, ExportError, base_gguf_fields, write_gguf

FORMATS = ("adapter", "merged", "gguf")


def export(run_dir: Path, fmt: str, out: Path, *, dtype: str = "f32", overwrite: bool = False) -> str:
    """Export the run's trained student to `out` in format `fmt` (adapter | merged | gguf);
    `dtype` (f32 | f16) applies to gguf. Returns a one-line summary."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if dtype not in GGUF_DTYPES:
        raise ExportError(f"unknown GGUF dtype {dtype!r}; choose one of: {', '.join(GGUF_DTYPES)}")
    run = RunDir(Path(run_dir))
    cfg = load_config(run.root)
    base = check_adapter(run.student, cfg.student.model)
    out = Path(out)
    single_file = fmt == "gguf" and out.suffix == ".gguf"
    _check_target(out, overwrite)

    with _staged(out, is_dir=not single_file, overwrite=overwrite) as tmp:
        if fmt == "adapter":
            from transformers import AutoTokenizer

            for name in ADAPTER_FILES:
                shutil.copy2(run.student / name, tmp / name)
            card = model_card(run, cfg, base, fmt, AutoTokenizer.from_pretrained(base))
            (tmp / "README.md").write_text(card, encoding="utf-8")
            what = f"LoRA adapter (r={read_adapter_config(run.student).get('r')}) + README.md"
        else:
            model, tokenizer = merged_model(base, run.student)
            if fmt == "merged":
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                (tmp / "README.md").write_text(model_card(run, cfg, base, fmt, tokenizer), encoding="utf-8")
                n = sum(p.numel() for p in model.parameters())
                what = f"merged {type(model).__name__}, {n / 1e6:.1f}M parameters, safetensors + tokenizer"
            else:
                path = tmp if single_file else tmp / "model.gguf"
                info = write_gguf(model, tokenizer, path, dtype=dtype, name=f"{cfg.name} (promptdistill student)",
                                  base_fields=base_gguf_fields(cfg.student.model))
                if not single_file:
                    (tmp / "README.md").write_text(model_card(run, cfg, base, fmt, tokenizer), encoding="utf-8")
                what = f"GGUF {dtype}, {info['tensors']} tensors, {info['bytes'] / 1e6:.1f} MB"
    final = out / "model.gguf" if fmt == "gguf" and not single_file else out
    return f"export: {fmt} of {run.root} -> {final} ({what}; base {cfg.student.model})"


# --- checks -------------------------------------------------------------------------

def _check_target(out: Path, overwrite: bool) -> None:
    if _occupied(out) and not overwrite:
        raise ExportError(f"{out} already exists; choose another --out, remove it, or pass --overwrite")


def _occupied(path: Path) -> bool:
    if path.is_dir() and not path.is_symlink():
        return any(path.iterdir())
    return path.exists() or path.is_symlink()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def _staged(target: Path, is_dir: bool, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary path next to `target` (a dir, or a file name); on success rename
    it to `target` (replacing an old one only with `overwrite`), on failure delete it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    _remove(tmp)
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
        old = None
        if _occupied(target):
            if not overwrite:
                raise ExportError(f"{target} appeared while exporting; nothing was replaced")
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            _remove(old)
            target.rename(old)
        elif target.is_dir():
            target.rmdir()  # an empty dir the user made for us
        os.replace(tmp, target)
        if old is not None:
            _remove(old)
    except BaseException:
        _remove(tmp)
        raise


# --- model card ---------------------------------------------------------------------

def training_figures(run: RunDir) -> dict:
    """Counts and losses for the card: train examples in teacher.jsonl, optimiser steps and
    validation loss (untrained and final) from metrics.jsonl, and summary.json if any."""
    figures: dict = {"train_examples": None, "steps": None, "val_loss_first": None, "val_loss_final": None,
                     "summary": None, "summary_error": None}
    if run.teacher.exists():
        figures["train_examples"] = sum(1 for r in read_jsonl(run.teacher) if r.get("split") == "train")
    if run.metrics.exists():
        rows = read_jsonl(run.metrics)
        steps = [r["step"] for r in rows if "train_loss" in r and "step" in r]
        vals = [r for r in rows if "val_loss" in r]
        figures["steps"] = max(steps) if steps else 0
        if vals:
            figures["val_loss_first"] = (vals[0].get("step"), vals[0]["val_loss"])
            figures["val_loss_final"] = (vals[-1].get("step"), vals[-1]["val_loss"])
    summary = run.root / "summary.json"
    if summary.exists():
        try:
            data = json.loads(summary.read_text(encoding="utf-8"))
            figures["summary"] = data["quality"] if isinstance(data, dict) and "quality" in data else data
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            figures["summary_error"] = f"{summary.name} could not be read ({e})"
    return figures


def model_card(run: RunDir, cfg: RunConfig, base: Path, fmt: str, tokenizer) -> str:
    """README.md for an exported student. Holds a hash of the system prompt, never its text."""
    adapter = read_adapter_config(run.student)
    fig = training_figures(run)
    prompt_tokens = len(tokenizer(cfg.system_prompt, add_special_tokens=False)["input_ids"])
    unknown = "unknown"

    def loss(v):
        return f"{v[1]:.4f} (step {v[0]})" if v else unknown

    targets = adapter.get("target_modules")
    if isinstance(targets, list):  # "model.layers.0.mlp.up_proj" and "up_proj" alike -> "up_proj"
        targets = ", ".join(sorted({t.rsplit(".", 1)[-1] for t in targets}))
    lines = [
        "---",
        f"library_name: {'peft' if fmt == 'adapter' else 'transformers'}",
        "tags: [promptdistill, lora, system-prompt-distillation]",
        "---",
        "",
        f"# {cfg.name}: a promptdistill student ({fmt})",
        "",
        "A teacher answered queries WITH a system prompt; this LoRA student learned to give those "
        "answers WITHOUT it, so the prompt's behaviour lives in the weights.",
        "",
        "## Base model",
        "",
        f"- spec: `{cfg.student.model}`",
        f"- resolved path at export: `{base}`",
        f"- teacher: `{cfg.teacher.model}`",
        "",
        "## System prompt (not included)",
        "",
        f"- sha256: `{sha256_text(cfg.system_prompt)}`",
        f"- length: {prompt_tokens} tokens (student tokenizer)",
        "",
        "## Training",
        "",
        f"- training examples (teacher answers in the train split): {fig['train_examples'] if fig['train_examples'] is not None else unknown}",
        f"- optimiser steps: {fig['steps'] if fig['steps'] is not None else unknown}",
        f"- validation loss, untrained: {loss(fig['val_loss_first'])}",
        f"- validation loss, final: {loss(fig['val_loss_final'])}",
        f"- LoRA: r={adapter.get('r')}, alpha={adapter.get('lora_alpha')}, dropout={adapter.get('lora_dropout')}, "
        f"targets: {targets}",
        f"- learning rate {cfg.train.lr:g}, batch size {cfg.train.batch_size} x {cfg.train.grad_accum}, "
        f"schedule {cfg.train.schedule}",
        "",
    ]
    if fig["summary"] is not None or fig["summary_error"]:
        lines += ["## Scores (summary.json)", ""]
        if fig["summary_error"]:
            lines += [fig["summary_error"], ""]
        else:
            lines += ["```json", json.dumps(fig["summary"], indent=2, ensure_ascii=False), "```", ""]
    lines += ["## How to load", ""] + _how_to_load(fmt, base) + [
        "",
        f"Exported {datetime.now(timezone.utc).isoformat(timespec='seconds')} from run `{cfg.name}` by promptdistill.",
        "",
    ]
    return "\n".join(lines)


def _how_to_load(fmt: str, base: Path) -> list[str]:
    if fmt == "adapter":
        return [
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base}")',
            'model = PeftModel.from_pretrained(base, "PATH/TO/THIS/DIR")',
            f'tokenizer = AutoTokenizer.from_pretrained("{base}")',
            "# optional: fold the LoRA into the weights",
            "model = model.merge_and_unload()",
            "```",
            "",
            "Chat with it WITHOUT the system prompt: `tokenizer.apply_chat_template(messages, add_generation_prompt=True)`.",
        ]
    if fmt == "merged":
        return [
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'model = AutoModelForCausalLM.from_pretrained("PATH/TO/THIS/DIR")',
            'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/DIR")',
            "```",
            "",
            "The LoRA is already merged; no peft needed. Chat WITHOUT the system prompt.",
        ]
    return [
        "`model.gguf` (the merged model) loads in llama.cpp-based runtimes, e.g.",
        "`llama-cli -m model.gguf -cnv`, or with transformers:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("PATH/TO/THIS/DIR", gguf_file="model.gguf")',
        'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/DIR", gguf_file="model.gguf")',
        "```",
    ]


# --- merged model -------------------------------------------------------------------

def merged_model(base: Path, adapter_dir: Path):
    """(model, tokenizer): the base model with the adapter folded into its weights, fp32 on CPU."""
    from ..backends.local_model import load_causal_lm

    model, tokenizer = load_causal_lm(base, "cpu", adapter_dir)
    model = model.merge_and_unload()
    model.eval()
    return model, tokenizer
