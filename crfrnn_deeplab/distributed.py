"""Small torch.distributed helpers for ``torchrun`` training: set-up from the environment, rank queries,
reductions, and a sampler that shards an evaluation set without repeating images.

``torchrun --nproc_per_node=N train.py ...`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` (and the rendezvous
address); :func:`init_distributed` reads them and starts the default process group (NCCL for CUDA devices,
gloo on CPU). Without them everything here is a no-op for a single process.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = [
    "init_distributed",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "all_reduce_sum",
    "cleanup",
    "ShardSampler",
]

logger = logging.getLogger(__name__)


def init_distributed(device: str = "auto", *, timeout_minutes: float = 30.0) -> torch.device:
    """Starts the process group if launched by ``torchrun`` and returns this process's device.

    Args:
        device: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``, as a string.
            Under torchrun, ``"auto"``/``"cuda"`` mean ``cuda:LOCAL_RANK``.
        timeout_minutes: collective timeout.

    Returns:
        The torch device this process computes on.

    Raises:
        TypeError: ``device`` is not a string (e.g. a ``torch.device``: pass ``str(device)``).
        ValueError: a CUDA device is asked for and CUDA is not available.
    """
    if not isinstance(device, str):
        raise TypeError(f"device must be a string: 'auto', 'cpu', 'cuda' or 'cuda:N', got {type(device).__name__} "
                        f"{device!r}")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available (use device=cpu)")
    if device == "cuda":
        device = f"cuda:{local_rank}" if "WORLD_SIZE" in os.environ else "cuda"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) >= 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
        logger.info("process group: rank %d of %d (%s) on %s", dist.get_rank(), dist.get_world_size(), backend, dev)
    return dev


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank in the process group; 0 outside one."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """The number of processes in the process group; 1 outside one."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0: the one process that writes files and prints."""
    return get_rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sums ``tensor`` over the ranks, in place (no-op for one process); returns it."""
    if is_distributed() and get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def cleanup() -> None:
    """Destroys the process group (call at the end of a distributed run)."""
    if is_distributed():
        dist.destroy_process_group()


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, rank + 2·world, …`` of a dataset, in order, without padding.

    Unlike :class:`~torch.utils.data.DistributedSampler`, no index is repeated to even out the shards, so
    summed evaluation counts (confusion matrices) count every image exactly once.

    Args:
        length: the dataset's length.
        rank: this shard; default: :func:`get_rank`.
        world_size: the number of shards; default: :func:`get_world_size`.
    """

    def __init__(self, length: int, *, rank: int | None = None, world_size: int | None = None) -> None:
        self.length = length
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))
