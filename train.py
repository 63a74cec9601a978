"""Train DeepLab v2 (stage 1), then the network and its dense CRF jointly as CRF-as-RNN (stage 2), and compare.

    python train.py                                        # synthetic data, both stages, CPU (configs/synthetic.yaml)
    python train.py --config configs/voc12_deeplabv2.yaml data.root=/data/voc model.init_from=resnet101.pth
    python train.py --config configs/voc12_crfrnn.yaml data.root=/data/voc \\
        model.init_from=runs/voc12_deeplabv2/stage1/last.pt
    python train.py --resume runs/synthetic                # continue an interrupted run exactly
    python train.py --eval-only runs/synthetic/stage2/last.pt
    torchrun --nproc_per_node=2 train.py stage1.batch_size=4     # DistributedDataParallel (gloo on CPU)

Stage 1 (Chen et al., DeepLab v2, TPAMI 2017): SGD with momentum 0.9 and weight decay 5e-4, poly learning
rate (power 0.9), the head at 10× (weights) and 20× (biases, no decay) the backbone's rate, cross-entropy on
the full-resolution logits (and on every MSC scale). Stage 2 (Zheng et al., CRF-as-RNN, ICCV 2015): the
stage-1 network plus :class:`~crfrnn_deeplab.MeanFieldCRF`, trained end to end, the CRF's parameters in their
own group. The final table compares, on the validation split, the network alone, the network with the initial
fixed-weight CRF, with a grid-searched post-processing CRF, and the jointly trained model.

Outputs (``out_dir``): ``config.yaml`` (resolved), ``metrics.jsonl``, ``stage{1,2}/{last,best}.pt``,
``stage{1,2}/panels/*.png``, ``results.json`` and ``results.md`` (the final table).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from crfrnn_deeplab import CRFRNN, EvalTransform, InputConvention, MeanFieldCRF, TrainTransform, get_model
from crfrnn_deeplab import datasets as ds
from crfrnn_deeplab import distributed as dist
from crfrnn_deeplab.weights.checkpoint import load_checkpoint, remove_stale_temporaries, save_checkpoint
from crfrnn_deeplab.training.config import Config, ConfigError, StageConfig, config_from_dict, load_config, save_config
from crfrnn_deeplab.training.config import apply_overrides, to_dict, validate
from crfrnn_deeplab.weights.convert import load_into, model_for_checkpoint
from crfrnn_deeplab.training.engine import MetricsWriter, SeededAugmentation, StopRequest, TrainBatches, derive_seed
from crfrnn_deeplab.training.engine import format_table, poly_schedule, rng_state, segmentation_loss, set_rng_state
from crfrnn_deeplab.training.engine import sliding_window_logits
from crfrnn_deeplab.crf.mean_field import fixed_crf
from crfrnn_deeplab.training.grid_search import cache_logits, grid_search_crf
from crfrnn_deeplab.training.metrics import BOUNDARY_WIDTHS, SegmentationMeter, boundary_bands
from crfrnn_deeplab.allocator import retain_freed_memory
from crfrnn_deeplab.visualize import save_panel

logger = logging.getLogger("train")

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "synthetic.yaml"
IGNORE = ds.IGNORE_INDEX
STAGE_NAMES = {1: "stage 1 (DeepLab v2)", 2: "stage 2 (CRF-as-RNN)"}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; no update was made."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM (or ``--stop-after``) stopped the run after saving a checkpoint."""

    def __init__(self, signum: int | None, checkpoint: Path) -> None:
        super().__init__(signum, checkpoint)
        self.signum, self.checkpoint = signum, checkpoint


@dataclasses.dataclass
class Data:
    """The datasets of a run (transforms applied) and their class names."""

    train: Dataset  # raw samples; stages wrap it in SeededAugmentation with train_transform
    train_transform: TrainTransform
    val: Dataset
    held_out: Dataset  # images for the post-processing CRF grid search
    class_names: tuple[str, ...]


# ------------------------------------------------------------------------------------------------------------
# Building blocks


def build_data(cfg: Config, convention) -> Data:
    """Training (DeepLab augmentation), validation and held-out datasets.

    The grid-search images are held out from the validation numbers for synthetic data (another seed); for
    real datasets they are a subset of the validation split, as in the DeepLab paper.
    """
    d = cfg.data
    train_tf = TrainTransform(convention, crop_size=d.crop_size, scale_range=tuple(d.scale_range),
                              hflip_prob=d.hflip_prob, ignore_index=IGNORE, seed=cfg.seed)
    eval_tf = EvalTransform(convention, ignore_index=IGNORE)
    if d.dataset == "synthetic":
        train = ds.SyntheticSegmentation(split="train", num_images=d.train_images, seed=cfg.seed, size=d.image_size)
        val = ds.SyntheticSegmentation(split="val", num_images=d.val_images, seed=cfg.seed, size=d.image_size,
                                       transform=eval_tf)
        held_out_count = max(1, cfg.grid_search.held_out_images)
        held_out = ds.SyntheticSegmentation(split="val", num_images=held_out_count, seed=cfg.seed + 1,
                                            size=d.image_size, transform=eval_tf)
    else:
        root = Path(d.root)
        if not root.is_dir():
            raise ConfigError(f"data.root={d.root!r} is not a directory (dataset {d.dataset!r})")
        train, val = _real_datasets(cfg, root, eval_tf)
        count = min(max(1, cfg.grid_search.held_out_images), len(val))
        held_out = Subset(val, np.linspace(0, len(val) - 1, count).round().astype(int).tolist())
    if train.num_classes != cfg.model.num_classes:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes}, but dataset {d.dataset!r} has "
                          f"{train.num_classes} classes")
    return Data(train, train_tf, val, held_out, tuple(train.class_names))


def _real_datasets(cfg: Config, root: Path, eval_tf) -> tuple[ds.SegmentationDataset, ds.SegmentationDataset]:
    name = cfg.data.dataset
    if name == "voc12_aug":
        return (ds.VOCAugSegmentation(root / "VOC2012", root / "SBD"),
                ds.VOCSegmentation(root / "VOC2012", split="val", transform=eval_tf))
    if name == "voc12":
        return ds.VOCSegmentation(root, split="train"), ds.VOCSegmentation(root, split="val", transform=eval_tf)
    if name == "coco_stuff":
        return (ds.COCOStuffSegmentation(root, split="train"),
                ds.COCOStuffSegmentation(root, split="val", transform=eval_tf))
    if name == "cityscapes":
        return (ds.CityscapesSegmentation(root, split="train"),
                ds.CityscapesSegmentation(root, split="val", transform=eval_tf))
    f = cfg.data.folder  # "folder"
    common = dict(class_names=f.class_names, mask_suffix=f.mask_suffix, reduce_zero_label=f.reduce_zero_label)
    return (ds.FolderSegmentation(root / f.image_dir / f.train_split, root / f.mask_dir / f.train_split, **common),
            ds.FolderSegmentation(root / f.image_dir / f.val_split, root / f.mask_dir / f.val_split,
                                  transform=eval_tf, **common))


def build_eval_loader(dataset: Dataset, cfg: Config, *, max_images: int = 0) -> DataLoader:
    """This rank's shard of ``dataset`` (the first ``max_images`` images when > 0), in order."""
    if max_images:
        dataset = Subset(dataset, range(min(max_images, len(dataset))))
    return DataLoader(dataset, batch_size=cfg.eval.batch_size, sampler=dist.ShardSampler(len(dataset)),
                      num_workers=cfg.data.workers)


def build_network(cfg: Config) -> nn.Module:
    """The registered DeepLab v2 model named by ``model.name`` with ``model.options``."""
    return get_model(cfg.model.name, num_classes=cfg.model.num_classes, **cfg.model.options)


def build_crf(cfg: Config) -> MeanFieldCRF:
    """The CRF layer with its initial (fixed-weight CRF) parameters from ``crf.*``."""
    return MeanFieldCRF(num_classes=cfg.model.num_classes, **dataclasses.asdict(cfg.crf))


def load_network_weights(network: nn.Module, path: str, layout: str) -> str:
    """Loads ``model.init_from`` (our checkpoints or any layout the converter reads) and returns the report."""
    report = load_into(network, path, layout=layout)
    return str(report)


def build_optimizer(model: nn.Module, stage: StageConfig) -> torch.optim.SGD:
    """SGD with the DeepLab v2 parameter groups, chosen by the model's structure (not by name):
    backbone 1×, head weights 10×, head biases 20× without weight decay, CRF parameters at ``crf_lr`` without
    weight decay."""
    groups = [
        {"name": "backbone", "params": model.backbone_parameters(), "lr": stage.lr, "weight_decay": stage.weight_decay},
        {"name": "head_weights", "params": model.head_weights(), "lr": 10 * stage.lr,
         "weight_decay": stage.weight_decay},
        {"name": "head_biases", "params": model.head_biases(), "lr": 20 * stage.lr, "weight_decay": 0.0},
    ]
    if isinstance(model, CRFRNN):
        groups.append({"name": "crf", "params": model.crf_parameters(), "lr": stage.crf_lr, "weight_decay": 0.0})
    groups = [g for g in groups if g["params"]]
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}, "a trainable parameter has no group"
    return torch.optim.SGD(groups, lr=stage.lr, momentum=stage.momentum)


def build_scheduler(optimizer: torch.optim.Optimizer, stage: StageConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Poly decay of every group's rate to 0 over the stage."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, poly_schedule(stage.iterations, stage.poly_power))


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype (CUDA with ``amp``: bfloat16 where supported, else float16), or None."""
    if not (cfg.amp and device.type == "cuda"):
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def use_configured_learning_rates(optimizer: torch.optim.Optimizer, scheduler, fresh: torch.optim.Optimizer) -> None:
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


def wrap_for_training(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel when running under torchrun, else the model itself."""
    if dist.get_world_size() == 1:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


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


# ------------------------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_payload(model: nn.Module, cfg: Config, data: Data, *, stage: int, step: int, optimizer=None,
                       scheduler=None, scaler=None, batches: TrainBatches | None = None,
                       extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The self-describing checkpoint dict (see :mod:`crfrnn_deeplab.weights.checkpoint`)."""
    network = model.network if isinstance(model, CRFRNN) else model
    payload = {
        "model": model.state_dict(),
        "model_config": {"name": cfg.model.name, "num_classes": cfg.model.num_classes,
                         "options": dict(cfg.model.options),
                         "crf": dataclasses.asdict(cfg.crf) if isinstance(model, CRFRNN) else None},
        "input_convention": network.input_convention.to_dict(),
        "class_names": list(data.class_names),
        "step": step,
        "stage": stage,
        "config": to_dict(cfg),
        "rng": rng_state(),
    }
    if optimizer is not None:
        payload.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict())
    if scaler is not None and scaler.is_enabled():
        payload["grad_scaler"] = scaler.state_dict()
    if batches is not None:
        payload["data"] = batches.state_dict()
    payload.update(extra or {})
    return payload


def stage_dir(cfg: Config, stage: int) -> Path:
    return Path(cfg.out_dir) / f"stage{stage}"


def find_resume_checkpoint(path: Path) -> Path:
    """A checkpoint file, or the latest ``stage*/last.pt`` of a run directory."""
    if path.is_file():
        return path
    for candidate in (path / "stage2" / "last.pt", path / "stage1" / "last.pt"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"nothing to resume in {path}: no stage2/last.pt or stage1/last.pt")


# ------------------------------------------------------------------------------------------------------------
# Training


def forward_loss(model: nn.Module, batch: dict, stage: StageConfig, device: torch.device, normaliser) -> torch.Tensor:
    """The stage's loss on one micro-batch: the CRF's output (stage 2, plus ``network_loss_weight`` × the
    network's), or the network's (stage 1, every MSC scale)."""
    image = batch["image"].to(device, non_blocking=True)
    label = batch["label"].to(device, non_blocking=True)
    if isinstance(getattr(model, "module", model), CRFRNN):
        out = model(image, batch["raw"].to(device, non_blocking=True), batch["valid"].to(device, non_blocking=True))
        loss = segmentation_loss(out.crf, label, normaliser=normaliser, ignore_index=IGNORE)
        if stage.network_loss_weight:
            loss = loss + stage.network_loss_weight * segmentation_loss(out.network, label, normaliser=normaliser,
                                                                        ignore_index=IGNORE)
        return loss
    return segmentation_loss(model(image), label, normaliser=normaliser, ignore_index=IGNORE)


def optimizer_step(model: nn.Module, optimizer, scaler, micro: list[dict], *, stage: StageConfig,
                   device: torch.device, dtype: torch.dtype | None, stop: StopRequest) -> tuple[float, bool, bool]:
    """One optimiser step over the micro-batches of a global batch (gradient accumulation).

    The summed pixel loss is divided by the labelled pixels of the whole global batch (all micro-batches, all
    ranks), so that one process with batch N·B, N processes with batch B and accumulation steps all compute
    the same gradient. ``dtype``: the autocast dtype (None: float32). Non-finite losses and stop requests are agreed on by all ranks in one all-reduce; the
    update is skipped when a loss is not finite.

    Returns:
        ``(loss, not_finite, stop)``: the global batch's mean loss and the two agreed flags.
    """
    world = dist.get_world_size()
    labelled = torch.tensor(float(sum(int((b["label"] != IGNORE).sum()) for b in micro)), device=device)
    normaliser = dist.all_reduce_sum(labelled).clamp_min(1.0) / world  # DDP averages the ranks' gradients
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device)
    for i, batch in enumerate(micro):
        last = i == len(micro) - 1
        no_sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else contextlib.nullcontext()
        with no_sync, torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = forward_loss(model, batch, stage, device, normaliser)
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
    flags = torch.stack([loss_sum / world, (~torch.isfinite(loss_sum)).float(),
                         torch.tensor(float(stop.requested), device=device)])
    loss_value, not_finite, stop_now = dist.all_reduce_sum(flags).tolist()
    if not not_finite:
        scaler.step(optimizer)
        scaler.update()
    return loss_value, bool(not_finite), bool(stop_now)


def train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler: torch.amp.GradScaler,
    batches: TrainBatches,
    *,
    cfg: Config,
    stage: int,
    start_step: int,
    device: torch.device,
    save,
    evaluate_now,
    metrics: MetricsWriter,
    stop: StopRequest,
    stop_after: int | None = None,
) -> None:
    """The stage's optimiser steps from ``start_step``, with logging, evaluation, checkpoints and stopping
    (SIGINT/SIGTERM, ``stop_after``) at step boundaries.

    Args:
        model: the model to train (DDP-wrapped under torchrun).
        save: ``save(step)`` writes the stage's ``last.pt``.
        evaluate_now: ``evaluate_now(step)`` evaluates on the validation split (and keeps ``best.pt``).
        stop_after: stop as if interrupted after this many steps of this call.

    Raises:
        NonFiniteLossError: the loss became NaN/inf (the step is not applied, ``last.pt`` is left as it was).
        TrainingInterrupted: stopped by a signal or ``stop_after`` after saving ``last.pt``.
    """
    s: StageConfig = getattr(cfg, f"stage{stage}")
    images_per_step = s.batch_size * s.accumulate * dist.get_world_size()
    dtype = autocast_dtype(cfg, device)
    last_saved = start_step if start_step else None
    model.train()
    bar = tqdm(total=s.iterations, initial=start_step, desc=STAGE_NAMES[stage], dynamic_ncols=True,
               disable=not dist.is_main_process())
    timer, timed_steps = time.perf_counter(), 0
    try:
        for done in range(start_step + 1, s.iterations + 1):
            micro = [next(batches) for _ in range(s.accumulate)]
            loss, not_finite, stop_now = optimizer_step(model, optimizer, scaler, micro, stage=s, device=device,
                                                        dtype=dtype, stop=stop)
            if not_finite:
                where = (f"the last good checkpoint is {stage_dir(cfg, stage) / 'last.pt'} (step {last_saved})"
                         if last_saved is not None else "no checkpoint of this stage was written yet")
                raise NonFiniteLossError(
                    f"{STAGE_NAMES[stage]}, step {done}: the loss is {loss} (not finite); stopped without applying "
                    f"the update, {where}. Resume with a lower learning rate, e.g. "
                    f"python train.py --resume {cfg.out_dir} stage{stage}.lr={s.lr / 10:g}"
                )
            scheduler.step()
            bar.update(1)
            timed_steps += 1
            if done % cfg.log_every == 0 or done == s.iterations:
                rate = timed_steps * images_per_step / (time.perf_counter() - timer)
                lr = optimizer.param_groups[0]["lr"]
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
                metrics.write({"kind": "train", "stage": stage, "step": done, "loss": loss, "lr": lr,
                               "images_per_s": rate, "epoch": batches.epoch}, global_step=done)
                timer, timed_steps = time.perf_counter(), 0
            if done == s.iterations or (s.eval_every and done % s.eval_every == 0):
                evaluate_now(done)
                model.train()
                timer, timed_steps = time.perf_counter(), 0
            stopping = stop_now or (stop_after is not None and done - start_step >= stop_after)
            if done % s.checkpoint_every == 0 or done == s.iterations or stopping:
                save(done)
                last_saved = done
            if stopping:
                raise TrainingInterrupted(stop.signum, stage_dir(cfg, stage) / "last.pt")
    finally:
        bar.close()


# ------------------------------------------------------------------------------------------------------------
# Evaluation


def predict_logits(network: nn.Module, image: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Full-image or sliding-window logits at the evaluation size (float32)."""
    if cfg.eval.mode == "sliding":
        return sliding_window_logits(network, image, window=cfg.eval.window, stride=cfg.eval.stride)
    return network(image).float()


@torch.no_grad()
def evaluate(
    network: nn.Module,
    crfs: dict[str, MeanFieldCRF | None],
    loader: DataLoader,
    cfg: Config,
    device: torch.device,
    *,
    panel: Path | None = None,
) -> dict[str, dict[str, Any]]:
    """The network's predictions alone and through each CRF, scored side by side (reduced over ranks).

    Args:
        crfs: ``{row name: CRF or None (the network alone)}``.
        panel: where rank 0 writes a PNG of its first ``eval.panels`` images, one column per row of ``crfs``.

    Returns:
        ``{row name: SegmentationMeter.summary()}``.
    """
    network.eval()
    for crf in crfs.values():
        if crf is not None:
            crf.eval()
    meters = {name: SegmentationMeter(cfg.model.num_classes, ignore_index=IGNORE, device=device) for name in crfs}
    rows: list[list[torch.Tensor]] = []
    dtype = autocast_dtype(cfg, device)
    for batch in loader:
        image, label = batch["image"].to(device), batch["label"].to(device)
        raw, valid = batch["raw"].to(device), batch["valid"].to(device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = predict_logits(network, image, cfg)
        bands = boundary_bands(label, BOUNDARY_WIDTHS, ignore_index=IGNORE)
        predictions = {}
        for name, crf in crfs.items():
            predictions[name] = (logits if crf is None else crf(logits, raw, valid)).argmax(1)
            meters[name].update(predictions[name], label, bands)
        for i in range(min(len(image), cfg.eval.panels - len(rows))):
            rows.append([raw[i].cpu(), *(p[i].cpu() for p in predictions.values()), label[i].cpu()])
    for meter in meters.values():
        meter.reduce()
    if panel is not None and rows and dist.is_main_process():
        save_panel(panel, rows, titles=["image", *crfs, "ground truth"], num_classes=cfg.model.num_classes)
    return {name: meter.summary() for name, meter in meters.items()}


def evaluate_baselines(network: nn.Module, data: Data, cfg: Config, device: torch.device) -> dict[str, Any]:
    """The rows the learned CRF is compared with: the network alone, with the initial fixed-weight CRF, and
    with a post-processing CRF grid-searched on the held-out images.

    Returns:
        ``{"rows": {name: summary}, "grid_search": {...} or None}``.
    """
    crfs: dict[str, MeanFieldCRF | None] = {"network alone": None,
                                            "network + initial CRF (fixed)": build_crf(cfg).to(device)}
    grid = None
    if cfg.grid_search.enabled:
        start = time.perf_counter()
        g = cfg.grid_search
        cached = cache_logits(network, build_eval_loader(data.held_out, cfg), device=device,
                              predict=lambda net, image: predict_logits(net, image, cfg))
        result = grid_search_crf(cached, num_classes=cfg.model.num_classes, bilateral_weights=g.bilateral_weights,
                                 theta_alphas=g.theta_alphas, theta_betas=g.theta_betas,
                                 spatial_weight=cfg.crf.spatial_weight, theta_gamma=cfg.crf.theta_gamma,
                                 iterations=cfg.crf.eval_iterations, normalization=cfg.crf.normalization,
                                 ignore_index=IGNORE, progress=dist.is_main_process())
        del cached
        grid = {"params": result.params, "held_out_miou": result.miou, "held_out_images": len(data.held_out),
                "seconds": time.perf_counter() - start, "trials": result.trials, "at_edge": result.at_edge}
        logger.info("grid-searched post-processing CRF: %s (held-out mIoU %.2f, %d combinations, %.0f s)",
                    result.params, 100 * result.miou, len(result.trials), grid["seconds"])
        crfs["network + grid-searched CRF"] = fixed_crf(
            num_classes=cfg.model.num_classes, spatial_weight=cfg.crf.spatial_weight,
            theta_gamma=cfg.crf.theta_gamma, iterations=cfg.crf.eval_iterations,
            normalization=cfg.crf.normalization, **result.params).to(device)
    rows = evaluate(network, crfs, build_eval_loader(data.val, cfg), cfg, device,
                    panel=Path(cfg.out_dir) / "panels" / "baselines.png")
    return {"rows": rows, "grid_search": grid}


# ------------------------------------------------------------------------------------------------------------
# The run


def run_stage(stage: int, network: nn.Module, cfg: Config, data: Data, device: torch.device, *,
              resume: dict[str, Any] | None, metrics: MetricsWriter, stop: StopRequest, stop_after: int | None,
              baseline: dict[str, Any] | None = None, elapsed=lambda: 0.0) -> tuple[nn.Module, int]:
    """Trains one stage (from its start or from ``resume``); returns the trained model (network or CRFRNN) and
    the number of steps this call ran. ``elapsed()``: seconds the run has taken so far (saved in checkpoints)."""
    s: StageConfig = getattr(cfg, f"stage{stage}")
    model = network if stage == 1 else CRFRNN(network=network, crf=build_crf(cfg)).to(device)
    optimizer, start_step = build_optimizer(model, s), 0
    scheduler = build_scheduler(optimizer, s)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype(cfg, device) == torch.float16)
    samples = SeededAugmentation(data.train, data.train_transform, seed=derive_seed(cfg.seed, stage))
    batches = TrainBatches(samples, batch_size=s.batch_size, workers=cfg.data.workers,
                           seed=derive_seed(cfg.seed, stage), rank=dist.get_rank(), world_size=dist.get_world_size(),
                           pin_memory=device.type == "cuda")
    best = {"metric": "miou", "value": -1.0, "step": 0}
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if "grad_scaler" in resume:
            scaler.load_state_dict(resume["grad_scaler"])
        batches.load_state_dict(resume["data"])
        set_rng_state(resume["rng"])
        best, start_step = dict(resume.get("best", best)), int(resume["step"])
        use_configured_learning_rates(optimizer, scheduler, build_optimizer(model, s))
        logger.info("resuming %s at step %d of %d", STAGE_NAMES[stage], start_step, s.iterations)
    directory = stage_dir(cfg, stage)
    if dist.is_main_process():
        directory.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(directory)
    trained = wrap_for_training(model, device)
    extra = {"baseline": baseline} if baseline is not None else {}

    def save(step: int, is_best: bool = False) -> None:
        check_replicas_identical(model)
        if not dist.is_main_process():
            return
        payload = checkpoint_payload(model, cfg, data, stage=stage, step=step, optimizer=optimizer,
                                     scheduler=scheduler, scaler=scaler, batches=batches,
                                     extra={"best": best, "elapsed_s": elapsed(), **extra})
        save_checkpoint(directory / ("best.pt" if is_best else "last.pt"), payload)

    def evaluate_now(step: int) -> None:
        crfs = {"network": None} if stage == 1 else {"network": None, "network + CRF": model.crf}
        rows = evaluate(network, crfs, build_eval_loader(data.val, cfg, max_images=cfg.eval.max_images), cfg,
                        device, panel=directory / "panels" / f"step_{step:06d}.png")
        main_row = rows["network" if stage == 1 else "network + CRF"]
        metrics.write({"kind": "eval", "stage": stage, "step": step,
                       **{name: {k: v for k, v in r.items() if k != "iou"} for name, r in rows.items()}},
                      global_step=step)
        summary = ", ".join(f"{name}: mIoU {100 * r['miou']:.2f} / 5px band {100 * r['boundary_miou_5px']:.2f}"
                            for name, r in rows.items())
        if dist.is_main_process():
            tqdm.write(f"[{STAGE_NAMES[stage]} step {step}] {summary}")
        if main_row["miou"] > best["value"]:
            best.update(value=main_row["miou"], step=step)
            save(step, is_best=True)

    train_steps(trained, optimizer, scheduler, scaler, batches, cfg=cfg, stage=stage, start_step=start_step,
                device=device, save=save, evaluate_now=evaluate_now, metrics=metrics, stop=stop,
                stop_after=stop_after)
    batches.close()
    return model, s.iterations - start_step


def run(cfg: Config, *, resume: dict[str, Any] | None = None, stop_after: int | None = None) -> dict[str, Any]:
    """Both stages (or what is left of them after ``resume``), then the final comparison table."""
    device = dist.init_distributed(cfg.device)
    started = time.perf_counter()
    before = float(resume.get("elapsed_s", 0.0)) if resume is not None else 0.0

    def elapsed() -> float:
        return before + time.perf_counter() - started

    out = Path(cfg.out_dir)
    if dist.is_main_process():
        save_config(cfg, out / "config.yaml")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    network = use_sync_batchnorm(build_network(cfg), device).to(device)
    resume_stage = resume["stage"] if resume is not None else 0
    stage_done = resume_stage == 1 and resume["step"] >= cfg.stage1.iterations
    if resume is not None:  # the weights (loaded by the stage) expect the preprocessing they were trained with
        network.input_convention = InputConvention.from_dict(resume["input_convention"])
    elif cfg.model.init_from:
        report = load_network_weights(network, cfg.model.init_from, cfg.model.init_layout)
        logger.info("model.init_from %s:\n%s", cfg.model.init_from, report)
    elif cfg.stage1.iterations == 0:
        logger.warning("stage 2 starts from a randomly initialised network: set model.init_from to a stage-1 "
                       "checkpoint")
    # after the weights: a converted checkpoint brings its own input convention (e.g. Caffe BGR)
    data = build_data(cfg, network.input_convention)
    metrics = MetricsWriter(out, enabled=dist.is_main_process())
    baseline = resume.get("baseline") if resume_stage == 2 else None
    with StopRequest() as stop:
        if cfg.stage1.iterations and resume_stage <= 1 and not stage_done:
            _, steps = run_stage(1, network, cfg, data, device, resume=resume if resume_stage == 1 else None,
                                 metrics=metrics, stop=stop, stop_after=stop_after, elapsed=elapsed)
            stop_after = None if stop_after is None else stop_after - steps
            if stop_after == 0:
                raise TrainingInterrupted(None, stage_dir(cfg, 1) / "last.pt")
        elif resume_stage == 1:  # stage 1 finished before the interruption
            network.load_state_dict(resume["model"])
        if baseline is None:
            baseline = evaluate_baselines(network, data, cfg, device)
        results = dict(baseline["rows"])
        learned = None
        if cfg.stage2.iterations:
            joint, _ = run_stage(2, network, cfg, data, device, resume=resume if resume_stage == 2 else None,
                                 metrics=metrics, stop=stop, stop_after=stop_after, baseline=baseline,
                                 elapsed=elapsed)
            rows = evaluate(joint.network, {"joint: network alone": None, "joint: CRF-as-RNN": joint.crf},
                            build_eval_loader(data.val, cfg), cfg, device, panel=out / "panels" / "joint.png")
            results.update(rows)
            learned = {**joint.crf.bandwidths, "spatial_weight_diag": joint.crf.spatial_weight.diagonal().tolist(),
                       "bilateral_weight_diag": joint.crf.bilateral_weight.diagonal().tolist(),
                       "compatibility": joint.crf.compatibility.tolist()}
    minutes = elapsed() / 60
    report = write_report(results, cfg, out, grid=baseline["grid_search"], learned=learned, minutes=minutes,
                          images=len(data.val), class_names=data.class_names)
    metrics.write({"kind": "final", "results": {n: {k: v for k, v in r.items() if k != "iou"}
                                                for n, r in results.items()}})
    metrics.close()
    if dist.is_main_process():
        print(report, flush=True)
    return results


def write_report(results: dict[str, dict[str, Any]], cfg: Config, out: Path, *, grid: dict | None,
                 learned: dict | None, minutes: float, images: int, class_names) -> str:
    """The final table (printed, ``results.md``) and everything behind it (``results.json``); rank 0 writes."""
    lines = [f"Validation: {cfg.data.dataset}, {images} images, {cfg.crf.eval_iterations} mean-field iterations; "
             f"{minutes:.1f} min", "", format_table(results), ""]
    if grid is not None:
        p = grid["params"]
        lines.append(f"Grid-searched CRF ({len(grid['trials'])} combinations on {grid['held_out_images']} held-out "
                     f"images): bilateral weight {p['bilateral_weight']:g}, θα {p['theta_alpha']:g}, "
                     f"θβ {p['theta_beta']:g} (spatial weight {cfg.crf.spatial_weight:g}, θγ {cfg.crf.theta_gamma:g})"
                     + (f"; on the edge of the grid in {', '.join(grid['at_edge'])}." if grid.get("at_edge") else "."))
    if learned is not None:
        lines.append(f"Learned CRF bandwidths: θα {learned['theta_alpha']:.3g}, θβ {learned['theta_beta']:.3g}, "
                     f"θγ {learned['theta_gamma']:.3g}.")
    text = "\n".join(lines)
    if dist.is_main_process():
        payload = {"results": results, "class_names": list(class_names), "grid_search": grid, "learned_crf": learned,
                   "minutes": minutes, "config": to_dict(cfg)}
        (out / "results.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")
        (out / "results.md").write_text(text + "\n", encoding="utf-8")
    return text


def run_eval_only(checkpoint: Path, cfg: Config) -> dict[str, Any]:
    """Scores a checkpoint: its network alone, + the initial CRF, + a grid-searched CRF, + its own CRF (if any)."""
    device = dist.init_distributed(cfg.device)
    model, report = model_for_checkpoint(checkpoint, num_classes=cfg.model.num_classes,
                                         msc=cfg.model.name.endswith("_msc"))
    logger.info("loaded %s:\n%s", checkpoint, report)
    model.to(device).eval()
    network = model.network if isinstance(model, CRFRNN) else model
    data = build_data(cfg, network.input_convention)
    out = Path(cfg.out_dir) / f"eval_{checkpoint.stem}"
    started = time.perf_counter()
    baseline = evaluate_baselines(network, data, dataclasses.replace(cfg, out_dir=str(out)), device)
    results = dict(baseline["rows"])
    learned = None
    if isinstance(model, CRFRNN):
        results.update(evaluate(network, {"network + learned CRF": model.crf}, build_eval_loader(data.val, cfg), cfg,
                                device, panel=out / "panels" / "learned.png"))
        learned = model.crf.bandwidths
    if dist.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
    text = write_report(results, cfg, out, grid=baseline["grid_search"], learned=learned,
                        minutes=(time.perf_counter() - started) / 60, images=len(data.val),
                        class_names=data.class_names)
    if dist.is_main_process():
        print(text, flush=True)
    return results


# ------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None,
                        help=f"experiment YAML overriding the defaults (default: {DEFAULT_CONFIG.name})")
    parser.add_argument("--resume", nargs="?", type=Path, const=Path(), default=None, metavar="RUN_OR_CHECKPOINT",
                        help="continue a run from a run directory (its latest stage*/last.pt) or a checkpoint; "
                             "without a value, the out_dir of the config. The run's own config is used, with the "
                             "command-line overrides on top")
    parser.add_argument("--eval-only", type=Path, default=None, metavar="CHECKPOINT",
                        help="only evaluate this checkpoint (ours or any layout crfrnn_deeplab.weights.convert reads)")
    parser.add_argument("--stop-after", type=int, default=None, metavar="STEPS",
                        help="stop after this many optimiser steps, saving a checkpoint as on SIGTERM")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides applied last, e.g. stage1.lr=1e-3 data.root=/data/voc")
    return parser.parse_args(argv)


def resolve(args: argparse.Namespace) -> tuple[Config, dict[str, Any] | None]:
    """The config of this invocation, and the checkpoint to resume (if any)."""
    if args.resume is None:
        config = args.config or (None if args.eval_only else DEFAULT_CONFIG)
        if args.eval_only is not None and config is None:
            ckpt = load_checkpoint(args.eval_only)
            if isinstance(ckpt.get("config"), dict):
                cfg = config_from_dict(ckpt["config"], source=f"{args.eval_only} (its config)")
                return validate(apply_overrides(cfg, args.overrides)), None
            config = DEFAULT_CONFIG
        return load_config(config, args.overrides), None
    location = args.resume
    if location == Path():
        location = Path(load_config(args.config or DEFAULT_CONFIG, args.overrides).out_dir)
    path = find_resume_checkpoint(location)
    checkpoint = load_checkpoint(path)
    cfg = config_from_dict(checkpoint["config"], source=f"{path} (its config)")
    before = to_dict(cfg)
    cfg = validate(apply_overrides(cfg, args.overrides))
    if to_dict(cfg) != before:
        logger.warning("resuming with changed settings: %s", args.overrides)
    logger.info("resuming from %s (stage %d, step %d)", path, checkpoint["stage"], checkpoint["step"])
    return cfg, checkpoint


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if "RANK" in os.environ and int(os.environ["RANK"]) > 0:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        cfg, resume = resolve(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif int(os.environ.get("LOCAL_WORLD_SIZE", 1)) > 1:  # torchrun: share the cores among the processes
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
    retain_freed_memory()
    try:
        if args.eval_only is not None:
            run_eval_only(args.eval_only, cfg)
        else:
            run(cfg, resume=resume, stop_after=args.stop_after)
    except TrainingInterrupted as e:
        name = signal.Signals(e.signum).name if e.signum else f"--stop-after {args.stop_after}"
        if dist.is_main_process():
            print(f"\nstopped by {name}; checkpoint: {e.checkpoint}\nresume with: python train.py --resume "
                  f"{cfg.out_dir}", file=sys.stderr)
        return 128 + e.signum if e.signum else 0
    except (NonFiniteLossError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        dist.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
