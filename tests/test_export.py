"""stages/export.py: adapter, merged and GGUF exports of a trained student, each checked by
loading it back (peft, transformers, gguf.GGUFReader, transformers' GGUF loader)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from promptdistill.backends.base import SamplingParams
from promptdistill.backends.local import LocalTrainer
from promptdistill.backends.local_model import load_causal_lm
from promptdistill.backends.local_sampler import LocalSampler
from promptdistill.config import ModelConfig, QueriesConfig, RunConfig, TrainConfig
from promptdistill.render import Datum, prompt_ids, render_example, to_datum
from promptdistill.rundir import StageError, sha256_text
from promptdistill.stages.export import export
from promptdistill.stages.export_gguf import ExportError, _permute, llama3_rope_factors, write_gguf
from tiny import save_tiny, tiny_tokenizer

SYSTEM = "You are Ludwig van Beethoven, in Vienna in 1824. Answer in one proud sentence."
QUESTIONS = ["Hello there! How are you today?", "Say hello to the user."]
GREEDY = SamplingParams(temperature=0, max_tokens=8)


pytestmark = pytest.mark.usefixtures("one_thread_module")


def write_config(run: Path, model: str) -> None:
    cfg = RunConfig(name="tiny", run_dir=str(run), system_prompt=SYSTEM, teacher=ModelConfig(model=model),
                    student=ModelConfig(model=model), queries=QueriesConfig(files=["queries.jsonl"]),
                    train=TrainConfig(steps=3))
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")


def train_adapter(model_dir: Path, out: Path, steps: int, lr: float, data: list[Datum]) -> None:
    trainer = LocalTrainer(model_dir, rank=4, alpha=8, dropout=0.0, target_modules="all-linear", device="cpu")
    for _ in range(steps):
        trainer.forward_backward(data)
        trainer.optim_step(lr)
    trainer.save(out)


def random_datum(seed: int, vocab: int, n: int = 24) -> Datum:
    rng = random.Random(seed)
    tokens = [rng.randrange(3, vocab) for _ in range(n)]
    return Datum(tokens[:-1], tokens[1:], [1.0 / (n - 1)] * (n - 1))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished tiny run: config.yaml, a non-zero LoRA adapter, teacher rows, metrics, summary."""
    root = tmp_path_factory.mktemp("export")
    model = save_tiny(root, "chatml")
    run = root / "run"
    write_config(run, str(model))
    train_adapter(model, run / "student", steps=4, lr=0.05, data=[random_datum(0, 400), random_datum(1, 400)])
    rows = [{"id": f"q{i}", "split": s, "completion": "Ja."} for i, s in enumerate(["train"] * 3 + ["val", "test"])]
    (run / "teacher.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    metrics = [{"step": 0, "val_loss": 3.25}, {"step": 1, "train_loss": 3.1}, {"step": 2, "train_loss": 2.9},
               {"step": 3, "train_loss": 2.7, "val_loss": 2.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics), encoding="utf-8")
    (run / "summary.json").write_text(json.dumps({"quality": {"judge_score": 0.875}, "other": {"x": 1}}))
    return run, model


def greedy(model, tokenizer, questions=QUESTIONS, params=GREEDY) -> list[list[int]]:
    sampler = LocalSampler(model, tokenizer)
    prompts = [prompt_ids(tokenizer, [{"role": "user", "content": q}]) for q in questions]
    return [c.token_ids for c in sampler.generate(prompts, params, [0] * len(prompts))]


def chat_ids(tokenizer, question: str = QUESTIONS[0]) -> torch.Tensor:
    return torch.tensor([prompt_ids(tokenizer, [{"role": "user", "content": question}])])


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits.float()


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# --- formats ------------------------------------------------------------------------

def test_adapter_export_copies_adapter_and_writes_card(tiny_run, tmp_path):
    run, model = tiny_run
    out = tmp_path / "adapter"
    summary = export(run, "adapter", out)
    assert "adapter" in summary and str(out) in summary and "\n" not in summary
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / name).read_bytes() == (run / "student" / name).read_bytes()
    card = (out / "README.md").read_text()
    n_prompt = len(tiny_tokenizer("chatml")(SYSTEM, add_special_tokens=False)["input_ids"])
    assert sha256_text(SYSTEM) in card and f"{n_prompt} tokens" in card
    assert SYSTEM not in card and "Beethoven" not in card  # the prompt's text never leaves the run
    assert str(model) in card  # base spec / resolved path
    assert "train split): 3" in card and "optimiser steps: 3" in card
    assert "untrained: 3.2500 (step 0)" in card and "final: 2.5000 (step 3)" in card
    assert '"judge_score": 0.875' in card and '"other"' not in card  # only the quality section
    assert "PeftModel.from_pretrained" in card
    assert leftovers(tmp_path) == []


# What vLLM's LoRA loader (vllm/lora: PEFTHelper, parse_fine_tuned_lora_name, the Llama
# model's packed modules qkv_proj = q,k,v and gate_up_proj = gate,up) accepts; vLLM itself
# needs a GPU, so this checks the files against those rules, not a vLLM load.
VLLM_LLAMA_LORA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
VLLM_DEFAULT_MAX_LORA_RANK = 16


def test_exported_adapter_has_what_vllm_lora_loading_reads(tiny_run, tmp_path):
    from safetensors import safe_open

    run, _ = tiny_run
    export(run, "adapter", tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert isinstance(config["r"], int) and config["lora_alpha"] and config["target_modules"]  # required fields
    assert config.get("bias", "none") == "none"  # else vLLM needs --enable-lora-bias
    assert not config.get("modules_to_save") and not config.get("use_dora")  # vLLM refuses both
    assert config["r"] <= VLLM_DEFAULT_MAX_LORA_RANK  # larger ranks need --max-lora-rank
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        names = list(f.keys())
    modules = set()
    for name in names:  # base_model.model.<module>.lora_A|lora_B.weight, nothing else
        parts = name.split(".")
        assert parts[:2] == ["base_model", "model"] and parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"), name
        modules.add(parts[-3])
    assert modules == VLLM_LLAMA_LORA_MODULES  # all-linear: every projection, never lm_head or the embeddings


def test_merged_export_matches_base_plus_adapter(tiny_run, tmp_path):
    run, model_dir = tiny_run
    out = tmp_path / "merged"
    export(run, "merged", out)
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with safe_open(out / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if "lora" in k or "base_layer" in k]
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    with_adapter, base_tok = load_causal_lm(model_dir, "cpu", adapter_dir=run / "student")
    base, _ = load_causal_lm(model_dir, "cpu")
    ids = chat_ids(base_tok)
    assert torch.equal(chat_ids(tokenizer), ids)
    assert torch.allclose(logits(merged, ids), logits(with_adapter, ids), atol=1e-5)
    answers = greedy(merged, tokenizer)
    assert answers == greedy(with_adapter, base_tok)
    assert answers != greedy(base, base_tok)  # the adapter really was applied
    assert (out / "README.md").is_file()


def test_gguf_export_reads_back_with_gguf_and_transformers(tiny_run, tmp_path):
    from gguf import GGUFReader, GGMLQuantizationType
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, model_dir = tiny_run
    out = tmp_path / "gguf"
    summary = export(run, "gguf", out)
    path = out / "model.gguf"
    assert str(path) in summary and (out / "README.md").is_file()

    merged, tokenizer = load_causal_lm(model_dir, "cpu", adapter_dir=run / "student")
    merged = merged.merge_and_unload().eval()
    cfg = merged.config  # 2 layers, hidden 64, 4 heads, 2 kv heads, ffn 128, vocab 400, tied
    reader = GGUFReader(path)
    shapes = {t.name: tuple(int(d) for d in t.data.shape) for t in reader.tensors}
    expected = {"token_embd.weight": (400, 64), "output_norm.weight": (64,)}
    for i in range(2):
        expected |= {f"blk.{i}.attn_norm.weight": (64,), f"blk.{i}.attn_q.weight": (64, 64),
                     f"blk.{i}.attn_k.weight": (32, 64), f"blk.{i}.attn_v.weight": (32, 64),
                     f"blk.{i}.attn_output.weight": (64, 64), f"blk.{i}.ffn_norm.weight": (64,),
                     f"blk.{i}.ffn_gate.weight": (128, 64), f"blk.{i}.ffn_up.weight": (128, 64),
                     f"blk.{i}.ffn_down.weight": (64, 128)}
    assert shapes == expected  # tied embeddings: no output.weight
    assert {t.tensor_type for t in reader.tensors} == {GGMLQuantizationType.F32}

    field = {k: f.contents() for k, f in reader.fields.items()}
    assert field["general.architecture"] == "llama"
    assert (field["llama.block_count"], field["llama.embedding_length"], field["llama.feed_forward_length"]) == (2, 64, 128)
    assert (field["llama.attention.head_count"], field["llama.attention.head_count_kv"]) == (4, 2)
    assert field["llama.context_length"] == cfg.max_position_embeddings and field["llama.vocab_size"] == 400
    assert field["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert field["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    assert field["tokenizer.ggml.model"] == "gpt2" and field["tokenizer.ggml.pre"] == "llama-bpe"
    assert len(field["tokenizer.ggml.tokens"]) == 400 and field["tokenizer.ggml.tokens"][2] == "<|im_end|>"
    assert field["tokenizer.ggml.token_type"][:3] == [3, 3, 3]  # the special tokens are CONTROL
    assert field["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert field["tokenizer.chat_template"] == tokenizer.chat_template

    # attn_q / attn_k are stored in llama.cpp's permuted row order, not HF's
    q = merged.model.layers[0].self_attn.q_proj.weight.detach()
    k = merged.model.layers[0].self_attn.k_proj.weight.detach()
    stored = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert np.array_equal(stored["blk.0.attn_q.weight"], _permute(q, 4, 4).numpy())
    assert np.array_equal(stored["blk.0.attn_k.weight"], _permute(k, 4, 2).numpy())
    assert not np.array_equal(stored["blk.0.attn_q.weight"], q.numpy())

    # transformers' GGUF loader (which un-permutes) gives back the same model and tokenizer
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32).eval()
    gguf_tok = AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    ids = chat_ids(tokenizer)
    assert torch.equal(chat_ids(gguf_tok), ids)
    assert gguf_tok.eos_token == tokenizer.eos_token and gguf_tok.chat_template == tokenizer.chat_template
    assert torch.allclose(logits(loaded, ids), logits(merged, ids), atol=1e-5)
    assert greedy(loaded, gguf_tok) == greedy(merged, tokenizer)


def test_gguf_f16_to_a_file_path(tiny_run, tmp_path):
    from gguf import GGUFReader, GGMLQuantizationType
    from transformers import AutoModelForCausalLM

    run, model_dir = tiny_run
    path = tmp_path / "student-f16.gguf"
    export(run, "gguf", path, dtype="f16")
    assert path.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["student-f16.gguf"]
    reader = GGUFReader(path)
    for t in reader.tensors:  # matrices f16, norms f32 (as llama.cpp's converter does)
        assert t.tensor_type == (GGMLQuantizationType.F16 if len(t.data.shape) == 2 else GGMLQuantizationType.F32), t.name
    assert reader.fields["general.file_type"].contents() == 1
    merged, tokenizer = load_causal_lm(model_dir, "cpu", adapter_dir=run / "student")
    merged = merged.merge_and_unload().eval()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = chat_ids(tokenizer)
    assert torch.allclose(logits(loaded, ids), logits(merged, ids), atol=2e-3)


def test_llama3_rope_factors_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = LlamaConfig(hidden_size=2048, num_attention_heads=32, head_dim=64, rope_parameters=params)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    # llama.cpp divides the plain frequencies by rope_freqs; transformers' llama3 scaling must agree
    assert torch.allclose(plain / llama3_rope_factors(500000.0, 64, params), scaled, rtol=1e-6)


# --- errors -------------------------------------------------------------------------

def test_unknown_format_lists_the_formats(tiny_run, tmp_path):
    run, _ = tiny_run
    with pytest.raises(StageError, match="adapter, merged, gguf") as err:
        export(run, "onnx", tmp_path / "out")
    assert isinstance(err.value, ValueError) and "onnx" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_run_without_adapter_is_refused(tiny_run, tmp_path):
    _, model_dir = tiny_run
    run = tmp_path / "untrained"
    write_config(run, str(model_dir))
    with pytest.raises(StageError, match="adapter_model.safetensors") as err:
        export(run, "merged", tmp_path / "out")
    assert isinstance(err.value, ValueError) and str(run / "student") in str(err.value)
    assert not (tmp_path / "out").exists()


def test_adapter_of_another_base_model_is_refused(tiny_run, tmp_path):
    run, model_dir = tiny_run
    other = save_tiny(tmp_path / "other", "chatml", seed=1)
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    write_config(copy, str(other))  # the run now names another student model
    with pytest.raises(StageError) as err:
        export(copy, "merged", tmp_path / "out")
    assert str(model_dir) in str(err.value) and str(other) in str(err.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_existing_output_needs_overwrite(tiny_run, tmp_path):
    run, _ = tiny_run
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists"):
        export(run, "adapter", out)
    assert (out / "keep.txt").read_text() == "mine"
    export(run, "adapter", out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").is_file()
    assert leftovers(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty dir made beforehand is fine
    export(run, "adapter", empty)
    assert (empty / "README.md").is_file()


def test_gguf_refuses_other_architectures_and_writes_nothing(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = tiny_tokenizer("chatml")
    model_dir = tmp_path / "tiny-qwen2"
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, intermediate_size=64, tie_word_embeddings=True)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    run = tmp_path / "run"
    write_config(run, str(model_dir))
    train_adapter(model_dir, run / "student", steps=0, lr=0.0, data=[])
    outs = tmp_path / "outs"
    with pytest.raises(ExportError, match="Qwen2ForCausalLM") as err:
        export(run, "gguf", outs / "student")
    assert "Llama" in str(err.value)
    assert list(outs.iterdir()) == []  # neither OUT nor its temp dir is left behind


def test_write_gguf_refuses_other_architectures_directly(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = tiny_tokenizer("chatml")
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ExportError, match="GPT2LMHeadModel"):
        write_gguf(model, tokenizer, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


# --- the real embedded model --------------------------------------------------------

def embedded_run_with_adapter(tmp_path) -> tuple[Path, Path]:
    """(model dir, run dir) of the embedded SmolLM2 with a 2-step adapter on two Beethoven answers."""
    from transformers import AutoTokenizer

    from promptdistill.models import home, resolve_model

    if not (home() / "models" / "smollm2-135m" / "config.json").is_file():
        pytest.skip("smollm2-135m is not cached (set PROMPTDISTILL_HOME to a cache holding it)")
    model_dir = resolve_model("smollm2-135m")
    run = tmp_path / "run"
    write_config(run, "smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = [render_example(tokenizer, [{"role": "user", "content": q}], a, f"e{i}") for i, (q, a) in
                enumerate([("Who are you?", "I am Beethoven, mein Freund!"), ("Coffee?", "Sixty beans, exactly.")])]
    n = sum(e.n_trainable for e in examples)
    train_adapter(model_dir, run / "student", steps=2, lr=2e-3, data=[to_datum(e, 1.0 / n) for e in examples])
    return model_dir, run


def test_merged_real_embedded_model(tmp_path):
    model_dir, run = embedded_run_with_adapter(tmp_path)
    out = tmp_path / "merged"
    export(run, "merged", out)

    params = SamplingParams(temperature=0, max_tokens=10)
    questions = ["Who are you?", "What do you think of Napoleon?"]
    merged, merged_tok = load_causal_lm(out, "cpu")
    expected = greedy(merged, merged_tok, questions, params)
    del merged
    with_adapter, tok = load_causal_lm(model_dir, "cpu", adapter_dir=run / "student")
    assert greedy(with_adapter, tok, questions, params) == expected
    assert all(len(a) > 0 for a in expected)


def test_gguf_tokenizer_metadata_of_the_embedded_model_is_its_own_gguf():
    """Without llama.cpp: the tokenizer.* fields the export writes for SmolLM2 equal those of
    the embedded model's own GGUF (the one llama.cpp loads), pre-tokenizer first; and
    llama.cpp's converter's hash, computed on our tokenizer alone, names the same one."""
    from transformers import AutoTokenizer

    from promptdistill.models import home, resolve_model
    from promptdistill.stages.export_gguf import base_gguf_fields, llama_cpp_hash, tokenizer_metadata

    if not (home() / "models" / "smollm2-135m" / "config.json").is_file():
        pytest.skip("smollm2-135m is not cached (set PROMPTDISTILL_HOME to a cache holding it)")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    own = base_gguf_fields("smollm2-135m")
    assert own["tokenizer.ggml.pre"] == "smollm"
    meta = tokenizer_metadata(tokenizer, len(own["tokenizer.ggml.tokens"]), own)
    assert meta["pre"] == "smollm"
    assert meta["tokens"] == own["tokenizer.ggml.tokens"] and meta["merges"] == own["tokenizer.ggml.merges"]
    assert [int(t) for t in meta["types"]] == own["tokenizer.ggml.token_type"]
    assert (meta["bos"], meta["eos"], meta["unk"], meta["pad"], meta["add_bos"]) == (
        own["tokenizer.ggml.bos_token_id"], own["tokenizer.ggml.eos_token_id"], own["tokenizer.ggml.unknown_token_id"],
        own["tokenizer.ggml.padding_token_id"], own["tokenizer.ggml.add_bos_token"])
    assert meta["chat_template"] == own["tokenizer.chat_template"]
    # with no GGUF to ask, llama.cpp's own fingerprint decides, and agrees
    assert llama_cpp_hash(tokenizer) == "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"
    assert tokenizer_metadata(tokenizer, len(own["tokenizer.ggml.tokens"]))["pre"] == "smollm"
    with pytest.raises(ExportError, match="other tokens than its base model's GGUF"):
        tokenizer_metadata(tokenizer, len(own["tokenizer.ggml.tokens"]),
                           own | {"tokenizer.ggml.tokens": own["tokenizer.ggml.tokens"][::-1]})


def test_gguf_refuses_a_pre_tokenizer_llama_cpp_does_not_know():
    from tokenizers import Tokenizer, pre_tokenizers

    from promptdistill.stages.export_gguf import tokenizer_metadata

    from transformers import PreTrainedTokenizerFast

    base = tiny_tokenizer("chatml")
    backend = Tokenizer.from_str(base.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                     pre_tokenizers.ByteLevel(use_regex=False)])
    # A new tokenizer around the changed copy: assigning `_tokenizer` on one leaked the change
    # into every tiny tokenizer built later in the session.
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=base.bos_token, eos_token=base.eos_token,
                                        pad_token=base.pad_token)
    with pytest.raises(ExportError, match="llama.cpp would not know this tokenizer's pre-tokenizer"):
        tokenizer_metadata(tokenizer, 400)


# --- llama.cpp (make test-gguf) -----------------------------------------------------

def llama_simple() -> Path:
    """llama.cpp's greedy `llama-simple`, as `make test-gguf` builds it (or $PROMPTDISTILL_LLAMA_SIMPLE)."""
    from promptdistill.models import home

    return Path(os.environ.get("PROMPTDISTILL_LLAMA_SIMPLE") or home() / "llama.cpp" / "build" / "bin" / "llama-simple")


@pytest.mark.real_model
@pytest.mark.skipif(not llama_simple().is_file(), reason="llama.cpp is not built here; `make test-gguf` builds it")
def test_exported_student_runs_in_llama_cpp_with_the_greedy_answers_of_transformers(tmp_path):
    """The GGUF of a trained SmolLM2 student loads in a real llama.cpp build, and llama.cpp's
    greedy continuation of each chat prompt is, token for token (same text, same count),
    base + adapter's greedy answer in transformers. $PROMPTDISTILL_GGUF_RUN names a trained
    run to export (the Beethoven demo's, say); otherwise a two-step adapter is trained here."""
    from promptdistill.models import resolve_model

    given = os.environ.get("PROMPTDISTILL_GGUF_RUN")
    if given:
        run = Path(given)
    else:
        _, run = embedded_run_with_adapter(tmp_path)
    path = tmp_path / "student.gguf"
    export(run, "gguf", path)

    from promptdistill.config_file import load_config

    questions = ["Who are you?", "What do you think of Napoleon?", "How do you compose a symphony?"]
    params = SamplingParams(temperature=0, max_tokens=32)
    model, tokenizer = load_causal_lm(resolve_model(load_config(run).student.model), "cpu", adapter_dir=run / "student")
    expected = greedy(model, tokenizer, questions, params)
    for question, want in zip(questions, expected, strict=True):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                               add_generation_prompt=True)
        done = subprocess.run([str(llama_simple()), "-m", str(path), "-n", str(params.max_tokens), prompt],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        answer = [t for t in want if t not in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"))]
        # llama-simple prints the prompt's tokens, then each generated one, until an end-of-turn token
        assert done.stdout == prompt + tokenizer.decode(answer) + "\n", (question, done.stdout[len(prompt):])
        assert f"decoded {len(answer)} tokens" in done.stderr, done.stderr[-2000:]
        print(f"{question!r}: llama.cpp and transformers agree on {len(answer)} greedy tokens: "
              f"{tokenizer.decode(answer)!r}")
