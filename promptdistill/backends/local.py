"""Local backend's trainer: a LoRA on a transformers model on this machine's CPU (or a CUDA GPU
when present), AdamW on the LoRA weights, behind Tinker's primitives. A loss reads the model's
output only at the answer positions (local_scorer.py), since the 49k-word vocabulary dominates a
small model's compute. The sampler, scorer and model loading live beside it (local_*.py).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from .. import distributed
from ..loss import CROSS_ENTROPY, Loss
from ..render import Datum
from .base import StepResult
from .local_model import load_causal_lm, peft_wrapping
from .local_sampler import LocalSampler
from .local_scorer import AnswerScorer

STATE_FILE = "trainer_state.pt"  # optimiser and RNG state, written after the adapter


class LocalTrainer:
    """LoRA on a local model, AdamW on the LoRA weights only. Under `accelerate launch` or
    torchrun, each process holds a full copy and optim_step first sums the gradients of all
    processes (see distributed.py), so every copy takes the same step."""

    def __init__(self, model_dir: str | Path, *, rank: int, alpha: float, dropout: float,
                 target_modules: str | list[str], weight_decay: float = 0.0, max_grad_norm: float | None = 1.0,
                 gradient_checkpointing: bool = False, device: str = "auto", dtype: str = "float32", seed: int = 0,
                 sample_batch_size: int = 16):
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        random.seed(seed)
        base, self.tokenizer = load_causal_lm(model_dir, device, dtype=dtype)
        if gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
        lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM")
        with peft_wrapping():
            self.model = get_peft_model(base, lora)
        self.device = next(self.model.parameters()).device
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        distributed.broadcast_from_main(self.params)
        self.optimizer = torch.optim.AdamW(self.params, lr=0.0, weight_decay=weight_decay)
        self.max_grad_norm = max_grad_norm
        self.sample_batch_size = sample_batch_size
        self.scorer = AnswerScorer(self.model)

    def takes(self, loss: Loss) -> bool:
        """Every loss runs here: its `local` math on this model's scored positions."""
        return True

    def _loss(self, batch: list[Datum], loss: Loss) -> tuple[torch.Tensor, float, int]:
        value, per_position = loss.local(self.scorer.scored(batch), batch)
        return value, float(per_position.sum()), len(per_position)

    def forward_backward(self, batch: list[Datum], loss: Loss = CROSS_ENTROPY) -> StepResult:
        self.model.train()
        value, nll_sum, tokens = self._loss(batch, loss)
        value.backward()
        return StepResult(loss=float(value.detach()), nll_sum=nll_sum, tokens=tokens)

    @torch.no_grad()
    def forward(self, batch: list[Datum], loss: Loss = CROSS_ENTROPY) -> StepResult:
        self.model.eval()
        value, nll_sum, tokens = self._loss(batch, loss)
        return StepResult(loss=float(value), nll_sum=nll_sum, tokens=tokens)

    def optim_step(self, lr: float) -> dict:
        distributed.sum_gradients(self.params)
        if self.max_grad_norm is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
        else:
            norm = float(torch.norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None])))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": norm}

    def save(self, path: str | Path) -> None:
        self.model.save_pretrained(str(path))

    def is_checkpoint(self, path: str | Path) -> bool:
        """Whether save_state finished writing `path` (its state file is written last)."""
        return (Path(path) / STATE_FILE).exists()

    def save_state(self, path: str | Path) -> None:
        self.save(path)
        torch.save({"optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                    "python_rng": random.getstate()}, Path(path) / STATE_FILE)

    def load_state(self, path: str | Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(self.model, load_file(str(Path(path) / "adapter_model.safetensors")))
        state = torch.load(Path(path) / STATE_FILE, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])

    def sampler(self) -> LocalSampler:
        """A sampler of the current weights (on_policy's student answers), the adapter merged
        for decoding: a new one per call, so no prefix cache outlives a step's weights."""
        return LocalSampler(self.model, self.tokenizer, self.sample_batch_size, merge_lora=True)
