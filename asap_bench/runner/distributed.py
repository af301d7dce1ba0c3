"""Data-parallel helpers over torch.distributed (torchrun): one code path, world size 1 or more.

Under torchrun every rank runs the same job loop. Feature extraction is split
by fixed batches (rank r takes batches r, r + world, ...), each rank writing its
rows of one shared memory-mapped file, so the features are the same bytes as a
single process would write. Task jobs are dealt round-robin; outcomes are
gathered on rank 0, which prints the summary.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def init(device: str) -> str:
    """Join the process group torchrun set up; returns this rank's device."""
    use_cuda = device.startswith("cuda") and torch.cuda.is_available()
    if not active():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device


def barrier() -> None:
    if active():
        dist.barrier()


def agree(value: object) -> object:
    """Rank 0's value everywhere (e.g. whether a cache entry exists), so all ranks take one branch."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def total(value: int) -> int:
    if not active():
        return value
    tensor = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(tensor)
    return int(tensor.item())


def gather(items: list) -> list | None:
    """Every rank's list, concatenated on rank 0 (None elsewhere)."""
    if not active():
        return items
    parts: list = [None] * world() if rank() == 0 else None
    dist.gather_object(items, parts, dst=0)
    return [x for part in parts for x in part] if rank() == 0 else None


def shutdown() -> None:
    if active():
        dist.destroy_process_group()
