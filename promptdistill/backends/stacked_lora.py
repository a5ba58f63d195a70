"""Rows of one batch decoded through different LoRA adapters of one base model (`distill serve`
with several students): each LoRA layer's adapters stacked side by side once, and every row's
delta taken from the stack by the same two matmuls for the whole batch, with a mask that keeps
each row's own adapter's rank columns."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


class StackedLora:
    """Every LoRA adapter of the peft `model`, per LoRA layer: the A's stacked as [n * rank, in]
    and the B's, times their scaling (alpha / r, or alpha / sqrt(r) with rslora), as
    [out, n * rank]; adapter i owns columns i * rank to (i + 1) * rank, `rank` being the largest
    of any adapter. An adapter of a smaller rank, or without this layer, has zeros in its
    columns, which add exactly nothing. A copy of the adapters' weights, made once: whoever
    loads or deletes an adapter builds a new one.

    Why a mask and not each row's A and B gathered into [rows, r, in] for a bmm: the gathered
    copies are rows times an adapter's size per decoded token, and smollm2-135m's 210 LoRA
    layers at 16 rows and 3 adapters (one thread) then took as long as peft's mixed-batch loop,
    145 and 139 ms a token against 87 with one adapter; the stack, read once a token, took 91.
    Its work grows with the adapters loaded, not with the rows."""

    def __init__(self, model):
        from peft.tuners.lora import Linear, LoraLayer

        self.model = model
        self.names = list(model.peft_config)
        layers = {where: m for where, m in model.named_modules() if isinstance(m, LoraLayer) and m.lora_A}
        odd = [where for where, m in layers.items()
               if not isinstance(m, Linear) or m.lora_variant or any(m.lora_bias.values())]
        if odd:  # promptdistill trains plain LoRA on linear layers; nothing else is stacked
            raise ValueError(f"per-row adapters stack plain LoRA (no DoRA, no bias) on linear layers only; "
                             f"{odd[0]} is a {type(layers[odd[0]]).__name__} of another kind")
        self.rank = max(m.r[name] for m in layers.values() for name in m.lora_A)
        with torch.no_grad():
            self.stacks = {m: self._stack(m) for m in layers.values()}

    def _stack(self, layer) -> tuple[torch.Tensor, torch.Tensor]:
        weight = next(iter(layer.lora_A.values())).weight
        a = weight.new_zeros(len(self.names) * self.rank, layer.in_features)
        b = weight.new_zeros(layer.out_features, len(self.names) * self.rank)
        for i, name in enumerate(self.names):
            if name in layer.lora_A:
                cols = slice(i * self.rank, i * self.rank + layer.r[name])
                a[cols] = layer.lora_A[name].weight
                b[:, cols] = layer.lora_B[name].weight * layer.scaling[name]
        return a, b

    def mask(self, names: list[str | None]) -> torch.Tensor:
        """[rows, 1, n * rank]: ones over each row's adapter's columns, none for a row of None."""
        index = torch.tensor([len(self.names) if name is None else self.names.index(name) for name in names])
        one_hot = torch.eye(len(self.names) + 1)[index, :len(self.names)]  # None's row is all zeros
        a = next(iter(self.stacks.values()))[0]
        return one_hot.repeat_interleave(self.rank, dim=1)[:, None, :].to(a)

    @contextlib.contextmanager
    def per_row(self, names: list[str | None]):
        """While inside, every LoRA layer of the model adds to batch row i the delta of adapter
        `names[i]` (None: no adapter, the base model's output) instead of its active adapter's.
        `names` is read at every call, so a caller that drops finished rows updates it in place.
        Unknown names are refused. The LoRA dropout is not applied: this is inference."""
        unknown = sorted(set(names) - set(self.names) - {None})
        if unknown:
            raise ValueError(f"no LoRA adapter named {unknown} in this model (it has {self.names})")
        seen: dict = {"names": None}  # the names the mask was made for: made again when they change

        def add_delta(layer, args, out):
            if seen["names"] != names:
                seen["names"], seen["mask"] = list(names), self.mask(names)
            a, b = self.stacks[layer]
            # peft's order: the input in the adapter's dtype, the sum in the wider one, then the base's
            delta = F.linear(F.linear(args[0].to(a.dtype), a) * seen["mask"], b)
            return (out + delta).to(out.dtype)

        # peft's own LoRA forward off (each layer runs its base layer alone), the stacked delta added
        with self.model.disable_adapter():
            handles = [layer.register_forward_hook(add_delta) for layer in self.stacks]
            try:
                yield
            finally:
                for h in handles:
                    h.remove()
