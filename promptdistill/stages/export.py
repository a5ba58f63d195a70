"""distill export: hand the trained student over, as a PEFT adapter, a merged model dir, or a GGUF file.

- adapter: the LoRA adapter files plus a model card (base model, a hash of the system
  prompt -- never its text --, training figures, how to load it);
- merged: base + adapter with the LoRA folded into the weights (`merge_and_unload`),
  saved as a plain transformers model dir (safetensors) with the tokenizer;
- gguf: that merged model as one GGUF file for llama.cpp and friends. llama.cpp's
  `convert_hf_to_gguf.py` is not shipped with the `gguf` package, so the Llama-family
  conversion is written out here: llama.cpp's metadata keys and tensor names (from the
  `gguf` package's constants and name map), attn_q / attn_k rows permuted the way
  llama.cpp's converter does, and a byte-level BPE tokenizer as `tokenizer.ggml.model = gpt2`
  with the pre-tokenizer llama.cpp needs to split text as the base model does (see
  pre_tokenizer_name: the base model's own GGUF if any, else llama.cpp's own hash).

Output is written next to OUT under a temporary name and renamed at the end, so an
interrupted or failed export never leaves a partial model behind.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from ..config import RunConfig, load_config
from ..models import ADAPTER_FILES, check_adapter, read_adapter_config
from ..rundir import RunDir, StageError, read_jsonl, sha256_text

FORMATS = ("adapter", "merged", "gguf")
GGUF_DTYPES = ("f32", "f16")

# Pre-tokenizer split patterns, as tokenizer.json spells them, and the name llama.cpp
# knows them by (`tokenizer.ggml.pre`). transformers' GGUF loader reads the same names.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_NAMES = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


class ExportError(StageError, ValueError):
    """An export that cannot be done; a StageError (the CLI reports it) and a ValueError."""


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


# --- GGUF ---------------------------------------------------------------------------

def _permute(w, n_head: int, n_head_kv: int):
    """llama.cpp's convert_hf_to_gguf `LlamaModel.permute`: reorder the rows of attn_q /
    attn_k (and their biases) from HF's rotate-half layout to GGML's interleaved rope."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


def _rope_settings(config) -> tuple[float, str, dict]:
    """(theta, rope type, parameters) from a transformers 5 `rope_parameters` or an older
    `rope_theta` / `rope_scaling` config."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ExportError(f"per-layer rope parameters ({sorted(params)}) are not supported for GGUF export")
    scaling = getattr(config, "rope_scaling", None)
    if not params and isinstance(scaling, dict):
        params = dict(scaling)
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        theta = 10000.0
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    return float(theta), rope_type, params


def llama3_rope_factors(theta: float, head_dim: int, params: dict):
    """The `rope_freqs` tensor llama.cpp's converter writes for Llama 3.1-style rope scaling."""
    import torch

    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = params.get("factor", 8.0)
    low = params.get("low_freq_factor", 1.0)
    high = params.get("high_freq_factor", 4.0)
    old_context = params.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _looks_special(token: str) -> bool:
    # as llama.cpp's converter: some models leave chat markers unflagged as special
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>")


# llama.cpp's converter (`get_vocab_base_pre` in convert_hf_to_gguf.py) names a BPE
# pre-tokenizer by hashing the token ids the tokenizer gives for this fixed text (its
# `chktxt`), since two tokenizer.json files can spell the same behaviour differently.
LLAMA_CPP_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# The hashes of the Llama-architecture tokenizers llama.cpp's converter knows, from its table.
LLAMA_CPP_PRE_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
}


def llama_cpp_hash(tokenizer) -> str:
    """The pre-tokenizer fingerprint llama.cpp's converter computes for a tokenizer."""
    return sha256_text(str(tokenizer.encode(LLAMA_CPP_CHECK_TEXT)))


def _pre_by_structure(pre: dict | None) -> str | None:
    """llama.cpp's name for a pre-tokenizer built exactly like a known one's (a vocabulary
    of its own, so no hash matches): the split rules are all llama.cpp reproduces."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        return SPLIT_NAMES.get(steps[0].get("pattern", {}).get("Regex"))
    return None


def base_gguf_fields(spec: str) -> dict | None:
    """The tokenizer.* fields of the base model's own GGUF (an embedded model ships as one,
    a `.gguf` spec is one), or None for a model dir or hub id."""
    import gguf

    from ..models import EMBEDDED, locate_gguf

    path = locate_gguf(EMBEDDED[spec]) if spec in EMBEDDED else Path(spec) if spec.endswith(".gguf") else None
    if path is None:
        return None
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def pre_tokenizer_name(tokenizer, spec: dict, base_fields: dict | None) -> str:
    """`tokenizer.ggml.pre`: what the base model's own GGUF says when there is one (the
    ground truth: whoever converted it knew the original tokenizer); otherwise what
    llama.cpp's converter would decide, by its hash; otherwise a pre-tokenizer built like a
    known one (tiny test tokenizers, retrained vocabularies)."""
    if base_fields is not None and "tokenizer.ggml.pre" in base_fields:
        return base_fields["tokenizer.ggml.pre"]
    fingerprint = llama_cpp_hash(tokenizer)
    name = LLAMA_CPP_PRE_HASHES.get(fingerprint) or _pre_by_structure(spec.get("pre_tokenizer"))
    if name is None:
        raise ExportError(
            f"GGUF export: llama.cpp would not know this tokenizer's pre-tokenizer (its converter's hash "
            f"{fingerprint} is not one of {', '.join(sorted(set(LLAMA_CPP_PRE_HASHES.values())))}, and the "
            f"pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:300]} is not built like one of them); "
            f"export --format merged and convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    return name


def tokenizer_metadata(tokenizer, vocab_size: int, base_fields: dict | None = None) -> dict:
    """tokenizer.ggml.* for a byte-level BPE tokenizer, as llama.cpp's `_set_vocab_gpt2` writes
    them; `base_fields` (the base model's own GGUF's tokenizer.* fields) are the ground truth."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"GGUF export needs a fast (tokenizers) tokenizer; got {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    decoder = spec.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise ExportError(
            f"GGUF export supports byte-level BPE tokenizers (GPT-2 style) only; this one is "
            f"{model.get('type')} with a {decoder.get('type')} decoder; export --format merged instead"
        )
    pre = pre_tokenizer_name(tokenizer, spec, base_fields)
    reverse = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    for i, a in added.items():
        reverse[i] = a["content"]
    if reverse and max(reverse) >= vocab_size:
        raise ExportError(f"tokenizer has token id {max(reverse)} but the model's vocabulary has {vocab_size} rows")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            special = added[i].get("special") or _looks_special(reverse[i])
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    probe = tokenizer("a")["input_ids"]
    meta = {
        "pre": pre, "tokens": tokens, "types": types, "merges": merges,
        "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id, "pad": tokenizer.pad_token_id,
        "add_bos": tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id],
        "add_eos": tokenizer.eos_token_id is not None and len(probe) > 1 and probe[-1] == tokenizer.eos_token_id,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    if base_fields is not None and base_fields.get("tokenizer.ggml.tokens", tokens) != tokens:
        raise ExportError("GGUF export: the student's tokenizer has other tokens than its base model's GGUF; "
                          "was the base model changed after training?")
    return meta


def write_gguf(model, tokenizer, path: Path, dtype: str = "f32", name: str | None = None,
               base_fields: dict | None = None) -> dict:
    """Write a Llama-family causal LM (weights already merged) and its tokenizer as GGUF;
    `base_fields`: see tokenizer_metadata. Returns {'tensors': n, 'bytes': file size}."""
    import gguf
    import numpy as np

    if dtype not in GGUF_DTYPES:
        raise ExportError(f"unknown GGUF dtype {dtype!r}; choose one of: {', '.join(GGUF_DTYPES)}")
    config = model.config
    arch = type(model).__name__
    if config.model_type != "llama" or arch != "LlamaForCausalLM":
        raise ExportError(
            f"GGUF export supports the Llama architecture (LlamaForCausalLM) only; this model is {arch} "
            f"(model_type {config.model_type!r}); use --format merged or --format adapter instead"
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ExportError(f"GGUF export: llama.cpp's llama graph uses silu; this model uses {config.hidden_act!r}")
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    theta, rope_type, rope = _rope_settings(config)
    if rope_type not in ("default", "linear", "llama3"):
        raise ExportError(f"GGUF export: rope scaling {rope_type!r} is not supported (default, linear and llama3 are)")
    vocab_size = config.vocab_size
    embed = model.get_input_embeddings().weight
    if embed.shape[0] != vocab_size:
        raise ExportError(f"embedding has {embed.shape[0]} rows but config.vocab_size is {vocab_size}")
    tok = tokenizer_metadata(tokenizer, vocab_size, base_fields)

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or str(getattr(config, "_name_or_path", "") or "promptdistill student"))
        writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_vocab_size(vocab_size)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(theta)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        if rope_type == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope["factor"]))

        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(tok["pre"])
        writer.add_token_list(tok["tokens"])
        writer.add_token_types(tok["types"])
        writer.add_token_merges(tok["merges"])
        for key in ("bos", "eos", "unk", "pad"):
            if tok[key] is not None:
                getattr(writer, f"add_{key}_token_id")(tok[key])
        writer.add_add_bos_token(tok["add_bos"])
        writer.add_add_eos_token(tok["add_eos"])
        template = tok["chat_template"]
        if isinstance(template, dict):
            template = [{"name": k, "template": v} for k, v in template.items()]
        if template:
            writer.add_chat_template(template)

        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        count = 0
        if rope_type == "llama3":
            writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                              llama3_rope_factors(theta, head_dim, rope).numpy())
            count += 1
        for hf_name, tensor in model.state_dict().items():
            if hf_name == "lm_head.weight" and tied:
                continue  # llama.cpp reuses token_embd when there is no output tensor
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise ExportError(f"GGUF export: no llama.cpp name for tensor {hf_name!r}")
            data = tensor.detach().to("cpu").float()
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                data = _permute(data, n_head, n_head)
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                data = _permute(data, n_head, n_kv)
            array = data.contiguous().numpy()
            if dtype == "f16" and array.ndim >= 2:  # norms and biases stay f32, as in llama.cpp
                array = array.astype(np.float16)
            writer.add_tensor(gguf_name, array)
            count += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    reader = gguf.GGUFReader(str(path))  # cheap (memory-mapped): the file must read back whole
    if len(reader.tensors) != count:
        raise ExportError(f"{path}: wrote {count} tensors but {len(reader.tensors)} read back")
    return {"tensors": count, "bytes": path.stat().st_size}
