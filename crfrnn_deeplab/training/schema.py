"""The experiment schema: every setting of a run with its type and default, in one place.

The defaults are the published recipes (DeepLab v2 on PASCAL VOC for the network, CRF-as-RNN for the joint
stage); ``configs/*.yaml`` override only what an experiment changes (read by :mod:`.config`, which also checks
ranges and names). Modules never read these objects: ``train.py``'s ``build_*`` functions turn them into
constructor arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ConfigError",
    "DataConfig",
    "FolderConfig",
    "ModelConfig",
    "CRFConfig",
    "StageConfig",
    "EvalConfig",
    "GridSearchConfig",
    "Config",
]


class ConfigError(ValueError):
    """A configuration key or value that does not fit the schema (the message names the key).

    ``keys``: the config keys whose values the refused setting is made of (``("stage1.lr",)``, or several for a
    setting that depends on others); empty when not known. ``context``: keys that decide whether those values are
    refused at all (``eval.mode`` for the sliding window's). They tell a file's or a checkpoint's bad value from a
    command-line override's (:func:`~crfrnn_deeplab.training.config.resolve_config`).
    """

    def __init__(self, message: str, *, keys: tuple[str, ...] = (), context: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.keys, self.context = keys, context


@dataclass
class FolderConfig:
    """An image/mask folder dataset (``data.dataset=folder``), ADE20K-style layout under ``data.root``:
    ``<root>/<image_dir>/<split>/<id>.jpg`` and ``<root>/<mask_dir>/<split>/<id><mask_suffix>``."""

    class_names: list[str] = field(default_factory=list)
    image_dir: str = "images"
    mask_dir: str = "annotations"
    train_split: str = "training"
    val_split: str = "validation"
    mask_suffix: str = ".png"
    reduce_zero_label: bool = False  # ADE20K: mask value 0 is "other" (ignored), 1..N are the classes


@dataclass
class DataConfig:
    """Where the images come from and how training crops are made (DeepLab v2: scale 0.5-1.5, crop 321, flip)."""

    dataset: str = "voc12_aug"  # a registered dataset (crfrnn_deeplab.data.list_datasets())
    root: str | None = None  # required for every dataset but synthetic; voc12_aug: holds VOC2012/ and SBD/
    crop_size: int = 321
    scale_range: list[float] = field(default_factory=lambda: [0.5, 1.5])
    hflip_prob: float = 0.5
    workers: int = 2  # DataLoader worker processes (0: load in the training process)
    # the embedded synthetic dataset (crfrnn_deeplab.data.SyntheticSegmentation)
    image_size: int = 161
    train_images: int = 1000
    val_images: int = 100
    check_files: bool = True  # scan the validation split's files (headers only) before training starts
    folder: FolderConfig = field(default_factory=FolderConfig)


@dataclass
class ModelConfig:
    """The network: a registered model name (``crfrnn_deeplab.list_models()``) and its builder options."""

    name: str = "deeplabv2_resnet101_msc"
    num_classes: int = 21
    options: dict[str, Any] = field(default_factory=dict)  # keyword options of the builder, e.g. base_width
    init_from: str | None = None  # weights for the network at the start of the first stage that runs
    init_layout: str = "auto"  # the layout of init_from (see crfrnn_deeplab.weights), or auto-detected


@dataclass
class CRFConfig:
    """The CRF layer's initial (fixed-weight) parameters and what it learns: MeanFieldCRF's keyword arguments.

    The defaults are DeepLab v2's post-processing CRF for VOC (w_bilateral 4, θα 121, θβ 5, w_spatial 3, θγ 3).
    """

    spatial_weight: float = 3.0
    bilateral_weight: float = 4.0
    theta_alpha: float = 121.0
    theta_beta: float = 5.0
    theta_gamma: float = 3.0
    normalization: str = "symmetric"  # symmetric (densecrf) or after (the CRF-as-RNN code)
    bilateral_filter: str = "auto"  # lattice (densecrf's), exact, or auto: exact up to 1024 pixels per image
    train_iterations: int = 5
    eval_iterations: int = 10
    learn_kernel_weights: bool = True
    learn_compatibility: bool = True
    learn_bandwidths: bool = True


@dataclass
class StageConfig:
    """One training stage: SGD (momentum, weight decay), poly schedule, batches, evaluation and checkpoints.

    Learning rates: ``lr`` on the backbone, 10× on the head's weights, 20× on its biases (no weight decay),
    ``crf_lr`` on the CRF's parameters (no weight decay).
    """

    iterations: int = 0  # optimiser steps; 0 skips the stage
    batch_size: int = 10  # images per process per forward pass
    accumulate: int = 1  # forward/backward passes per optimiser step (effective batch: batch × accumulate × ranks)
    lr: float = 2.5e-4
    crf_lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    network_loss_weight: float = 0.0  # stage 2: weight of the network's own loss next to the CRF's (0: CRF only)
    max_grad_norm: float = 0.0  # scale the gradient down to this global norm before an update where it is larger (0: off)
    eval_every: int = 0  # evaluate on the validation split every N steps (0: only at the end)
    checkpoint_every: int = 1000  # write last.pt every N steps (and at the end, on SIGINT/SIGTERM)


@dataclass
class EvalConfig:
    """Evaluation: whole images or a sliding window; what is saved."""

    mode: str = "whole"  # whole or sliding
    window: int = 513  # sliding-window size (pixels)
    stride: int = 342  # sliding-window step
    batch_size: int = 1  # images per forward pass (images of different sizes are batched separately)
    max_images: int = 0  # evaluations during training use at most this many images (0: the whole split)
    panels: int = 4  # validation images drawn in the PNG panel at each evaluation (0: none)


@dataclass
class GridSearchConfig:
    """The post-processing CRF baseline: bilateral weight, θα, θβ searched for mIoU on held-out images, the
    spatial kernel fixed (DeepLab v2, Sec. 4.1). The defaults are the paper's VOC grid."""

    enabled: bool = True
    held_out_images: int = 100
    bilateral_weights: list[float] = field(default_factory=lambda: [3.0, 4.0, 5.0, 6.0])
    theta_alphas: list[float] = field(default_factory=lambda: [30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 100.0])
    theta_betas: list[float] = field(default_factory=lambda: [3.0, 4.0, 5.0, 6.0])


@dataclass
class Config:
    """A whole run: stage 1 trains the network, stage 2 the network + CRF jointly (a stage with 0 iterations is
    skipped; stage 2 then starts from ``model.init_from``)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    crf: CRFConfig = field(default_factory=CRFConfig)
    stage1: StageConfig = field(default_factory=lambda: StageConfig(iterations=20000, eval_every=2000))
    stage2: StageConfig = field(default_factory=lambda: StageConfig(iterations=0, lr=1e-5, eval_every=2000))
    eval: EvalConfig = field(default_factory=EvalConfig)
    grid_search: GridSearchConfig = field(default_factory=GridSearchConfig)
    out_dir: str = "runs/experiment"
    seed: int = 0  # numpy accepts seeds in [0, 2**32)
    device: str = "auto"  # auto (CUDA when available), cpu, cuda, cuda:N
    amp: bool = True  # mixed precision on CUDA (the CRF always computes in float32); ignored on CPU
    threads: int = 0  # torch CPU threads per process (0: PyTorch's default)
    log_every: int = 20  # steps between progress/metrics records
    divergence_factor: float = 10.0  # stop when a step's loss exceeds this × its running average (0: only NaN/inf)
