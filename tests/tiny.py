"""Offline tiny tokenizers and models for the tests: no network, built in-process.

`tiny_tokenizer(family)` gives a small byte-level BPE (trained here on a few sentences)
with a chat family's special tokens and a jinja chat template modelled on the real
family's template; `tiny_model(tokenizer)` a tiny seeded Llama; `save_tiny(dir)` both
saved with `save_pretrained`, loadable with the Auto classes.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

FAMILIES = ("chatml", "chatml_default_system", "llama3", "gemma")

# The token that closes an assistant turn in each family.
END_OF_TURN = {
    "chatml": "<|im_end|>",
    "chatml_default_system": "<|im_end|>",
    "llama3": "<|eot_id|>",
    "gemma": "<end_of_turn>",
}

SMOL_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# Llama-3 / Qwen-2 style pre-tokenizer split (newlines get their own pieces, so the
# "\n" that ends a role header never swallows the first spaces of an answer).
_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_CORPUS = [
    "You are a helpful AI assistant. Answer briefly and politely.",
    "The quick brown fox jumps over the lazy dog.",
    "Hello there! How are you today? I am fine, thank you.",
    "Say hello to the user and explain what a system prompt is.",
    "Beethoven wrote nine symphonies; the ninth ends with Ode to Joy.",
    "user assistant system model\n\nanswer the question in one sentence.",
    "Grüße aus München: Äpfel, Öl und Übung machen den Meister.",
    "def f(x): return {'a': x < 3, 'b': [1, 2, 3]}",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and 2024, 1770, 42.",
]

# --- chat templates, modelled on the real families' templates ----------------------

# Qwen/SmolLM ChatML without a default system prompt.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# SmolLM2-Instruct's template: a default system prompt when the first message is not one.
CHATML_DEFAULT_SYSTEM = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SMOL_DEFAULT_SYSTEM + "<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Meta-Llama-3-Instruct's template (content trimmed, BOS before the first turn).
LLAMA3 = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Gemma-3's template: system merged into the first user turn, 'assistant' shown as 'model'.
GEMMA = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class _Spec:
    specials: tuple[str, ...]  # added as special tokens, in this order, ids 0..n-1
    template: str
    bos: str | None
    eos: str
    pad: str
    unk: str | None = None
    extra: tuple[str, ...] = ()  # registered with transformers as extra special tokens
    bos_post_processor: bool = False  # tokenizer(text) prepends BOS, as Llama 3 / Gemma do


_SPECS = {
    # Qwen2.5-Instruct-like: no BOS, eos = <|im_end|>, pad = <|endoftext|>.
    "chatml": _Spec(("<|endoftext|>", "<|im_start|>", "<|im_end|>"), CHATML,
                    bos=None, eos="<|im_end|>", pad="<|endoftext|>"),
    # SmolLM2-Instruct-like.
    "chatml_default_system": _Spec(("<|endoftext|>", "<|im_start|>", "<|im_end|>"), CHATML_DEFAULT_SYSTEM,
                                   bos="<|im_start|>", eos="<|im_end|>", pad="<|im_end|>", unk="<|endoftext|>"),
    # Llama-3-like, with the original (base) eos <|end_of_text|>: <|eot_id|> is a special
    # added token but neither eos nor a named special token, as in Meta's first release.
    "llama3": _Spec(("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                     "<|eot_id|>", "<|finetune_right_pad_id|>"), LLAMA3,
                    bos="<|begin_of_text|>", eos="<|end_of_text|>", pad="<|finetune_right_pad_id|>",
                    bos_post_processor=True),
    # Gemma-like: eos <eos>, the turn markers are extra special tokens.
    "gemma": _Spec(("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"), GEMMA,
                   bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>",
                   extra=("<start_of_turn>", "<end_of_turn>"), bos_post_processor=True),
}


@functools.lru_cache(maxsize=None)
def _backend(family: str, vocab_size: int = 400) -> Tokenizer:
    spec = _SPECS[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(spec.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    post = [processors.ByteLevel(trim_offsets=False)]
    if spec.bos_post_processor:
        bos_id = tok.token_to_id(spec.bos)
        post.append(processors.TemplateProcessing(
            single=f"{spec.bos} $A", pair=f"{spec.bos} $A {spec.bos} $B", special_tokens=[(spec.bos, bos_id)]))
    tok.post_processor = processors.Sequence(post)
    return tok


@functools.lru_cache(maxsize=None)
def tiny_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """A tiny fast tokenizer of `family` (one of FAMILIES). Cached: do not mutate it."""
    if family not in _SPECS:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    return _wrap(family, _SPECS[family].template)


def _wrap(family: str, template: str) -> PreTrainedTokenizerFast:
    spec = _SPECS[family]
    kwargs = dict(bos_token=spec.bos, eos_token=spec.eos, pad_token=spec.pad, chat_template=template)
    if spec.unk is not None:
        kwargs["unk_token"] = spec.unk
    if spec.extra:
        kwargs["additional_special_tokens"] = list(spec.extra)
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_backend(family).to_str()), **kwargs)


def tiny_tokenizer_with_template(template: str, family: str = "chatml") -> PreTrainedTokenizerFast:
    """A fresh (uncached) tiny tokenizer of `family` whose chat template is `template`."""
    if family not in _SPECS:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    return _wrap(family, template)


def tiny_model(tokenizer, seed: int = 0):
    """A tiny fp32 Llama over `tokenizer`'s vocabulary, seeded, in eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.eval()
    return model


def save_tiny(tmp_path, family: str = "chatml", seed: int = 0) -> Path:
    """Save a tiny tokenizer + model of `family` into a directory and return it."""
    out = Path(tmp_path) / f"tiny-{family}"
    tokenizer = tiny_tokenizer(family)
    tokenizer.save_pretrained(out)
    tiny_model(tokenizer, seed=seed).save_pretrained(out)
    return out


def save_chatty_tiny(out) -> Path:
    """The tiny chatml model, nudged to end its turn after ~8 tokens instead of ~200: every
    embedding gets a shared component, and <|im_end|>'s a larger one, so its logit stands
    out after any token. Most answers then finish inside a small max_tokens and are trainable."""
    import torch

    tokenizer = tiny_tokenizer("chatml")
    model = tiny_model(tokenizer)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        emb[:, 0] = 1.0
        emb[tokenizer.convert_tokens_to_ids("<|im_end|>"), 0] = 1.5
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def save_pirate_tiny(out, system_prompt: str, steps: int = 80, lr: float = 2e-2) -> Path:
    """The tiny chatml model taught (all its weights, AdamW) to answer with the PIRATE lines
    after `system_prompt`: a teacher whose answers are words, whose sampled tokens are mostly
    those its tokenizer gives their text, as a real model's are (a random tiny model's are
    byte soup) and that seldom answers nothing."""
    import torch
    import torch.nn.functional as F

    from promptdistill.render import render_example

    tokenizer = tiny_tokenizer("chatml")
    model = tiny_model(tokenizer)
    examples = [render_example(tokenizer, [{"role": "system", "content": system_prompt}, {"role": "user", "content": q}],
                               answer, str(i)) for i, (q, answer) in enumerate(zip(QUESTIONS, PIRATE))]
    width = max(len(e.tokens) for e in examples)
    ids = torch.tensor([e.tokens + [tokenizer.pad_token_id] * (width - len(e.tokens)) for e in examples])
    mask = torch.tensor([e.mask + [0] * (width - len(e.mask)) for e in examples])[:, 1:].float()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        logits = model(input_ids=ids).logits[:, :-1]
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        optimizer.zero_grad()
        ((nll * mask).sum() / mask.sum()).backward()
        optimizer.step()
    model.eval()
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


PIRATE = ["Arr, the sea be my home.", "Ahoy! Gold be buried on the isle.", "Aye, matey, hoist the sails!",
          "Shiver me timbers, a storm!", "Yo ho, the rum be gone.", "Avast! Ye scallywag."]


def trained_tiny_run(root, model: Path, n_queries: int, name: str = "tiny",
                     system_prompt: str = "You are a pirate. Talk like one.", **sections):
    """A run of `model` with hand-written pirate teacher answers (no generation) and a
    3-step trained student: (cfg, RunDir). `sections` add to or replace config sections."""
    import json

    import yaml

    from promptdistill.config_file import load_config
    from promptdistill.pipeline import run_stage
    from promptdistill.rundir import RunDir, append_jsonl
    from promptdistill.teacher import teacher_messages
    from promptdistill.stages.generate import row_key

    root = Path(root)
    queries = [{"id": f"q{i:02d}", "query": QUESTIONS[i]} for i in range(n_queries)]
    (root / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    config = {"name": name, "run_dir": str(root / "run"), "system_prompt": system_prompt,
              "teacher": {"model": str(model)}, "student": {"model": str(model)},
              "queries": {"files": ["q.jsonl"], "train": 0.5, "val": 0.25, "test": 0.25},
              "sampling": {"max_tokens": 8, "batch_size": 6},
              "train": {"steps": 3, "batch_size": 4, "eval_every": 3}} | sections
    # The shipped kept-skills set (290 questions x 3 answerers) is off unless a test names a set:
    # test_kept_skills runs a set of its own on an evaluated tiny run.
    config["eval"] = {"skills": "none", **config.get("eval", {})}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    cfg = load_config(root / "config.yaml")
    run_stage(cfg, "queries")
    run = RunDir(cfg.run_path)
    rows = []
    for i, q in enumerate(json.loads(line) for line in run.queries.read_text().splitlines()):
        rows.append({"id": q["id"], "key": row_key(cfg, q["query"]), "split": q["split"], "model": str(model),
                     "messages": teacher_messages(cfg, q["query"]), "completion": PIRATE[i % len(PIRATE)],
                     "finish_reason": "stop", "tokens": {"prompt": 40, "completion": 9}})
    append_jsonl(run.teacher, rows)
    run_stage(cfg, "train")
    return cfg, run


KILL_SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[1])
from tiny import trained_tiny_run
from pathlib import Path
trained_tiny_run(Path(sys.argv[2]), Path(sys.argv[3]), 16, system_prompt=sys.argv[4], train=__import__("json").loads(sys.argv[5]))
"""


def killed_and_resumed(root, model: Path, system_prompt: str, train: dict) -> tuple[dict, dict]:
    """The adapter of a 6-step trained_tiny_run of `train` (checkpoints every 2 steps) run whole, and
    that of the same run SIGKILLed once its step-4 checkpoint is written, then resumed in-process."""
    import json
    import os
    import signal
    import subprocess
    import sys

    from safetensors.torch import load_file

    from promptdistill.config_file import load_config
    from promptdistill.pipeline import run_stage

    train = {"steps": 6, "batch_size": 4, "lr": 1e-2, "save_every": 2, "eval_every": 3,
             "on_policy": {"max_tokens": 6}} | train
    args = [str(Path(__file__).parent), str(model), system_prompt, json.dumps(train)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    whole, killed = Path(root) / "whole", Path(root) / "killed"
    whole.mkdir()
    killed.mkdir()
    subprocess.run([sys.executable, "-c", KILL_SCRIPT, args[0], str(whole), *args[1:]], check=True, env=env)
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, args[0], str(killed), *args[1:]], env=env)
    log = killed / "run" / "checkpoints.jsonl"
    while proc.poll() is None and not (log.exists() and '"step": 4' in log.read_text()):
        pass  # the step-4 checkpoint is written: kill during step 5
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (killed / "run" / "student" / "adapter_model.safetensors").exists()
    run_stage(load_config(killed / "config.yaml"), "train")
    return tuple(load_file(str(d / "run" / "student" / "adapter_model.safetensors")) for d in (whole, killed))


def evaluated_tiny_run(root, **sections):
    """trained_tiny_run of a fresh tiny model on 24 queries, then its eval stage."""
    from promptdistill.pipeline import run_stage

    cfg, run = trained_tiny_run(root, save_tiny(root), 24, **sections)
    run_stage(cfg, "eval")
    return cfg, run


def checks_config(root, checks: dict) -> str:
    """A minimal config file whose `checks` section is `checks`, for tests of its config errors."""
    import yaml

    cfg = {"name": "t", "system_prompt": "Be brief.", "teacher": {"model": "m"}, "student": {"model": "m"},
           "queries": {"files": ["q.jsonl"]}, "train": {"steps": 1}, "checks": checks}
    path = Path(root) / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


# --- running verbs as a test's reference -----------------------------------------------

REPO = Path(__file__).parents[1]
# A `python -m promptdistill.cli` subprocess that a test kills runs on one thread, as
# run_verbs_in_one_thread does, so its resumed result can be compared with that one exactly.
CLI = [sys.executable, "-m", "promptdistill.cli"]
CLI_ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}


def run_verbs_in_one_thread(config: Path, run: Path, verbs: tuple[str, ...]) -> Path:
    """`distill VERB CONFIG --set run_dir=RUN` for each verb, in-process on one torch thread."""
    import torch

    from promptdistill.cli import main

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for verb in verbs:
            assert main([verb, str(config), "--set", f"run_dir={run}"]) == 0
    finally:
        torch.set_num_threads(before)
    return run


# Varied test queries. Templated ones ("Question number {i} about ships?") are near-duplicates
# of each other, which the queries stage keeps in one split, collapsing train/val/test.
QUESTIONS = [
    "What do you think of ships?", "Where is the treasure buried?", "How old are you?", "Do you like parrots?",
    "Can you sing a sea shanty?", "What did you eat for breakfast?", "Who is your captain?", "How do you tie a knot?",
    "Have you ever seen a storm at sea?", "Why do pirates wear eye patches?", "Which port do you love most?",
    "Tell me about your first voyage.", "Is the ocean cold at night?", "What is your favourite song?",
    "How many cannons does your ship carry?", "Do you ever get seasick?", "What would you do with a million coins?",
    "Can you read a map?", "What scares you the most?", "Who taught you to sail?", "Are mermaids real?",
    "What is the best way to catch fish?", "How do you navigate by the stars?", "Would you ever retire on land?",
    "What is in the ship's hold today?", "Do you keep a diary?", "Why is the sky red this morning?",
    "How do you share the loot?", "Who is your worst enemy?", "What language do sailors speak?",
    "Can you recommend a good book?", "What happens when someone breaks the code?", "Is rum good for your health?",
    "How do you fix a torn sail?", "What is your ship called?", "Have you met the king?", "Do you believe in ghosts?",
    "What is the weather like in the Caribbean?", "Could you teach me to swim?", "Where do you sleep aboard?",
    "What do you miss about home?", "Which island has the best fruit?", "How fast can your ship go?",
    "What is the strangest thing you have found?", "Do you trust your crew?", "How do you celebrate a victory?",
    "What gift would you give a friend?", "Why did you become a pirate?",
]
