"""Backends behind the Sampler and Trainer interfaces (base.py), one module each.

A backend's vendor SDK is imported only inside its module, and only when the config
names that backend: `local` (transformers + peft), `openai` (any OpenAI-compatible
chat-completions server, through the official SDK; sampling only), `tinker` (the Tinker
API through the official `tinker` SDK: LoRA training and sampling).
"""

from __future__ import annotations

from pathlib import Path

from ..config import LoraConfig, ModelConfig, TrainConfig
from ..models import resolve_model
from .base import Sampler, Trainer


def make_sampler(model: ModelConfig, batch_size: int, adapter_dir: str | Path | None = None) -> Sampler:
    # An adapter trained on Tinker was downloaded into the run dir: it runs on the local copy.
    if model.backend == "local" or (model.backend == "tinker" and adapter_dir is not None):
        from .local_sampler import LocalSampler

        return LocalSampler.from_dir(resolve_model(model.model), model.device, batch_size, adapter_dir, model.dtype)
    if model.backend == "openai":
        if adapter_dir is not None:
            raise ValueError("backend 'openai' samples the server's model; it cannot load a local adapter")
        from .openai import OpenAISampler

        return OpenAISampler.from_config(model)
    if model.backend == "tinker":
        from .tinker import TinkerSampler

        return TinkerSampler.from_config(model)
    raise ValueError(f"backend {model.backend!r} cannot sample")


def make_trainer(model: ModelConfig, lora: LoraConfig, train: TrainConfig, sample_batch_size: int = 16) -> Trainer:
    if model.backend == "local":
        from .local import LocalTrainer

        return LocalTrainer(resolve_model(model.model), rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                            target_modules=lora.target_modules, weight_decay=train.weight_decay,
                            max_grad_norm=train.max_grad_norm, gradient_checkpointing=train.gradient_checkpointing,
                            device=model.device, dtype=model.dtype, seed=train.seed, sample_batch_size=sample_batch_size)
    if model.backend == "tinker":
        from .tinker import TinkerTrainer

        return TinkerTrainer(model, lora, train)
    raise ValueError(f"backend {model.backend!r} cannot train")
