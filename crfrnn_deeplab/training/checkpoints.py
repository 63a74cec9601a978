"""A training run's checkpoints: the payload (the model's description, shared with the converter through
:func:`crfrnn_deeplab.weights.checkpoint.model_entries`, plus the training state) and where they live."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crfrnn_deeplab.training.data_stream import TrainBatches
from crfrnn_deeplab.training.reproducibility import rng_state, set_rng_state
from crfrnn_deeplab.weights.checkpoint import Checkpoint, model_entries

__all__ = ["training_checkpoint", "restore_training_state", "stage_dir", "find_resume_checkpoint"]


def training_checkpoint(
    model: nn.Module,
    *,
    name: str,
    num_classes: int,
    options: dict[str, Any],
    crf: dict[str, Any] | None,
    class_names: Sequence[str],
    stage: int,
    step: int,
    config: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    batches: TrainBatches | None = None,
    extra: dict[str, Any] | None = None,
) -> Checkpoint:
    """The self-describing checkpoint of a run at ``step`` of ``stage``: the model's entries (``name``,
    ``num_classes``, ``options``, the CRF's arguments or None, ``class_names``), the resolved ``config``, the
    RNG states, and the optimiser, scheduler, gradient scaler and data position when given; ``extra`` last."""
    payload = Checkpoint(
        **model_entries(model, name=name, num_classes=num_classes, options=options, crf=crf,
                        class_names=list(class_names)),
        step=step,
        stage=stage,
        config=config,
        rng=rng_state(),
    )
    if optimizer is not None:
        payload.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict())
    if scaler is not None and scaler.is_enabled():
        payload["grad_scaler"] = scaler.state_dict()
    if batches is not None:
        payload["data"] = batches.state_dict()
    payload.update(extra or {})
    return payload


def restore_training_state(
    checkpoint: dict[str, Any],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    batches: TrainBatches,
) -> None:
    """Loads what :func:`training_checkpoint` saved into the run's objects and restores the global RNG states,
    so that the run continues the interrupted trajectory exactly."""
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    if "grad_scaler" in checkpoint:
        scaler.load_state_dict(checkpoint["grad_scaler"])
    batches.load_state_dict(checkpoint["data"])
    set_rng_state(checkpoint["rng"])


def stage_dir(out_dir: str | Path, stage: int) -> Path:
    """Where a stage's checkpoints and panels go: ``<out_dir>/stage<N>``."""
    return Path(out_dir) / f"stage{stage}"


def find_resume_checkpoint(path: Path) -> Path:
    """A checkpoint file, or the latest ``stage*/last.pt`` of a run directory."""
    if path.is_file():
        return path
    for candidate in (path / "stage2" / "last.pt", path / "stage1" / "last.pt"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"nothing to resume in {path}: no stage2/last.pt or stage1/last.pt")
