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
from crfrnn_deeplab.weights.checkpoint import Checkpoint, CheckpointError, model_entries

__all__ = ["training_checkpoint", "check_training_state", "restore_training_state", "stage_dir",
           "find_resume_checkpoint"]


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


def _is_non_negative_int(value: Any) -> bool:
    """A step, epoch or batch position: an int (not a bool) >= 0."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_training_state(checkpoint: dict[str, Any], path: str | Path) -> None:
    """Checks the entries of a training checkpoint that are not weights (stage, step, data position, RNG
    states, best score, elapsed time, a pending evaluation, the stage-2 baseline), so that a hand-edited or
    foreign one fails before a resumed run writes anything. The model, optimiser and scheduler states are
    checked by loading them.

    Raises:
        CheckpointError: naming ``path`` and the entry.
    """

    def refuse(entry: str, expected: str) -> CheckpointError:
        value = repr(checkpoint.get(entry))
        return CheckpointError(f"{path}: cannot resume it: its {entry!r} entry is {value[:80]}, expected {expected}")

    if checkpoint.get("stage") not in (1, 2) or isinstance(checkpoint.get("stage"), bool):
        raise refuse("stage", "1 or 2")
    if not _is_non_negative_int(checkpoint.get("step")):
        raise refuse("step", "an int >= 0")
    data = checkpoint.get("data")
    if not (isinstance(data, dict) and _is_non_negative_int(data.get("epoch"))
            and _is_non_negative_int(data.get("batch"))):
        raise refuse("data", "{'epoch': int >= 0, 'batch': int >= 0}")
    best = checkpoint.get("best", {"value": 0.0, "step": 0})
    if not (isinstance(best, dict) and isinstance(best.get("value"), (int, float))
            and _is_non_negative_int(best.get("step"))):
        raise refuse("best", "{'metric': ..., 'value': number, 'step': int >= 0}")
    if not isinstance(checkpoint.get("elapsed_s", 0.0), (int, float)):
        raise refuse("elapsed_s", "a number of seconds")
    if not isinstance(checkpoint.get("evaluation_pending", False), bool):
        raise refuse("evaluation_pending", "True or False (whether it was written before its step's evaluation)")
    baseline = checkpoint.get("baseline")
    if checkpoint["stage"] == 2 and not (isinstance(baseline, dict) and isinstance(baseline.get("rows"), dict)
                                         and "grid_search" in baseline):
        raise refuse("baseline", "the baseline rows that stage 2 is compared with ({'rows': ..., 'grid_search': ...})")
    current = rng_state()
    try:
        set_rng_state(checkpoint["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:
        raise CheckpointError(f"{path}: cannot resume it: its 'rng' entry is not the RNG states train.py saves "
                              f"({type(e).__name__}: {str(e)[:120]})") from e
    finally:
        set_rng_state(current)


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
