"""Training on several processes (``torchrun``): the DistributedDataParallel wrapper, SyncBatchNorm where it
exists, and a check that the replicas have stayed identical."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from crfrnn_deeplab import distributed as dist

__all__ = ["wrap_for_training", "use_sync_batchnorm", "check_replicas_identical"]

logger = logging.getLogger(__name__)


def wrap_for_training(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel when running under torchrun, else the model itself."""
    if dist.get_world_size() == 1:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def use_sync_batchnorm(network: nn.Module, device: torch.device) -> nn.Module:
    """SyncBatchNorm when BatchNorm is trained on several processes (CUDA only: PyTorch's SyncBatchNorm has no
    CPU implementation, so on CPU every process keeps its own batch statistics)."""
    trained_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None and m.weight.requires_grad
                     for m in network.modules())
    if dist.get_world_size() == 1 or not trained_bn:
        return network
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(network)
    logger.warning("BatchNorm is trained on %d CPU processes: statistics are per process (no SyncBatchNorm on CPU)",
                   dist.get_world_size())
    return network


def check_replicas_identical(model: nn.Module) -> None:
    """Under DDP, compares a float64 checksum of every parameter and buffer across the ranks and raises if the
    replicas have drifted apart (they must stay bitwise identical)."""
    if dist.get_world_size() == 1:
        return
    sums = torch.stack([t.detach().double().sum() for t in model.state_dict().values() if t.is_floating_point()])
    gathered = [torch.empty_like(sums) for _ in range(dist.get_world_size())]
    torch.distributed.all_gather(gathered, sums)
    differ = [r for r, g in enumerate(gathered) if not torch.equal(g, gathered[0])]
    if differ:
        raise RuntimeError(f"model replicas differ between rank 0 and rank(s) {differ}")
