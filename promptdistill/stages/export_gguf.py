"""The merged student as one GGUF file for llama.cpp and friends (`distill export --format gguf`).

llama.cpp's `convert_hf_to_gguf.py` is not shipped with the `gguf` package, so the Llama-family
conversion is written out here: llama.cpp's metadata keys and tensor names (from the
`gguf` package's constants and name map), attn_q / attn_k rows permuted the way
llama.cpp's converter does, and a byte-level BPE tokenizer as `tokenizer.ggml.model = gpt2`
with the pre-tokenizer llama.cpp needs to split text as the base model does (see
pre_tokenizer_name: the base model's own GGUF if any, else llama.cpp's own hash).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..rundir import StageError, sha256_text

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
