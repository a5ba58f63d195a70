"""The measured workloads of bench/run.py, one per child process.

    python bench/workloads.py NAME SPEC_JSON OUT_JSON

runs workload NAME with the settings in SPEC_JSON and writes its result, plus the
process's peak RSS, to OUT_JSON. Each run gets a fresh process so that peak memory,
allocator state and thread pools belong to that run alone. Heavy imports (torch,
transformers, trl) happen inside the workloads, never at module level.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

EXAMPLE = ROOT / "examples" / "beethoven"
RUN = ROOT / "runs" / "beethoven"
MODEL = "smollm2-135m"
CANNED_ANSWER = ("Speak up, or better, write it in my conversation book! I am Beethoven, and I hear almost "
                 "nothing now, but I shall answer you as honestly as my temper allows.")


# ---------------------------------------------------------------- shared data


def model_dir() -> Path:
    from promptdistill.models import resolve_model

    return resolve_model(MODEL)


def load_model(spec: dict, adapter_dir: Path | None = None):
    """(model, tokenizer) of the embedded model in the spec's dtype (auto: bf16 where the CPU
    multiplies it in hardware, as a run config's default; the same for baseline and ours)."""
    from promptdistill.backends.local_model import load_causal_lm

    return load_causal_lm(model_dir(), "cpu", adapter_dir=adapter_dir, dtype=spec.get("dtype", "float32"))


def dtype_name(model) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def system_prompt() -> str:
    from promptdistill.config_file import load_config

    return load_config(EXAMPLE / "config.yaml").system_prompt


def example_queries(n: int) -> list[str]:
    rows = [json.loads(line) for line in (EXAMPLE / "queries.jsonl").read_text().splitlines() if line.strip()]
    return [r["query"] for r in rows[:n]]


def teacher_conversations(n: int) -> list[list[dict]]:
    prompt = system_prompt()
    return [[{"role": "system", "content": prompt}, {"role": "user", "content": q}] for q in example_queries(n)]


def training_rows(n: int) -> tuple[list[dict], str]:
    """(rows of id/query/answer, where they came from): real teacher answers of the train
    split when a demo run has produced them, else the example queries with a canned answer."""
    from promptdistill.stages.train import training_answer

    teacher = RUN / "teacher.jsonl"
    rows = []
    if teacher.exists():
        for line in teacher.read_text().splitlines():
            r = json.loads(line) if line.strip() else None
            if r and r.get("split") == "train" and (answer := training_answer(r)):
                rows.append({"id": r["id"], "query": r["messages"][-1]["content"], "answer": answer})
        rows.sort(key=lambda r: r["id"])  # file order depends on batching; ids do not
    if len(rows) >= n:
        return rows[:n], f"{teacher.relative_to(ROOT)} (train split, first {n} by id)"
    queries = example_queries(n)
    return [{"id": f"q{i}", "query": q, "answer": CANNED_ANSWER} for i, q in enumerate(queries)], "canned answer"


def training_examples(tokenizer, n: int, max_len: int):
    """The student's examples: no system prompt, loss mask = answer + end-of-turn token."""
    from promptdistill.render import render_example

    rows, source = training_rows(n)
    examples = [render_example(tokenizer, [{"role": "user", "content": r["query"]}], r["answer"], r["id"]) for r in rows]
    return [e for e in examples if len(e.tokens) <= max_len], source


def trained_tokens(example) -> int:
    """Tokens scored by the loss: to_datum shifts by one, so a mask bit on token 0 never counts."""
    return sum(example.mask[1:])


# ---------------------------------------------------------------- generation


def sampling_params(spec: dict, max_tokens: int | None = None):
    from promptdistill.backends.base import SamplingParams

    return SamplingParams(temperature=spec["temperature"], top_p=spec["top_p"], repetition_penalty=spec["repetition_penalty"],
                          max_tokens=max_tokens or spec["max_tokens"], seed=0)


def generation_result(seconds: float, lengths: list[int], hit_max: int, prompt_tokens: list[int]) -> dict:
    return {"seconds": seconds, "queries": len(lengths), "generated_tokens": sum(lengths),
            "tokens_per_s": sum(lengths) / seconds, "hit_max_tokens": hit_max,
            "mean_answer_tokens": statistics.mean(lengths), "mean_prompt_tokens": statistics.mean(prompt_tokens)}


def gen_baseline(spec: dict) -> dict:
    """transformers' model.generate, one query at a time, sampling as the teacher does.
    top_k=0 turns off generate's default top-k of 50, which our sampler does not have."""
    import torch

    from promptdistill.render import prompt_ids, stop_token_ids

    model, tok = load_model(spec)
    stop = stop_token_ids(tok)
    prompts = [prompt_ids(tok, c) for c in teacher_conversations(spec["queries"])]
    kwargs = dict(do_sample=True, temperature=spec["temperature"], top_p=spec["top_p"], top_k=0,
                  repetition_penalty=spec["repetition_penalty"], eos_token_id=stop, pad_token_id=tok.pad_token_id)

    def one(ids: list[int], seed: int, max_new: int) -> list[int]:
        torch.manual_seed(seed)
        x = torch.tensor([ids])
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, **kwargs)
        return out[0, len(ids):].tolist()

    one(prompts[0], 0, 4)  # warm-up: first-call allocations, lazy imports
    start = time.perf_counter()
    answers = [one(ids, i, spec["max_tokens"]) for i, ids in enumerate(prompts)]
    seconds = time.perf_counter() - start
    hit_max = sum(len(a) == spec["max_tokens"] and a[-1] not in stop for a in answers)
    return generation_result(seconds, [len(a) for a in answers], hit_max, [len(p) for p in prompts]) | {
        "dtype": dtype_name(model)}


def gen_ours(spec: dict) -> dict:
    """LocalSampler.sample: the path the generate stage takes (shared prompt prefix cache,
    finished rows leave the batch, per-row seeds)."""
    from promptdistill.backends.local_sampler import LocalSampler

    model, tok = load_model(spec)
    sampler = LocalSampler(model, tok, batch_size=spec["batch_size"])
    convs = teacher_conversations(spec["queries"])
    sampler.sample(convs[:1], sampling_params(spec, max_tokens=4), [0])  # warm-up, as the baseline gets
    sampler.forget_prefix()  # the timed run pays for its own prompt prefill
    start = time.perf_counter()
    completions = sampler.sample(convs, sampling_params(spec), list(range(len(convs))))
    seconds = time.perf_counter() - start
    hit_max = sum(c.finish_reason == "length" for c in completions)
    return generation_result(seconds, [c.completion_tokens for c in completions], hit_max,
                             [c.prompt_tokens for c in completions]) | {"dtype": dtype_name(model)}


# ---------------------------------------------------------------- training


def lora_config(spec: dict):
    from peft import LoraConfig

    return LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")


def training_result(step_seconds: list[float], step_tokens: list[int], losses: list[float], warmup: int,
                    final_nll: float, examples: list, source: str) -> dict:
    timed_s, timed_tokens = step_seconds[warmup:], step_tokens[warmup:]
    return {"steps": len(step_seconds), "examples": len(examples), "data": source,
            "trained_tokens": sum(step_tokens), "seconds": sum(step_seconds),
            "tokens_per_s": sum(timed_tokens) / sum(timed_s), "median_step_s": statistics.median(timed_s),
            "step_seconds": step_seconds, "step_tokens": step_tokens, "losses": losses,
            "final_loss": losses[-1], "final_loss_last4": statistics.mean(losses[-4:]),
            "final_nll_all_examples": final_nll}


def mean_nll(model, examples: list, batch_size: int) -> float:
    """Token-mean NLL of every example's answer after training, measured the same way for
    both trainers: a loss check that does not depend on which batches came last."""
    from promptdistill.backends.local_scorer import AnswerScorer
    from promptdistill.render import to_datum

    scorer = AnswerScorer(model)
    nll = tokens = 0.0
    for start in range(0, len(examples), batch_size):
        for s, n in scorer.per_example([to_datum(e) for e in examples[start:start + batch_size]]):
            nll, tokens = nll + s, tokens + n
    return nll / tokens


def train_flops(model, examples: list) -> dict:
    """Useful FLOPs of one pass over `examples` (forward + backward), counted as:
      frozen linear weights (non-embedding): 4·N per input token (2N forward, 2N backward to
        the activations; frozen weights get no weight gradient)
      LoRA weights: 6·P per input token (forward, activation and weight gradients)
      attention scores (QK^T and AV): 4·d_attn·(i+1) forward at position i, causal; x3 with backward
      output layer: 4·V·d per trained (answer) token only, which is all the loss needs
    Embedding lookups, norms and activations are ignored (no matmul)."""
    cfg = model.config
    frozen = sum(p.numel() for n, p in model.named_parameters()
                 if ".layers." in n and p.dim() == 2 and "lora_" not in n)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    d_attn = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    total = answer = 0
    for e in examples:
        length = len(e.tokens) - 1  # input_tokens of the datum
        total += length * (4 * frozen + 6 * lora)
        total += 3 * 4 * d_attn * cfg.num_hidden_layers * length * (length + 1) // 2
        total += 4 * cfg.vocab_size * cfg.hidden_size * trained_tokens(e)
        answer += trained_tokens(e)
    return {"frozen_linear_params": frozen, "lora_params": lora, "flops_per_trained_token": total / answer,
            "flops_epoch": total}


def train_ours(spec: dict) -> dict:
    """LocalTrainer with the train stage's recipe: micro_batch order, token-mean weights, lr_at."""
    from promptdistill.backends.local import LocalTrainer
    from promptdistill.render import to_datum
    from promptdistill.stages.train import lr_at, micro_batch

    trainer = LocalTrainer(model_dir(), rank=spec["rank"], alpha=spec["alpha"], dropout=0.0, target_modules="all-linear",
                           weight_decay=0.0, max_grad_norm=1.0, device="cpu", dtype=spec.get("dtype", "float32"),
                           seed=spec["seed"])
    examples, source = training_examples(trainer.tokenizer, spec["examples"], spec["max_length"])
    seconds, tokens, losses = [], [], []
    for step in range(spec["steps"]):
        start = time.perf_counter()
        batch = micro_batch(examples, step, 0, spec["batch_size"], 1, spec["seed"])
        total = sum(e.n_trainable for e in batch)
        result = trainer.forward_backward([to_datum(e, 1.0 / total) for e in batch])
        trainer.optim_step(lr_at(step, spec["steps"], spec["lr"], 0, "linear"))
        seconds.append(time.perf_counter() - start)
        tokens.append(result.tokens)
        losses.append(result.nll_sum / result.tokens)
    out = training_result(seconds, tokens, losses, spec["warmup_steps"],
                          mean_nll(trainer.model, examples, spec["batch_size"]), examples, source)
    return out | {"flops": train_flops(trainer.model, examples), "dtype": dtype_name(trainer.model)}


def train_baseline(spec: dict) -> dict:
    """TRL's SFTTrainer + PEFT LoRA, completion-only loss, on the SAME tokens and mask.

    We hand TRL pre-tokenized rows (input_ids + completion_mask, TRL's documented processed
    format) rather than a prompt/completion dataset: TRL tokenizes that format with its own
    mask, which also trains the "\\n" after <|im_end|> (one extra token per example), and
    we want both trainers to do exactly the same work."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    model, tok = load_model(spec)
    bf16 = dtype_name(model) == "bfloat16"
    examples, source = training_examples(tok, spec["examples"], spec["max_length"])
    # Our datum reads tokens[:-1]; the last token (the template's "\n") is never a target.
    assert all(e.mask[-1] == 0 for e in examples), "expected an untrained token after the end-of-turn"
    data = Dataset.from_list([{"input_ids": e.tokens[:-1], "completion_mask": e.mask[:-1]} for e in examples])

    class StepClock(TrainerCallback):
        """Wall time between step ends: the whole loop, data loading and logging included."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.times: list[float] = []
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.times.append(now - self.last)
            self.last = now

    class CountingSFTTrainer(SFTTrainer):
        """Records the trained tokens of each step (labels after the causal shift)."""

        def compute_loss(self, model, inputs, *args, **kwargs):
            self.step_tokens.append(int((inputs["labels"][:, 1:] != -100).sum()))
            return super().compute_loss(model, inputs, *args, **kwargs)

    clock = StepClock()
    with tempfile.TemporaryDirectory() as out_dir:
        args = SFTConfig(
            output_dir=out_dir, max_steps=spec["steps"], per_device_train_batch_size=spec["batch_size"],
            gradient_accumulation_steps=1, learning_rate=spec["lr"], lr_scheduler_type="linear", warmup_steps=0,
            weight_decay=0.0, max_grad_norm=1.0, seed=spec["seed"], data_seed=spec["seed"],
            use_cpu=True, bf16=bf16, fp16=False, gradient_checkpointing=False,
            packing=False, max_length=spec["max_length"], completion_only_loss=True,
            eval_strategy="no", save_strategy="no", report_to="none", logging_steps=1, disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = CountingSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                                     peft_config=lora_config(spec), callbacks=[clock])
        trainer.step_tokens = []
        trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    # Same work as ours: TRL's labels, after its causal shift, mark exactly our trained tokens.
    trl_tokens = sum(sum(label != -100 for label in labels[1:]) for labels in trainer.train_dataset["labels"])
    out = training_result(clock.times, trainer.step_tokens, losses, spec["warmup_steps"],
                          mean_nll(trainer.model, examples, spec["batch_size"]), examples, source)
    return out | {"dataset_trained_tokens": trl_tokens,
                  "same_tokens_as_ours": trl_tokens == sum(trained_tokens(e) for e in examples),
                  "dtype": dtype_name(model) + (" (bf16 autocast)" if bf16 else "")}


# ---------------------------------------------------------------- latency


def latency(spec: dict) -> dict:
    """Teacher (base model WITH the prompt) vs student (adapter, or the base model as a
    stand-in, WITHOUT the prompt), one query at a time, alternating, in one process.
    Every query pays its own prefill, as a server without prompt caching would."""
    from promptdistill.backends.base import SamplingParams
    from promptdistill.backends.local_sampler import LocalSampler
    from promptdistill.render import prompt_ids

    adapter = RUN / "student"
    has_adapter = (adapter / "adapter_config.json").exists()
    model, tok = load_model(spec, adapter if has_adapter else None)
    sampler = LocalSampler(model, tok, batch_size=1)
    greedy = SamplingParams(temperature=0, max_tokens=spec["max_tokens"])
    queries = latency_queries(spec["queries"])
    prompt = system_prompt()
    convs = {"teacher": [[{"role": "system", "content": prompt}, {"role": "user", "content": q}] for q in queries],
             "student": [[{"role": "user", "content": q}] for q in queries]}

    def timed(who: str, conv: list[dict]) -> tuple[float, float, int]:
        # One model serves both: the teacher is the base model, adapter switched off.
        ctx = model.disable_adapter() if (who == "teacher" and has_adapter) else contextlib.nullcontext()
        ids = prompt_ids(tok, conv)
        sampler.forget_prefix()
        first: list[float] = []
        with ctx:
            start = time.perf_counter()
            out = sampler.generate([ids], greedy, [0], on_token=lambda row, t: first or first.append(time.perf_counter()))
            end = time.perf_counter()
        return first[0] - start, end - start, out[0].completion_tokens

    for who in convs:  # warm-up pair, not recorded
        timed(who, convs[who][0])
    rows = {"teacher": [], "student": []}
    for i in range(len(queries)):  # alternate, so drift in machine speed hits both alike
        for who in rows:
            rows[who].append(timed(who, convs[who][i]))
    out = {"student_model": "runs/beethoven/student adapter" if has_adapter else "base model, no adapter yet",
           "queries": len(queries), "dtype": dtype_name(model)}
    for who, r in rows.items():
        out[who] = {"ttft_ms_median": 1000 * statistics.median(x[0] for x in r),
                    "total_ms_median": 1000 * statistics.median(x[1] for x in r),
                    "mean_answer_tokens": statistics.mean(x[2] for x in r),
                    "mean_prompt_tokens": statistics.mean(len(prompt_ids(tok, c)) for c in convs[who])}
    return out


def latency_queries(n: int) -> list[str]:
    """Held-out test queries of the demo run when it exists (the student never trained on
    them), else the first example queries."""
    split = RUN / "queries.jsonl"
    if split.exists():
        rows = [json.loads(line) for line in split.read_text().splitlines() if line.strip()]
        test = [r["query"] for r in rows if r.get("split") == "test"]
        if len(test) >= n:
            return test[:n]
    return example_queries(n)


# ---------------------------------------------------------------- machine


def machine(spec: dict) -> dict:
    """Matmul throughput with torch's default threads, fp32 and bf16: the ceiling for everything
    above, in the dtype each ran in (bf16 is fast only where the CPU has bf16 units)."""
    import torch

    out = {"torch_threads": torch.get_num_threads()}
    for key, dtype in (("matmul", torch.float32), ("matmul_bf16", torch.bfloat16)):
        out[key] = {}
        for n in spec["matmul_sizes"]:
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            for _ in range(3):
                torch.matmul(a, b)
            times = []
            for _ in range(spec["matmul_repeats"]):
                start = time.perf_counter()
                torch.matmul(a, b)
                times.append(time.perf_counter() - start)
            out[key][str(n)] = 2 * n**3 / statistics.median(times) / 1e9
    out["matmul_gflops_peak"] = max(out["matmul"].values())
    out["matmul_gflops_peak_bf16"] = max(out["matmul_bf16"].values())
    return out


# ---------------------------------------------------------------- concurrency (OpenAI backend)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(port: int, server, timeout: float = 30.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"bench/latency_server.py exited with code {server.returncode}")
        with contextlib.suppress(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
            return
        time.sleep(0.1)
    raise RuntimeError(f"bench/latency_server.py did not answer on port {port} within {timeout:.0f}s")


def throughput(seconds: float, tokens: int, answers: int) -> dict:
    return {"seconds": seconds, "tokens": tokens, "answers": answers, "tokens_per_s": tokens / seconds}


def concurrency(spec: dict) -> dict:
    """Our OpenAISampler at several concurrency levels, and a plain sequential loop with the
    openai SDK (one request at a time), against bench/latency_server.py: a server in its own
    process that answers each request after a fixed latency. Each level sends the same
    `requests` conversations; warm-up requests go first, outside the timing."""
    import subprocess

    import openai

    from promptdistill.backends.base import SamplingParams
    from promptdistill.backends.openai import OpenAISampler

    n, tokens = spec["requests"], spec["tokens"]
    conversations = [[{"role": "user", "content": f"Question {i}: what did Beethoven write in {1770 + i}?"}] for i in range(n)]
    port = free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "bench" / "latency_server.py"), "--port", str(port),
                               "--latency", str(spec["latency_s"]), "--tokens", str(tokens)])
    try:
        wait_until_up(port, server)
        base_url = f"http://127.0.0.1:{port}/v1"
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
        ask = lambda c: client.chat.completions.create(model="bench", messages=c, max_tokens=tokens, temperature=0.7)
        ask(conversations[0])
        start = time.perf_counter()
        got = sum(ask(c).usage.completion_tokens for c in conversations)
        result = {"sequential": throughput(time.perf_counter() - start, got, n)}
        params = SamplingParams(temperature=0.7, max_tokens=tokens)
        for level in spec["levels"]:
            sampler = OpenAISampler(base_url, "bench", concurrency=level)
            sampler.sample(conversations[:level], params, list(range(level)))
            start = time.perf_counter()
            out = sampler.sample(conversations, params, list(range(n)))
            seconds = time.perf_counter() - start
            failed = [o.error for o in out if o.finish_reason == "error"]
            if failed:
                raise RuntimeError(f"concurrency {level}: {len(failed)} requests failed, e.g. {failed[0]}")
            row = throughput(seconds, sum(o.completion_tokens for o in out), n)
            # The best any client can do: ceil(n / level) waves of one latency each.
            row["ideal_tokens_per_s"] = n * tokens / (-(-n // level) * spec["latency_s"])
            row["speedup"] = row["tokens_per_s"] / result["sequential"]["tokens_per_s"]
            result[f"c{level}"] = row
        result["top_speedup"] = result[f"c{max(spec['levels'])}"]["speedup"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    return result


# ---------------------------------------------------------------- entry point

WORKLOADS = {"gen_baseline": gen_baseline, "gen_ours": gen_ours, "train_baseline": train_baseline,
             "train_ours": train_ours, "latency": latency, "machine": machine, "concurrency": concurrency}


def main() -> None:
    name, spec, out_path = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    result = WORKLOADS[name](spec)
    import torch

    # ru_maxrss is in KiB on Linux: the peak of THIS process, which ran one workload only.
    result |= {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "torch_threads": torch.get_num_threads(), "pid": os.getpid()}
    out_path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
