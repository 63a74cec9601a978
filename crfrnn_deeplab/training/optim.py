"""DeepLab v2's optimisation: SGD parameter groups chosen by the model's structure, the poly learning-rate
schedule, and taking the configured rates when a run is resumed."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from crfrnn_deeplab.models import CRFRNN

__all__ = ["parameter_groups", "poly_schedule", "poly_scheduler", "use_configured_learning_rates"]

logger = logging.getLogger(__name__)


def parameter_groups(model: nn.Module, *, lr: float, crf_lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """SGD parameter groups chosen by the model's structure (not by name): backbone ``lr``, head weights
    ``10 × lr``, head biases ``20 × lr`` without weight decay, the CRF's parameters (a :class:`CRFRNN`) at
    ``crf_lr`` without weight decay. Empty groups are left out; every trainable parameter is in one group."""
    groups = [
        {"name": "backbone", "params": model.backbone_parameters(), "lr": lr, "weight_decay": weight_decay},
        {"name": "head_weights", "params": model.head_weights(), "lr": 10 * lr, "weight_decay": weight_decay},
        {"name": "head_biases", "params": model.head_biases(), "lr": 20 * lr, "weight_decay": 0.0},
    ]
    if isinstance(model, CRFRNN):
        groups.append({"name": "crf", "params": model.crf_parameters(), "lr": crf_lr, "weight_decay": 0.0})
    groups = [g for g in groups if g["params"]]
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}, "a trainable parameter has no group"
    return groups


def poly_schedule(iterations: int, power: float) -> Callable[[int], float]:
    """The poly learning-rate factor of DeepLab: ``(1 - step / iterations) ** power`` (for ``LambdaLR``)."""

    def factor(step: int) -> float:
        return max(0.0, 1.0 - step / max(1, iterations)) ** power

    return factor


def poly_scheduler(optimizer: torch.optim.Optimizer, *, iterations: int,
                   power: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Poly decay of every group's rate to 0 over ``iterations`` steps."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, poly_schedule(iterations, power))


def use_configured_learning_rates(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                                  fresh: torch.optim.Optimizer) -> None:
    """After loading a checkpoint's optimiser and scheduler, take the base learning rates from the config (as
    in ``fresh``, built from it) so that ``--resume ... stage1.lr=...`` takes effect; unchanged rates give
    exactly the rates of the uninterrupted run."""
    bases = [g["lr"] for g in fresh.param_groups]
    if bases == scheduler.base_lrs:
        return
    logger.warning("resuming with base learning rates %s instead of %s", bases, scheduler.base_lrs)
    scheduler.base_lrs = bases
    for group, base, factor in zip(optimizer.param_groups, bases, scheduler.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * factor(scheduler.last_epoch)
