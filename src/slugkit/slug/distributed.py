"""``torch.distributed`` for the gradient pass (:mod:`slugkit.slug.gradpass`): under ``torchrun`` (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` set) the process group is initialised with NCCL on GPUs
and gloo on CPU; without those variables every function here is a no-op for one plain process."""

from __future__ import annotations

import os

import torch


def dist_info() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` outside a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str = "cpu") -> tuple[int, int, str]:
    """Initialise the process group from torchrun's variables (no-op without them); returns (rank, world, device)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        use_cuda = device.startswith("cuda") and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if world > 1 and device.startswith("cuda"):
        device = f"cuda:{local_rank}"
    rank, world = dist_info()
    return rank, world, device


def all_reduce_sums(sums: dict[str, torch.Tensor], count: int, names: list[str], device) -> int:
    """Sum ``sums[n]`` (in place) and the sample ``count`` over the ranks; returns the total count."""
    import torch.distributed as dist

    if dist_info()[1] == 1:
        return count
    for n in names:
        dist.all_reduce(sums[n], op=dist.ReduceOp.SUM)
    c = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(c, op=dist.ReduceOp.SUM)
    return int(c.item())


def barrier() -> None:
    """Wait for every rank (no-op for one process)."""
    import torch.distributed as dist

    if dist_info()[1] > 1:
        dist.barrier()


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (JSON-able or a set of bytes), in rank order; ``[obj]`` for one process."""
    import torch.distributed as dist

    world = dist_info()[1]
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out
