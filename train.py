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
import logging
import math
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

try:  # the run directory's lock (run_dir_lock); POSIX only
    import fcntl
except ImportError:  # Windows
    fcntl = None

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from crfrnn_deeplab import distributed as dist
from crfrnn_deeplab.allocator import retain_freed_memory
from crfrnn_deeplab.crf import MeanFieldCRF
from crfrnn_deeplab.data import IGNORE_INDEX, DatasetError, EvalTransform, TrainTransform, build_datasets, dataset_spec
from crfrnn_deeplab.data.registry import scan_files
from crfrnn_deeplab.files import blocking_parent
from crfrnn_deeplab.models import CRFRNN, InputConvention, get_model, model_spec
from crfrnn_deeplab.training.checkpoints import check_training_state, find_resume_checkpoint
from crfrnn_deeplab.training.checkpoints import restore_training_state, stage_dir
from crfrnn_deeplab.training.checkpoints import training_checkpoint
from crfrnn_deeplab.training.config import Config, ConfigError, StageConfig, config_from_dict, is_resolved_config
from crfrnn_deeplab.training.config import load_config, read_config, resolve_config, save_config, to_dict
from crfrnn_deeplab.training.data_stream import SeededAugmentation, TrainBatches, derive_seed
from crfrnn_deeplab.training.divergence import DivergenceError, LossMonitor, crf_parameter_problem
from crfrnn_deeplab.training.errors import EXIT_RUNTIME, EXIT_USAGE, UsageError, original_message, print_error
from crfrnn_deeplab.training.ddp import check_replicas_identical, use_sync_batchnorm, wrap_for_training
from crfrnn_deeplab.training.evaluation import (Evaluator, NonFiniteLogitsError, SizeBatches, collate_by_size,
                                                 evaluate_baselines)
from crfrnn_deeplab.training.grid_search import CRFGrid
from crfrnn_deeplab.training.loss import forward_loss
from crfrnn_deeplab.training.metrics_log import MetricsLogError, MetricsWriter, kept_records
from crfrnn_deeplab.training.optim import parameter_groups, poly_scheduler, use_configured_learning_rates
from crfrnn_deeplab.training.report import format_report, save_results
from crfrnn_deeplab.training.reproducibility import seed_everything
from crfrnn_deeplab.training.signals import StopRequest, TrainingInterrupted
from crfrnn_deeplab.weights import load_checkpoint, load_into, model_for_checkpoint, save_checkpoint
from crfrnn_deeplab.weights.checkpoint import CheckpointError
from crfrnn_deeplab.weights.layouts import ConversionError
from crfrnn_deeplab.weights.checkpoint import remove_stale_temporaries

logger = logging.getLogger("train")

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "synthetic.yaml"
STAGE_NAMES = {1: "stage 1 (DeepLab v2)", 2: "stage 2 (CRF-as-RNN)"}


class NonFiniteLossError(DivergenceError):
    """The loss or the gradient became NaN or infinite; no update was made."""


#: What a run writes into ``out_dir``: ``--overwrite`` removes these (and nothing else) before a new run.
RUN_FILES = ("config.yaml", "metrics.jsonl", "results.json", "results.md", "stage1", "stage2", "panels",
             "tensorboard")
#: The entries of :data:`RUN_FILES` that are folders (the others are files).
RUN_FOLDERS = ("stage1", "stage2", "panels", "tensorboard")


@dataclasses.dataclass
class Data:
    """The datasets of a run (transforms applied) and their class names."""

    train: Dataset  # raw samples; stages wrap it in SeededAugmentation with train_transform
    train_transform: TrainTransform
    val: Dataset
    held_out: Dataset  # images for the post-processing CRF grid search
    class_names: tuple[str, ...]


# ------------------------------------------------------------------------------------------------------------
# Building blocks: the config turned into arguments


#: The config key each dataset builder option comes from (the folder layout's: ``data.folder.<option>``).
DATASET_OPTION_KEYS = {"root": "data.root", "seed": "seed", "size": "data.image_size",
                       "train_images": "data.train_images", "val_images": "data.val_images",
                       "held_out_images": "grid_search.held_out_images"}


def dataset_options(cfg: Config) -> dict[str, Any]:
    """The keyword options of the registered dataset's builder (``crfrnn_deeplab.data.dataset_spec``), from the
    config: each builder takes the ones it names (``root``; the synthetic sizes; the folder layout)."""
    d = cfg.data
    available = {"root": Path(d.root) if d.root else None, "seed": cfg.seed, "size": d.image_size,
                 "train_images": d.train_images, "val_images": d.val_images,
                 "held_out_images": max(1, cfg.grid_search.held_out_images), **dataclasses.asdict(d.folder)}
    wanted = dataset_spec(d.dataset).options
    if missing := [name for name in wanted if name not in available]:
        raise ConfigError(f"dataset {d.dataset!r} takes options the config does not hold: {missing}")
    return {name: available[name] for name in wanted}


def build_data(cfg: Config, convention: InputConvention) -> Data:
    """Training (DeepLab augmentation), validation and held-out datasets.

    The grid-search images are the dataset's own held-out split where it has one (synthetic data: another
    seed); otherwise a spread subset of the validation split, as in the DeepLab paper.
    """
    d = cfg.data
    train_tf = TrainTransform(convention, crop_size=d.crop_size, scale_range=tuple(d.scale_range),
                              hflip_prob=d.hflip_prob, ignore_index=IGNORE_INDEX, seed=cfg.seed)
    eval_tf = EvalTransform(convention, ignore_index=IGNORE_INDEX)
    options = dataset_options(cfg)
    if "root" in options and not (d.root and Path(d.root).is_dir()):
        raise DatasetError(f"data.root={d.root!r} is not a directory (dataset {d.dataset!r})")
    try:
        splits = build_datasets(d.dataset, eval_transform=eval_tf, **options)
    except DatasetError:
        raise
    except (TypeError, ValueError) as e:  # the builder refuses an option the config gave it, e.g. a size
        given = ", ".join(f"{DATASET_OPTION_KEYS.get(name, 'data.folder.' + name)}={value}"
                          for name, value in options.items() if name != "root")
        raise ConfigError(f"dataset {d.dataset!r}: {e} (from {given})") from None
    for stage in (1, 2):
        s: StageConfig = getattr(cfg, f"stage{stage}")
        if s.iterations and s.batch_size * dist.get_world_size() > len(splits.train):
            raise ConfigError(f"stage{stage}.batch_size={s.batch_size} is larger than the training split "
                              f"({len(splits.train)} images, {dist.get_world_size()} process(es))")
    if d.check_files:  # a bad validation file would otherwise surface only at the first evaluation
        scan_files(splits.val)
    held_out = splits.held_out
    if held_out is None:
        count = min(max(1, cfg.grid_search.held_out_images), len(splits.val))
        held_out = Subset(splits.val, np.linspace(0, len(splits.val) - 1, count).round().astype(int).tolist())
    if splits.train.num_classes != cfg.model.num_classes:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes}, but dataset {d.dataset!r} has "
                          f"{splits.train.num_classes} classes")
    return Data(splits.train, train_tf, splits.val, held_out, tuple(splits.train.class_names))


def build_eval_loader(dataset: Dataset, cfg: Config, *, max_images: int = 0) -> SizeBatches:
    """This rank's shard of ``dataset`` (the first ``max_images`` images when > 0), in order, in batches of up to
    ``eval.batch_size`` images of one size (images of other sizes go into batches of their own)."""
    if max_images:
        dataset = Subset(dataset, range(min(max_images, len(dataset))))
    return SizeBatches(DataLoader(dataset, batch_size=cfg.eval.batch_size, sampler=dist.ShardSampler(len(dataset)),
                                  num_workers=cfg.data.workers, collate_fn=collate_by_size))


def build_network(cfg: Config) -> nn.Module:
    """The registered DeepLab v2 model named by ``model.name`` with ``model.options``."""
    return get_model(cfg.model.name, num_classes=cfg.model.num_classes, **cfg.model.options)


def build_crf(cfg: Config) -> MeanFieldCRF:
    """The CRF layer with its initial (fixed-weight CRF) parameters from ``crf.*``."""
    return MeanFieldCRF(num_classes=cfg.model.num_classes, **dataclasses.asdict(cfg.crf))


def build_optimizer(model: nn.Module, stage: StageConfig) -> torch.optim.SGD:
    """SGD with DeepLab v2's parameter groups (:func:`~crfrnn_deeplab.training.optim.parameter_groups`)."""
    groups = parameter_groups(model, lr=stage.lr, crf_lr=stage.crf_lr, weight_decay=stage.weight_decay)
    return torch.optim.SGD(groups, lr=stage.lr, momentum=stage.momentum)


def build_scheduler(optimizer: torch.optim.Optimizer, stage: StageConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Poly decay of every group's rate to 0 over the stage."""
    return poly_scheduler(optimizer, iterations=stage.iterations, power=stage.poly_power)


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype (CUDA with ``amp``: bfloat16 where supported, else float16), or None."""
    if not (cfg.amp and device.type == "cuda"):
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def build_evaluator(cfg: Config, device: torch.device) -> Evaluator:
    """Whole-image or sliding-window scoring (``eval.*``) in the run's precision."""
    sliding = cfg.eval.mode == "sliding"
    return Evaluator(num_classes=cfg.model.num_classes, device=device, window=cfg.eval.window if sliding else None,
                     stride=cfg.eval.stride if sliding else None, dtype=autocast_dtype(cfg, device),
                     panels=cfg.eval.panels)


def build_grid(cfg: Config) -> CRFGrid | None:
    """The post-processing CRF's grid (``grid_search.*``) around the initial CRF's spatial kernel, or None."""
    g, c = cfg.grid_search, cfg.crf
    if not g.enabled:
        return None
    return CRFGrid(bilateral_weights=g.bilateral_weights, theta_alphas=g.theta_alphas, theta_betas=g.theta_betas,
                   spatial_weight=c.spatial_weight, theta_gamma=c.theta_gamma, iterations=c.eval_iterations,
                   normalization=c.normalization)


# ------------------------------------------------------------------------------------------------------------
# Training


def optimizer_step(model: nn.Module, optimizer, scaler, micro: list[dict], *, stage: StageConfig,
                   device: torch.device, dtype: torch.dtype | None, stop: StopRequest,
                   max_loss: float = math.inf) -> tuple[float, str, bool]:
    """One optimiser step over the micro-batches of a global batch (gradient accumulation).

    The summed pixel loss is divided by the labelled pixels of the whole global batch (all micro-batches, all
    ranks), so that one process with batch N·B, N processes with batch B and accumulation steps all compute
    the same gradient. ``dtype``: the autocast dtype (None: float32). The update is skipped when the loss or
    the gradient norm is not finite, or the loss exceeds ``max_loss`` (divergence); these and stop requests
    are agreed on by all ranks in one all-reduce. (With a float16 gradient scaler, non-finite gradients are
    the scaler's business: it skips those steps and lowers its scale.) With ``stage.max_grad_norm`` > 0 a
    gradient whose global norm exceeds it is scaled down to it before the update (unscaled first, with a
    scaler), the same on every rank (the ranks' gradients are already averaged).

    Returns:
        ``(loss, problem, stop, labelled)``: the global batch's mean loss, why the update was not applied (""
        when it was), the agreed stop flag, and the global batch's labelled pixels (0: every label is ignored).
    """
    world = dist.get_world_size()
    labelled = torch.tensor(float(sum(int((b["label"] != IGNORE_INDEX).sum()) for b in micro)), device=device)
    labelled = dist.all_reduce_sum(labelled)
    normaliser = labelled.clamp_min(1.0) / world  # DDP averages the ranks' gradients
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device)
    for i, batch in enumerate(micro):
        last = i == len(micro) - 1
        no_sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else contextlib.nullcontext()
        with no_sync, torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = forward_loss(model, batch, device=device, normaliser=normaliser,
                                network_loss_weight=stage.network_loss_weight)
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
    clip = stage.max_grad_norm
    if clip and scaler.is_enabled():
        scaler.unscale_(optimizer)  # the norm of the true gradient (the scaler still skips non-finite steps)
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norm = (torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            if grads and (clip or not scaler.is_enabled()) else torch.zeros((), device=device))
    grad_norm = torch.zeros((), device=device) if scaler.is_enabled() else norm  # (else the scaler's business)
    flags = torch.stack([loss_sum / world, (~torch.isfinite(loss_sum)).float(), (~torch.isfinite(grad_norm)).float(),
                         torch.tensor(float(stop.requested), device=device)])
    loss_value, bad_loss, bad_grad, stop_now = dist.all_reduce_sum(flags).tolist()
    if bad_loss:
        problem = f"the loss is {loss_value} (not finite)"
    elif bad_grad:
        problem = f"the loss is {loss_value:.4g} but the gradient norm is not finite"
    elif loss_value > max_loss:
        problem = f"the loss {loss_value:.4g} exceeds divergence_factor × its running average ({max_loss:.4g})"
    else:
        problem = ""
        if clip and grads:
            factor = torch.clamp(clip / norm, max=1.0)
            for g in grads:
                g.mul_(factor)
        scaler.step(optimizer)
        scaler.update()
    return loss_value, problem, bool(stop_now), int(labelled)


def _divergence_message(cfg: Config, stage: int, step: int, problem: str, last_saved: int | None, *,
                        applied: bool, crf: bool) -> str:
    """What diverged, which checkpoint is intact, and a command with a 10× lower rate that can continue."""
    s: StageConfig = getattr(cfg, f"stage{stage}")
    key, rate = (f"stage{stage}.crf_lr", s.crf_lr) if crf else (f"stage{stage}.lr", s.lr)
    last = stage_dir(cfg.out_dir, stage) / "last.pt"
    where = (f"the last good checkpoint is {last} (step {last_saved})" if last_saved is not None
             else "no checkpoint of this stage was written yet")
    resumable = last_saved is not None or (stage == 2 and (stage_dir(cfg.out_dir, 1) / "last.pt").is_file())
    command = (f"python train.py --resume {cfg.out_dir} {key}={rate / 10:g}" if resumable else
               f"python train.py --config {Path(cfg.out_dir) / 'config.yaml'} --overwrite {key}={rate / 10:g}")
    action = "that update is not saved" if applied else "stopped without applying the update"
    lower = "Resume" if resumable else "Start again"
    return (f"{STAGE_NAMES[stage]}, step {step}: {problem}; {action}, {where}. {lower} with a lower "
            f"{'CRF ' if crf else ''}learning rate, e.g. {command}")


def is_evaluation_step(stage: StageConfig, step: int) -> bool:
    """Whether a stage evaluates after ``step``: every ``eval_every`` steps, and after its last."""
    return step == stage.iterations or bool(stage.eval_every and step % stage.eval_every == 0)


def train_steps(model: nn.Module, optimizer, scheduler, scaler, batches: TrainBatches, *, cfg: Config, stage: int,
                start_step: int, device: torch.device, save: Callable[..., None],
                evaluate_now: Callable[[int], None], metrics: MetricsWriter, stop: StopRequest,
                stop_after: int | None = None, evaluate_first: bool = False) -> None:
    """The stage's optimiser steps from ``start_step``, with logging, evaluation (``evaluate_now(step)``),
    checkpoints (``save(step)`` writes ``last.pt``) and stopping (SIGINT/SIGTERM, or ``stop_after`` steps of
    this call) at step boundaries. ``model``: the model to train (DDP-wrapped under torchrun). ``last.pt`` is
    written before every evaluation (``save(step, evaluation_pending=True)``) as well as after it, so that a
    failed evaluation loses no training steps. ``evaluate_first``: the checkpoint resumed was written before the
    evaluation at ``start_step``, which did not finish (a failure, a second Ctrl-C): it is done first, as the
    uninterrupted run did it (its record, ``best.pt``, and the random numbers it draws).

    Raises:
        NonFiniteLossError: the loss or gradient became NaN/inf (the step is not applied, ``last.pt`` is left as
            it was).
        DivergenceError: the loss exceeded ``divergence_factor`` × its running average (not applied), or a CRF
            parameter overflowed (not saved).
        TrainingInterrupted: stopped by a signal or ``stop_after`` after saving ``last.pt``.
    """
    s: StageConfig = getattr(cfg, f"stage{stage}")
    images_per_step = s.batch_size * s.accumulate * dist.get_world_size()
    dtype = autocast_dtype(cfg, device)
    last_saved = start_step if start_step else None
    monitor = LossMonitor(cfg.divergence_factor)
    crf = getattr(getattr(model, "module", model), "crf", None)  # DDP wraps the model
    model.train()
    bar = tqdm(total=s.iterations, initial=start_step, desc=STAGE_NAMES[stage], dynamic_ncols=True,
               disable=not dist.is_main_process())
    timer, timed_steps = time.perf_counter(), 0
    warned_unlabelled = False

    def evaluate_and_save(done: int) -> None:
        save(done, evaluation_pending=True)  # first: an evaluation that fails (e.g. on a bad label) loses no steps
        try:
            evaluate_now(done)
        except DatasetError as e:
            raise DatasetError(f"{original_message(str(e))} (evaluating {STAGE_NAMES[stage]} at step "
                               f"{done}: the training up to this step is saved in "
                               f"{stage_dir(cfg.out_dir, stage) / 'last.pt'}; fix the data, then python "
                               f"train.py --resume {cfg.out_dir})") from e
        model.train()
        save(done)  # after it again: its best and RNG draws, so a resume continues exactly

    try:
        if evaluate_first and start_step and is_evaluation_step(s, start_step):
            evaluate_and_save(start_step)
            timer = time.perf_counter()
        for done in range(start_step + 1, s.iterations + 1):
            micro = [next(batches) for _ in range(s.accumulate)]
            loss, problem, stop_now, labelled = optimizer_step(model, optimizer, scaler, micro, stage=s,
                                                               device=device, dtype=dtype, stop=stop,
                                                               max_loss=monitor.limit)
            if not labelled and not warned_unlabelled:
                warned_unlabelled = True
                logger.warning("%s, step %d: the batch has no labelled pixels (every label is %d = ignore), so its "
                               "loss is 0 and there is nothing to learn from; if every batch is like this, the "
                               "dataset's labels are wrong (data.dataset=%s)", STAGE_NAMES[stage], done,
                               IGNORE_INDEX, cfg.data.dataset)
            if problem:
                error = NonFiniteLossError if "not finite" in problem else DivergenceError
                raise error(_divergence_message(cfg, stage, done, problem, last_saved, applied=False, crf=False))
            monitor.update(loss)
            if crf is not None and (bad := crf_parameter_problem(crf)):
                raise DivergenceError(_divergence_message(cfg, stage, done, bad, last_saved, applied=True, crf=True))
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
            stopping = stop_now or (stop_after is not None and done - start_step >= stop_after)
            if is_evaluation_step(s, done):
                last_saved = done  # (written first thing)
                evaluate_and_save(done)
                # a signal during the evaluation stops the run here, not after another step (agreed by all ranks)
                stopping = stopping or bool(dist.all_reduce_sum(torch.tensor(float(stop.requested), device=device)))
                timer, timed_steps = time.perf_counter(), 0
            elif done % s.checkpoint_every == 0 or stopping:
                save(done)
                last_saved = done
            if stopping:
                raise TrainingInterrupted(stop.signum, stage_dir(cfg.out_dir, stage) / "last.pt")
    finally:
        bar.close()


def run_stage(stage: int, network: nn.Module, cfg: Config, data: Data, device: torch.device, *,
              resume: dict[str, Any] | None, metrics: MetricsWriter, stop: StopRequest, stop_after: int | None,
              baseline: dict[str, Any] | None = None, elapsed: Callable[[], float] = lambda: 0.0,
              init_crf: dict[str, torch.Tensor] | None = None) -> tuple[nn.Module, int]:
    """Trains one stage (from its start or from ``resume``); returns the trained model (network or CRFRNN) and
    the number of steps this call ran. ``elapsed()``: seconds the run has taken so far (saved in checkpoints).
    ``init_crf``: the state of the CRF that stage 2 starts from (a learned CRF in ``model.init_from``; None:
    ``crf.*``); stage 1 keeps it in its checkpoints for a resumed run's stage 2."""
    s: StageConfig = getattr(cfg, f"stage{stage}")
    model = network
    if stage == 2:
        model = CRFRNN(network=network, crf=build_crf(cfg))
        if init_crf is not None:
            model.crf.load_state_dict(init_crf)
        model.to(device)
    optimizer, start_step = build_optimizer(model, s), 0
    scheduler = build_scheduler(optimizer, s)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype(cfg, device) == torch.float16)
    samples = SeededAugmentation(data.train, data.train_transform, seed=derive_seed(cfg.seed, stage))
    batches = TrainBatches(samples, batch_size=s.batch_size, workers=cfg.data.workers,
                           seed=derive_seed(cfg.seed, stage), rank=dist.get_rank(), world_size=dist.get_world_size(),
                           pin_memory=device.type == "cuda")
    best = {"metric": "miou", "value": -1.0, "step": 0}
    if resume is not None:
        restore_training_state(resume, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                               batches=batches)
        best, start_step = dict(resume.get("best", best)), int(resume["step"])
        use_configured_learning_rates(optimizer, scheduler, build_optimizer(model, s))
        logger.info("resuming %s at step %d of %d", STAGE_NAMES[stage], start_step, s.iterations)
    directory = stage_dir(cfg.out_dir, stage)
    if dist.is_main_process():
        directory.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(directory)
    extra = {"baseline": baseline} if baseline is not None else {}
    if stage == 1 and init_crf is not None:
        extra["init_crf"] = init_crf
    evaluate = build_evaluator(cfg, device)

    def save(step: int, is_best: bool = False, evaluation_pending: bool = False) -> None:
        check_replicas_identical(model)
        if not dist.is_main_process():
            return
        payload = training_checkpoint(
            model, name=cfg.model.name, num_classes=cfg.model.num_classes, options=cfg.model.options,
            crf=dataclasses.asdict(cfg.crf) if isinstance(model, CRFRNN) else None, class_names=data.class_names,
            stage=stage,
            step=step, config=to_dict(cfg), optimizer=optimizer, scheduler=scheduler, scaler=scaler,
            batches=batches, extra={"best": best, "elapsed_s": elapsed(), "evaluation_pending": evaluation_pending,
                                    **extra})
        save_checkpoint(directory / ("best.pt" if is_best else "last.pt"), payload)

    def evaluate_now(step: int) -> None:
        crfs = {"network": None} if stage == 1 else {"network": None, "network + CRF": model.crf}
        rows = evaluate(network, crfs, build_eval_loader(data.val, cfg, max_images=cfg.eval.max_images),
                        panel=directory / "panels" / f"step_{step:06d}.png")
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

    train_steps(wrap_for_training(model, device), optimizer, scheduler, scaler, batches, cfg=cfg, stage=stage,
                start_step=start_step, device=device, save=save, evaluate_now=evaluate_now, metrics=metrics,
                stop=stop, stop_after=stop_after,
                evaluate_first=resume is not None and bool(resume.get("evaluation_pending")))
    batches.close()
    return model, s.iterations - start_step


def load_init_from(network: nn.Module, cfg: Config) -> dict[str, torch.Tensor] | None:
    """Loads ``model.init_from`` into ``network``. When stage 2 runs, the checkpoint is loaded into the stage-2
    model (the network and a CRF from ``crf.*``), so that a learned CRF it holds (a stage-2 checkpoint) is
    used: its state is returned to initialise stage 2's CRF (None when the checkpoint has no CRF)."""
    path, layout = cfg.model.init_from, cfg.model.init_layout
    if not cfg.stage2.iterations:
        loaded = load_into(network, path, layout=layout)
        logger.info("model.init_from %s (stage 2 does not run: a CRF in it is not used):\n%s", path, loaded)
        return None
    model = CRFRNN(network=network, crf=build_crf(cfg))
    loaded = load_into(model, path, layout=layout)
    learned = any(name.startswith("crf.") for name in loaded.used)
    logger.info("model.init_from %s (%s):\n%s", path, "its CRF initialises stage 2's CRF" if learned else
                "no CRF in it: stage 2's CRF starts from crf.*", loaded)
    return {k: v.detach().clone() for k, v in model.crf.state_dict().items()} if learned else None


def score_baselines(network: nn.Module, data: Data, cfg: Config, device: torch.device) -> dict[str, Any]:
    """The rows the learned CRF is compared with (the network alone, + the initial CRF, + a grid-searched CRF)."""
    initial_crf = build_crf(cfg).to(device)
    grid = build_grid(cfg)
    return evaluate_baselines(network, build_evaluator(cfg, device), initial_crf=initial_crf,
                              val_loader=build_eval_loader(data.val, cfg), grid=grid,
                              held_out_loader=build_eval_loader(data.held_out, cfg) if grid is not None else None,
                              panel=Path(cfg.out_dir) / "panels" / "baselines.png")


def report(results: dict[str, dict[str, Any]], cfg: Config, out: Path, data: Data, *, grid: dict | None,
           learned: dict | None, minutes: float) -> str:
    """The final table; rank 0 prints it and writes ``results.md`` and ``results.json``."""
    text = format_report(results, dataset=cfg.data.dataset, images=len(data.val),
                         crf_iterations=cfg.crf.eval_iterations, minutes=minutes, grid=grid,
                         spatial_weight=cfg.crf.spatial_weight, theta_gamma=cfg.crf.theta_gamma, learned=learned)
    if dist.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        save_results(out, text, results=results, class_names=data.class_names, grid=grid, learned=learned,
                     minutes=minutes, config=to_dict(cfg))
        print(text, flush=True)
    return text


def check_resumable(resume: dict[str, Any], network: nn.Module, cfg: Config) -> None:
    """Loads the checkpoint's model, optimiser and scheduler states into this config's model, so that a resume
    that cannot work fails before anything is written (:func:`check_training_state` has checked the other
    entries). Raises CheckpointError naming the file."""
    stage = int(resume["stage"])
    model = network if stage == 1 else CRFRNN(network=network, crf=build_crf(cfg))
    try:
        model.load_state_dict(resume["model"])
        optimizer = build_optimizer(model, getattr(cfg, f"stage{stage}"))
        optimizer.load_state_dict(resume["optimizer"])
        build_scheduler(optimizer, getattr(cfg, f"stage{stage}")).load_state_dict(resume["scheduler"])
        if resume.get("init_crf") is not None:  # stage 2's initial CRF, kept by stage 1
            build_crf(cfg).load_state_dict(resume["init_crf"])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{resume['resumed_from']}: cannot resume it with this config (were model, crf or "
                              f"stage options changed?): {' '.join(first[:2])[:300]}") from e


@contextlib.contextmanager
def run_dir_lock(out: Path) -> Iterator[None]:
    """Holds an exclusive lock on the directory ``out`` (created if missing) while this run writes there, so that
    a second train.py started into it (a second ``--resume`` of the run, a new run started at the same moment) is
    refused instead of interleaving its checkpoints and records with this run's. The lock is the kernel's
    (``flock`` on the directory itself: no lock file, and a killed run leaves none behind).

    Raises:
        UsageError: another process holds the lock.
    """
    out.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # no flock on Windows: a run there is not guarded against a second one
        yield
        return
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another train.py is writing to {out} (it holds a lock on the directory): wait until "
                             f"it has finished, or choose another out_dir") from None
        yield
    finally:
        os.close(fd)  # (releases the lock)


def prepare_out_dir(out: Path, *, overwrite: bool) -> None:
    """With ``overwrite``: removes a previous run's files (:data:`RUN_FILES`, nothing else) from ``out``."""
    if not (overwrite and out.is_dir()):
        return
    for name in RUN_FILES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    logger.info("--overwrite: removed the previous run's files from %s", out)


def run(cfg: Config, *, resume: dict[str, Any] | None = None, stop_after: int | None = None,
        overwrite: bool = False) -> dict[str, Any]:
    """Both stages (or what is left of them after ``resume``), then the final comparison table.

    Everything that can fail on the user's input (the data, the resumed checkpoint) is checked before the
    first write to ``out_dir``; ``overwrite`` clears a previous run's files at that point.
    """
    device = dist.init_distributed(cfg.device)
    evaluate = build_evaluator(cfg, device)
    started = time.perf_counter()
    before = float(resume.get("elapsed_s", 0.0)) if resume is not None else 0.0

    def elapsed() -> float:
        return before + time.perf_counter() - started

    out = Path(cfg.out_dir)
    seed_everything(cfg.seed)
    network = use_sync_batchnorm(build_network(cfg), device).to(device)
    resume_stage = resume["stage"] if resume is not None else 0
    init_crf = resume.get("init_crf") if resume is not None else None
    # (a stage-1 checkpoint written before the stage's last evaluation still has that evaluation to do)
    stage_done = (resume_stage == 1 and resume["step"] >= cfg.stage1.iterations
                  and not (resume.get("evaluation_pending") and resume["step"] == cfg.stage1.iterations))
    if resume is not None:  # the weights (loaded by the stage) expect the preprocessing they were trained with
        network.input_convention = InputConvention.from_dict(resume["input_convention"])
    elif cfg.model.init_from:
        init_crf = load_init_from(network, cfg)
    elif cfg.stage1.iterations == 0:
        logger.warning("stage 2 starts from a randomly initialised network: set model.init_from to a stage-1 "
                       "checkpoint")
    # after the weights: a converted checkpoint brings its own input convention (e.g. Caffe BGR)
    data = build_data(cfg, network.input_convention)
    if resume is not None:
        check_resumable(resume, network, cfg)
        if dist.is_main_process() and (out / "metrics.jsonl").is_file():  # a line it cannot place fails here
            kept_records(out / "metrics.jsonl", stage=resume_stage, step=int(resume["step"]))
    with contextlib.ExitStack() as held:
        if dist.is_main_process():
            held.enter_context(run_dir_lock(out))  # from here on, the only train.py writing there
            if resume is None:  # a run started beside this one may have written there since check_paths
                check_out_dir(out, new_run=True, overwrite=overwrite)
            prepare_out_dir(out, overwrite=overwrite)
            save_config(cfg, out / "config.yaml")
        metrics = MetricsWriter(out, enabled=dist.is_main_process())
        held.callback(metrics.close)
        if resume is not None:
            dropped = metrics.truncate(stage=resume_stage, step=int(resume["step"]),
                                       evaluation=not resume.get("evaluation_pending"))
            if dropped:
                logger.info("metrics.jsonl: dropped %d records after the resumed step", dropped)
        baseline = resume.get("baseline") if resume_stage == 2 else None

        def train_stage(stage: int, **options: Any) -> tuple[nn.Module, int]:
            # SIGINT/SIGTERM stop training at a step boundary, with a checkpoint; elsewhere (the grid search, the
            # final evaluation) they stop the run at once, as by default: nothing is lost there but the scores
            with StopRequest() as stop:
                trained = run_stage(stage, network, cfg, data, device, metrics=metrics, stop=stop, elapsed=elapsed,
                                    init_crf=init_crf, **options)
            if stop.requested:  # the signal came during the stage's last step or evaluation: last.pt is written
                raise TrainingInterrupted(stop.signum, stage_dir(cfg.out_dir, stage) / "last.pt")
            return trained

        if cfg.stage1.iterations and resume_stage <= 1 and not stage_done:
            _, steps = train_stage(1, resume=resume if resume_stage == 1 else None, stop_after=stop_after)
            stop_after = None if stop_after is None else stop_after - steps
            if stop_after == 0:
                raise TrainingInterrupted(None, stage_dir(cfg.out_dir, 1) / "last.pt")
        elif resume_stage == 1:  # stage 1 finished before the interruption
            network.load_state_dict(resume["model"])
        if baseline is None:
            baseline = score_baselines(network, data, cfg, device)
        results = dict(baseline["rows"])
        learned = None
        if cfg.stage2.iterations:
            joint, _ = train_stage(2, resume=resume if resume_stage == 2 else None, stop_after=stop_after,
                                   baseline=baseline)
            results.update(evaluate(joint.network, {"joint: network alone": None, "joint: CRF-as-RNN": joint.crf},
                                    build_eval_loader(data.val, cfg), panel=out / "panels" / "joint.png"))
            learned = {**joint.crf.bandwidths, "spatial_weight_diag": joint.crf.spatial_weight.diagonal().tolist(),
                       "bilateral_weight_diag": joint.crf.bilateral_weight.diagonal().tolist(),
                       "compatibility": joint.crf.compatibility.tolist()}
        report(results, cfg, out, data, grid=baseline["grid_search"], learned=learned, minutes=elapsed() / 60)
        metrics.write({"kind": "final", "results": {n: {k: v for k, v in r.items() if k != "iou"}
                                                    for n, r in results.items()}})
        return results


def run_eval_only(checkpoint: Path, cfg: Config, *, overwrite: bool = False) -> dict[str, Any]:
    """Scores a checkpoint: its network alone, + the initial CRF, + a grid-searched CRF, + its own CRF (if any)."""
    device = dist.init_distributed(cfg.device)
    model, loaded = model_for_checkpoint(checkpoint, num_classes=cfg.model.num_classes,
                                         msc=model_spec(cfg.model.name).multi_scale)
    logger.info("loaded %s:\n%s", checkpoint, loaded)
    model.to(device).eval()
    network = model.network if isinstance(model, CRFRNN) else model
    data = build_data(cfg, network.input_convention)
    out = Path(cfg.out_dir) / f"eval_{checkpoint.stem}"
    if dist.is_main_process() and overwrite and out.is_dir():
        prepare_out_dir(out, overwrite=True)
    started = time.perf_counter()
    baseline = score_baselines(network, data, dataclasses.replace(cfg, out_dir=str(out)), device)
    results = dict(baseline["rows"])
    learned = None
    if isinstance(model, CRFRNN):
        results.update(build_evaluator(cfg, device)(network, {"network + learned CRF": model.crf},
                                                    build_eval_loader(data.val, cfg),
                                                    panel=out / "panels" / "learned.png"))
        learned = model.crf.bandwidths
    report(results, cfg, out, data, grid=baseline["grid_search"], learned=learned,
           minutes=(time.perf_counter() - started) / 60)
    return results


# ------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None,
                        help=f"experiment YAML overriding the defaults (default: {DEFAULT_CONFIG.name})")
    parser.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN_OR_CHECKPOINT",  # as written
                        help="continue a run from a run directory (its latest stage*/last.pt) or a checkpoint in "
                             "its stage1/ or stage2/ folder; without a value, the out_dir of the config. The run's "
                             "own config is used, with the command-line overrides on top (not out_dir: the run "
                             "continues in its own directory)")
    parser.add_argument("--eval-only", type=Path, default=None, metavar="CHECKPOINT",
                        help="only evaluate this checkpoint (ours or any layout crfrnn_deeplab.weights.convert reads)")
    parser.add_argument("--stop-after", type=int, default=None, metavar="STEPS",
                        help="stop after this many optimiser steps, saving a checkpoint as on SIGTERM")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in an out_dir that holds a previous run's files: those files "
                             "(config.yaml, metrics.jsonl, results.*, stage*/, panels/, tensorboard/) are removed "
                             "first; other files are kept")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of its one-line message")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides applied last, e.g. stage1.lr=1e-3 data.root=/data/voc")
    # intermixed: overrides on both sides of a flag (a=1 --eval-only CKPT b=2) are all overrides, in order;
    # parse_args would take the first group and refuse the second as "unrecognized arguments". Everything after
    # "--" is an override, as with parse_args (parse_intermixed_args would still read flags there).
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_intermixed_args(argv[:cut])
    args.overrides += argv[cut + 1 :]
    return args


#: What a KEY=VALUE override starts with. A value written as a path does not match: one that starts with ``./``,
#: ``../``, ``/`` or ``~``, or has a path separator before its ``=`` (``runs/lr=0.1``).
_OVERRIDE = re.compile(r"[A-Za-z_][\w.\[\]-]*=")


def run_dir_of(location: Path) -> Path:
    """The run directory that ``--resume LOCATION`` continues: LOCATION itself, or for a checkpoint file the
    directory above its ``stage<N>/`` (a checkpoint elsewhere belongs to no run: UsageError)."""
    if not location.is_file():
        return location
    if location.parent.name not in ("stage1", "stage2"):
        raise UsageError(f"--resume {location}: the checkpoint is not in a run's stage1/ or stage2/ folder, so "
                         f"there is no run to continue (resuming would write the run's files next to it); start a "
                         f"new run from its weights with model.init_from={location}")
    return location.parent.parent


def check_run_dir(run_dir: Path, checkpoint: Path) -> None:
    """Refuses to resume ``checkpoint`` into a directory whose ``config.yaml`` train.py did not write (every run
    writes it first), since resuming rewrites ``config.yaml``, ``metrics.jsonl`` and ``results.*`` there.
    Raises UsageError."""
    config = run_dir / "config.yaml"
    if not (config.is_file() and is_resolved_config(config)):
        found = "it has no config.yaml" if not config.exists() else "its config.yaml was not written by train.py"
        raise UsageError(f"--resume: {run_dir} is not a run directory ({found}), and resuming would write a "
                         f"run's files (config.yaml, metrics.jsonl, results.*) there; to start a new run from the "
                         f"checkpoint's weights use model.init_from={checkpoint}")


#: The settings that make a run what it is: a checkpoint whose values differ from its run directory's
#: config.yaml was written by another run (resuming it there would replace that run's best.pt and metrics).
RUN_IDENTITY = ("model", "data.dataset", "data.root", "seed")


def check_same_run(checkpoint_config: Config, run_dir: Path, checkpoint: Path) -> None:
    """Refuses to resume ``checkpoint`` into ``run_dir`` when the run's ``config.yaml`` names another model,
    dataset or seed (:data:`RUN_IDENTITY`) than the checkpoint's own config. Raises UsageError.

    ``config.yaml`` is read, not validated: it names the device the run was written on, which this machine may
    lack (a run from a GPU resumed with ``device=cpu``); the config resumed is validated with the overrides."""
    try:
        written = to_dict(read_config(run_dir / "config.yaml"))
    except (ConfigError, FileNotFoundError, OSError) as e:
        raise UsageError(f"--resume: {run_dir / 'config.yaml'} cannot be read as this run's config: {e}") from None
    ours = to_dict(checkpoint_config)

    def value(config: dict[str, Any], key: str) -> Any:
        for part in key.split("."):
            config = config[part]
        return config

    differ = [key for key in RUN_IDENTITY if value(written, key) != value(ours, key)]
    if differ:
        raise UsageError(f"--resume: {checkpoint} was written by another run than the one in {run_dir} (its "
                         f"{', '.join(differ)} differ from {run_dir / 'config.yaml'}); resuming it there would "
                         f"replace that run's files: resume the checkpoint's own run directory instead")


def removed_by_overwrite(out: Path, path: Path) -> Path | None:
    """The entry of :data:`RUN_FILES` in ``out`` that holds (or is) ``path``, which ``--overwrite`` would delete;
    None when ``path`` survives it."""
    try:
        inside = path.resolve().relative_to(out.resolve())
    except ValueError:
        return None
    return out / inside.parts[0] if inside.parts and inside.parts[0] in RUN_FILES else None


def check_out_dir(out: Path, *, new_run: bool, overwrite: bool, evaluation: bool = False) -> None:
    """Refuses an ``out_dir`` that is a file or lies below one, and (for a new run, or an ``evaluation``'s
    folder) one that already holds files, unless ``overwrite``. Raises UsageError."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"out_dir is a file, not a directory (out_dir={out})")
    if blocking := blocking_parent(out):
        raise UsageError(f"out_dir lies below a file, {blocking}, so it cannot be created (out_dir={out})")
    if new_run and not overwrite and out.is_dir() and (held := sorted(p.name for p in out.iterdir())):
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        if evaluation:  # (no run to resume there)
            raise UsageError(f"{out} already holds files ({shown}): pass --overwrite to replace that evaluation, or "
                             f"choose another out_dir (out_dir={out.parent})")
        raise UsageError(f"out_dir already holds files ({shown}): pass --overwrite to replace that run, "
                         f"--resume {out} to continue it, or choose another out_dir (out_dir={out})")


def check_run_files(out: Path) -> None:
    """Refuses to resume a run in ``out`` where one of the run's files (:data:`RUN_FILES`) is a folder, or one of
    its folders a file: the run would fail on it after training to it (or, for TensorBoard's folder, after
    rewriting config.yaml). Raises UsageError."""
    for name in RUN_FILES:
        path, folder = out / name, name in RUN_FOLDERS
        if (path.exists() or path.is_symlink()) and path.is_dir() != folder:
            found, wanted = ("a folder", "file") if path.is_dir() else ("not a folder", "folder")
            raise UsageError(f"--resume: {path} is {found}, but the run writes its {name} {wanted} there; move it "
                             f"out of the way, then resume")


def resolve(args: argparse.Namespace) -> tuple[Config, dict[str, Any] | None]:
    """The config of this invocation (validated), and the checkpoint to resume (if any)."""
    if args.resume is not None and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other: --resume continues a run and keeps its "
                         "history, --overwrite deletes that history to start a new run; pass one of them")
    if args.eval_only is not None and (args.resume is not None or args.stop_after is not None):
        other = "--resume" if args.resume is not None else "--stop-after"
        raise UsageError(f"--eval-only and {other} contradict each other: --eval-only scores a checkpoint without "
                         f"training, {other} {'continues' if args.resume is not None else 'stops'} a training run; "
                         f"pass one of them")
    if args.stop_after is not None and args.stop_after < 1:
        raise UsageError(f"--stop-after must be >= 1 (optimiser steps), got {args.stop_after}")
    if args.resume is None:
        config = args.config or (None if args.eval_only else DEFAULT_CONFIG)
        if args.eval_only is not None and config is None:
            ckpt = load_checkpoint(args.eval_only)
            if isinstance(ckpt.get("config"), dict):
                source = f"{args.eval_only} (its config)"
                cfg, home = config_from_dict(ckpt["config"], source=source), args.eval_only.parent.parent
                if args.eval_only.parent.name in ("stage1", "stage2") and is_resolved_config(home / "config.yaml"):
                    # next to its run where that is now (a run copied or moved), not where the run was written
                    cfg = dataclasses.replace(cfg, out_dir=str(home))
                return resolve_config(cfg, args.overrides, source=source), None
            config = DEFAULT_CONFIG
        return load_config(config, args.overrides), None
    # args.resume is the value as written ("" without one): a Path drops a leading "./" ("./lr=0.1" is a path,
    # "lr=0.1" reads as an override) and cannot tell "." (the current directory) from no value
    location = Path(args.resume)
    if _OVERRIDE.match(args.resume) and not location.exists():  # --resume's optional value took an override
        raise UsageError(f"--resume {args.resume}: no such run directory or checkpoint; it reads as a KEY=VALUE "
                         f"override, which --resume took for the run to continue: name the run first (--resume "
                         f"RUN {args.resume}), or put the override before --resume")
    if not args.resume:
        location = Path(load_config(args.config or DEFAULT_CONFIG, args.overrides).out_dir)
    if not location.exists():
        raise FileNotFoundError(f"nothing to resume in {args.resume or location}: no such run directory or checkpoint")
    path = find_resume_checkpoint(location)
    try:
        checkpoint = load_checkpoint(path)
    except OSError as e:  # e.g. a truncated archive that torch.load reads past its end
        if isinstance(e, FileNotFoundError):
            raise
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated?): {e}") from e
    missing = [k for k in ("config", "stage", "step", "model", "optimizer", "scheduler", "data", "rng")
               if k not in checkpoint]
    if missing or not isinstance(checkpoint["config"], dict):
        raise CheckpointError(f"{path} is not a checkpoint written by train.py (it lacks {missing or ['config']}); "
                              f"to start from its weights use model.init_from={path}")
    check_training_state(checkpoint, path)
    source = f"{path} (its config)"
    cfg = config_from_dict(checkpoint["config"], source=source)
    # the run continues where it is now (e.g. a run directory copied elsewhere), not where it was written
    run_dir = run_dir_of(location)
    check_run_dir(run_dir, path)
    check_same_run(cfg, run_dir, path)
    cfg = dataclasses.replace(cfg, out_dir=str(run_dir))
    before = to_dict(cfg)
    cfg = resolve_config(cfg, args.overrides, source=source)
    if Path(cfg.out_dir).resolve() != run_dir.resolve():  # the run's files live in run_dir, and only there
        raise UsageError(f"--resume continues the run in {run_dir}, but out_dir={cfg.out_dir} would write it "
                         f"elsewhere (and over whatever that directory holds): drop the out_dir override, or copy "
                         f"{run_dir} to {cfg.out_dir} and resume the copy")
    if to_dict(cfg) != before:
        logger.warning("resuming with changed settings: %s", args.overrides)
    logger.info("resuming from %s (stage %d, step %d)", path, checkpoint["stage"], checkpoint["step"])
    checkpoint["resumed_from"] = str(path)
    return cfg, checkpoint


def check_paths(cfg: Config, args: argparse.Namespace) -> None:
    """The paths this invocation reads and writes, before anything runs. Raises ConfigError / UsageError."""
    if cfg.model.init_from and args.resume is None and args.eval_only is None \
            and not Path(cfg.model.init_from).is_file():
        raise ConfigError(f"model.init_from: no such file ({cfg.model.init_from})")
    out = Path(cfg.out_dir)
    if args.eval_only is not None:
        check_out_dir(out, new_run=False, overwrite=args.overwrite)
        check_out_dir(out / f"eval_{args.eval_only.stem}", new_run=True, overwrite=args.overwrite, evaluation=True)
        cleared, inputs = out / f"eval_{args.eval_only.stem}", {"--eval-only": args.eval_only}
    else:
        check_out_dir(out, new_run=args.resume is None, overwrite=args.overwrite)
        if args.resume is not None:
            check_run_files(out)
        cleared, inputs = out, {"model.init_from": cfg.model.init_from}
    for name, path in inputs.items():  # --overwrite must not delete what this run reads
        if args.overwrite and path and (removed := removed_by_overwrite(cleared, Path(path))):
            raise UsageError(f"--overwrite would delete {name}={path}: it lies in {removed}, which --overwrite "
                             f"removes from {cleared}; move the checkpoint out of it first, or choose another "
                             f"out_dir")


#: Exit status of the errors a user can fix (the first match counts); anything else is a bug: a traceback.
USER_ERRORS: tuple[tuple[type[BaseException], int], ...] = (
    (UsageError, EXIT_USAGE), (ConfigError, EXIT_USAGE), (DatasetError, EXIT_RUNTIME),
    (CheckpointError, EXIT_RUNTIME), (ConversionError, EXIT_RUNTIME), (DivergenceError, EXIT_RUNTIME),
    (NonFiniteLogitsError, EXIT_RUNTIME), (MetricsLogError, EXIT_RUNTIME),
    (OSError, EXIT_RUNTIME),  # FileNotFoundError among them: a missing data file; a full disk
)


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (0, 1: data/runtime error, 2: usage/config error, 128+N:
    stopped by signal N after saving a checkpoint). See README, "Errors and exit codes"."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if "RANK" in os.environ and int(os.environ["RANK"]) > 0:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        cfg, resume = resolve(args)
        check_paths(cfg, args)
    except (ConfigError, UsageError, FileNotFoundError, NotADirectoryError) as e:  # the command line's paths
        if args.debug:
            raise
        print_error(e)
        return EXIT_USAGE
    except (CheckpointError, ConversionError) as e:  # a checkpoint named on the command line is unreadable
        if args.debug:
            raise
        print_error(e)
        return EXIT_RUNTIME
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif int(os.environ.get("LOCAL_WORLD_SIZE", 1)) > 1:  # torchrun: share the cores among the processes
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
    retain_freed_memory()
    try:
        if args.eval_only is not None:
            run_eval_only(args.eval_only, cfg, overwrite=args.overwrite)
        else:
            run(cfg, resume=resume, stop_after=args.stop_after, overwrite=args.overwrite)
    except TrainingInterrupted as e:
        name = signal.Signals(e.signum).name if e.signum else f"--stop-after {args.stop_after}"
        if dist.is_main_process():
            print(f"\nstopped by {name}; checkpoint: {e.checkpoint}\nresume with: python train.py --resume "
                  f"{cfg.out_dir}", file=sys.stderr)
        return 128 + e.signum if e.signum else 0
    except KeyboardInterrupt:  # SIGINT outside the training steps (baselines, grid search, final evaluation)
        if dist.is_main_process():
            saved = sorted(Path(cfg.out_dir).glob("stage*/last.pt")) if args.eval_only is None else []
            then = (f"the last checkpoint: {saved[-1]}; resume with: python train.py --resume {cfg.out_dir}"
                    if saved else "nothing to resume")
            print(f"\nstopped by SIGINT; {then}", file=sys.stderr)
        return 128 + signal.SIGINT
    except tuple(kind for kind, _ in USER_ERRORS) as e:
        if args.debug:
            raise
        if dist.is_main_process() or not isinstance(e, DivergenceError):
            print_error(e)
        return next(status for kind, status in USER_ERRORS if isinstance(e, kind))
    finally:
        dist.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
