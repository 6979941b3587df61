"""The processes of a torchrun job, for the apps that run on several (python -m wurst.batch, python -m wurst.train):
their process group, and decisions that rank 0 makes for all of them. torch.distributed does the work: nccl on
CUDA, gloo on the CPU."""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from wurst.errors import ArgumentError, WurstError

if TYPE_CHECKING:
    import torch


class ReportedByRankZero(Exception):
    """A refusal that rank 0 reports; the other processes exit quietly."""


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes, from torchrun's environment (0 and 1 without it)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[tuple[int, int, torch.device]]:
    """(rank, world size, device) for the time of the block, with a process group when there are several processes.
    Under torchrun each process uses cuda:LOCAL_RANK."""
    import torch

    rank, world = rank_and_world()
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        if device.index is not None and world > 1:
            raise ArgumentError(f"--device {device}: under torchrun each process uses cuda:LOCAL_RANK; pass cuda")
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if world == 1:
        yield rank, world, device
        return
    import torch.distributed as dist

    # The final barrier waits for the slowest process, which may be hours behind: no 30-minute default.
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(days=7))
    try:
        yield rank, world, device
    finally:
        dist.destroy_process_group()


def share(value, rank: int, world: int):
    """Rank 0's `value`, on every process."""
    if world == 1:
        return value
    import torch.distributed as dist

    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def decided_by_rank_zero(decide: Callable[[], object], rank: int, world: int):
    """decide() on rank 0, its result on every process. Where it refuses (WurstError, OSError), rank 0 raises the
    refusal and the others ReportedByRankZero: a torchrun job says it once, and no process waits for the others
    forever."""
    verdict = None
    if rank == 0:
        try:
            verdict = decide()
        except (WurstError, OSError) as e:
            verdict = e
    verdict = share(verdict, rank, world)
    if isinstance(verdict, BaseException):
        raise verdict if rank == 0 else ReportedByRankZero()
    return verdict
