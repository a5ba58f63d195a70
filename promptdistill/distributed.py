"""Data-parallel training over the processes `accelerate launch` or `torchrun` start.

The launcher sets WORLD_SIZE, RANK and LOCAL_RANK in each process's environment; with
WORLD_SIZE > 1, `distill train` joins a torch.distributed process group (NCCL for CUDA
tensors, one GPU per process by LOCAL_RANK; gloo for CPU tensors), each process trains on
its share of every step's examples, gradients are summed across processes before the
optimiser step, and rank 0 alone writes the run dir. Without a launcher every function
here is a no-op, so single-process training runs exactly the code it always ran. torch is
imported only inside the functions that talk to other processes: the CLI imports this
module, and its light verbs do not load torch.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def my_share(items: list) -> list:
    """This process's share of a step (every world_size-th item, from its rank); all of it
    with one process."""
    return items[rank()::world_size()]


def is_main() -> bool:
    """True in the one process that writes files and prints (rank 0; the only one without a launcher)."""
    return rank() == 0


def start() -> str:
    """Join the launcher's process group (the rendezvous address comes from MASTER_ADDR/PORT);
    returns the communication backend."""
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # "cuda" then means this process's GPU
        # Scalars (losses, token counts, flags) are summed as CPU tensors, gradients on the GPU.
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend)
    return backend


def stop() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process; used where rank 0 is about to change files the others read."""
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()


def sum_across(values: list[float]) -> list[float]:
    """Each value summed over all processes (float64, so sums of many losses stay exact enough)."""
    if world_size() == 1:
        return values
    import torch
    import torch.distributed as dist

    total = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(total)
    return total.tolist()


def sum_gradients(params: list[torch.Tensor]) -> None:
    """Replace each parameter's gradient by its sum over all processes, in one all-reduce of
    one flat buffer (LoRA gradients are small; one message beats one per tensor)."""
    if world_size() == 1:
        return
    import torch
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()


def broadcast_from_main(params: list[torch.Tensor]) -> None:
    """Give every process rank 0's values (what DDP does at start): the LoRA init is seeded
    alike everywhere, but this makes equal weights a fact rather than an assumption."""
    if world_size() == 1:
        return
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)
