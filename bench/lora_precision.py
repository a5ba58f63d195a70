"""A kl-sized training pass of the LoRA student over bf16 weights, two ways, interleaved:
  peft      peft's own path: each adapted layer's input copied to fp32, an fp32 delta at full width
  autocast  lora_at_base_precision (what the scorer runs): the two LoRA matmuls in bf16
Times forward + backward of the same batch (rows of the demo's lengths, random tokens) in
alternating rounds, so the machine's drift falls on both; then, with random non-zero adapter
weights, how far each path's hidden states sit from an fp32 model of the same weights.

  .venv/bin/python bench/lora_precision.py [--rows 8] [--tokens 160] [--rounds 4]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from promptdistill.backends import local_scorer
from promptdistill.backends.local import LocalTrainer
from promptdistill.backends.local_model import lora_at_base_precision
from promptdistill.loss import CROSS_ENTROPY
from promptdistill.models import resolve_model
from promptdistill.render import Datum


def no_change(model):
    return contextlib.nullcontext()


def batch(rows: int, tokens: int, generator: torch.Generator) -> list[Datum]:
    """`rows` rows of 10 fewer tokens each, the answer (the last two thirds) weighted."""
    out = []
    for r in range(rows):
        n = tokens - 10 * r
        ids = torch.randint(100, 40000, (n + 1,), generator=generator).tolist()
        weights = [0.0] * (n // 3) + [1.0 / (rows * n)] * (n - n // 3)
        out.append(Datum(ids[:-1], ids[1:], weights))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    model_dir = resolve_model(args.model)
    trainers = {dtype: LocalTrainer(model_dir, rank=16, alpha=32, dropout=0.0, target_modules="all-linear", dtype=dtype)
                for dtype in ("bfloat16", "float32")}
    bf16 = trainers["bfloat16"]
    data = batch(args.rows, args.tokens, torch.Generator().manual_seed(0))

    def timed(path: str) -> float:
        # The scorer runs its decoder inside lora_at_base_precision; for peft's own path that is
        # swapped for a context that does nothing.
        local_scorer.lora_at_base_precision = lora_at_base_precision if path == "autocast" else no_change
        start = time.perf_counter()
        bf16.forward_backward(data, CROSS_ENTROPY)
        bf16.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    paths = ("peft", "autocast")
    for name in paths:  # warm-up
        timed(name)
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for r in range(args.rounds):
        for name in (("peft", "autocast") if r % 2 == 0 else ("autocast", "peft")):
            seconds[name] += [timed(name) for _ in range(3)]
    for name, values in seconds.items():
        print(f"{name:9s} forward+backward, {args.rows} rows of up to {args.tokens} tokens: median "
              f"{statistics.median(values):.3f} s over {len(values)} ({', '.join(f'{v:.2f}' for v in values)})")
    print(f"autocast / peft: {statistics.median(seconds['autocast']) / statistics.median(seconds['peft']):.3f}")

    lora = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.01
            for i, (n, p) in enumerate(bf16.model.named_parameters()) if "lora_B" in n}
    ids = torch.tensor([d.input_tokens[:args.tokens - 10 * (args.rows - 1)] for d in data])
    with torch.no_grad():
        lora |= {n: p.detach().clone() for n, p in bf16.model.named_parameters() if "lora_A" in n}  # the same A's
        for trainer in trainers.values():
            for n, p in trainer.model.named_parameters():
                if n in lora:
                    p.copy_(lora[n])
        reference = trainers["float32"].scorer.parts.decoder(input_ids=ids).last_hidden_state
        with trainers["float32"].model.disable_adapter():
            base = trainers["float32"].scorer.parts.decoder(input_ids=ids).last_hidden_state
        for name, context in (("peft", no_change(bf16.model)), ("autocast", lora_at_base_precision(bf16.model))):
            with context:
                hidden = bf16.scorer.parts.decoder(input_ids=ids).last_hidden_state.float()
            print(f"{name:9s} hidden states against fp32's: {float((hidden - reference).norm() / reference.norm()):.4f} "
                  f"of their norm (the adapter moves them by {float((reference - base).norm() / reference.norm()):.4f})")


if __name__ == "__main__":
    main()
