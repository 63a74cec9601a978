"""Scoring on the validation split: whole-image or sliding-window logits, the network alone and through each CRF
side by side (reduced over ranks), and the baselines a learned CRF is compared with.

The baselines (DeepLab v2, Sec. 4.1): the network alone, with the initial fixed-weight CRF, and with a
post-processing CRF whose bilateral weight and bandwidths are grid-searched on held-out images
(:mod:`crfrnn_deeplab.training.grid_search`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, default_collate

from crfrnn_deeplab import distributed as dist
from crfrnn_deeplab.crf import MeanFieldCRF, fixed_crf
from crfrnn_deeplab.data import IGNORE_INDEX, DatasetError
from crfrnn_deeplab.training.grid_search import CRFGrid, cache_logits, grid_search_crf
from crfrnn_deeplab.training.metrics import BOUNDARY_WIDTHS, SegmentationMeter, boundary_bands
from crfrnn_deeplab.visualize import save_panel

__all__ = ["Evaluator", "NonFiniteLogitsError", "sliding_window_logits", "evaluate_baselines", "collate_by_size",
           "SizeBatches"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def sliding_window_logits(network: nn.Module, image: Tensor, *, window: int, stride: int) -> Tensor:
    """Logits of a large image from overlapping ``window × window`` crops, averaged where they overlap.

    Images smaller than the window are padded (bottom/right, with 0 = the mean colour after normalisation)
    and the padding is cropped from the result.

    Args:
        network: maps Tensor[B, 3, h, w] to logits Tensor[B, C, h, w] (eval mode).
        image: Tensor[B, 3, H, W], normalised.
        window: crop side in pixels.
        stride: step between crops.

    Returns:
        Tensor[B, C, H, W] float32.

    Raises:
        ValueError: ``window`` or ``stride`` below 1, or a ``stride`` larger than the ``window`` (the windows
            would leave pixels between them without logits).
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= window:
        raise ValueError(f"stride must be an int in [1, window={window}] so that the windows cover the image, "
                         f"got {stride!r}")
    b, _, h, w = image.shape
    ph, pw = max(h, window), max(w, window)
    padded = F.pad(image, (0, pw - w, 0, ph - h))

    def starts(size: int) -> list[int]:
        last = size - window
        return sorted(set(list(range(0, last, stride)) + [last]))

    total = count = None
    for y in starts(ph):
        for x in starts(pw):
            logits = network(padded[:, :, y : y + window, x : x + window]).float()
            if total is None:
                total = logits.new_zeros(b, logits.shape[1], ph, pw)
                count = logits.new_zeros(1, 1, ph, pw)
            total[:, :, y : y + window, x : x + window] += logits
            count[:, :, y : y + window, x : x + window] += 1
    return (total / count)[:, :, :h, :w]


def collate_by_size(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A DataLoader's ``collate_fn`` for evaluation samples of any sizes: the samples batched in order, as runs
    of equal image size (``default_collate`` stacks equal sizes only; validation images often differ)."""
    runs: list[list[dict[str, Any]]] = []
    for sample in samples:
        if runs and runs[-1][0]["image"].shape == sample["image"].shape:
            runs[-1].append(sample)
        else:
            runs.append([sample])
    return [default_collate(run) for run in runs]


class SizeBatches:
    """The batches of a DataLoader built with :func:`collate_by_size`, one equal-size batch at a time.

    Attributes:
        dataset: the loader's dataset.
    """

    def __init__(self, loader: DataLoader) -> None:
        self.loader, self.dataset = loader, loader.dataset

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batches in self.loader:
            yield from batches


class NonFiniteLogitsError(RuntimeError):
    """The network gave NaN or infinite logits for evaluation images: they cannot be scored (their argmax would
    count as a class without a word)."""


def check_labelled(labelled: Tensor, images: str) -> None:
    """Raises DatasetError when ``labelled`` (the pixels with a label, summed over the ranks) is 0: scores of no
    pixels are NaN, not a result."""
    if int(labelled) == 0:
        raise DatasetError(f"the {images} images have no labelled pixels (every label is {IGNORE_INDEX} = "
                           f"ignore), so there is nothing to score; check the dataset's labels")


@dataclass(frozen=True)
class Evaluator:
    """How predictions are made and scored: whole images or a sliding window, mixed precision, the panel.

    Attributes:
        num_classes: C.
        device: where the network runs.
        window: the sliding window's side in pixels; None: whole images.
        stride: the sliding window's step.
        dtype: the autocast dtype of the network's forward pass (None: float32).
        panels: how many images rank 0 draws in the PNG panel of an evaluation.
    """

    num_classes: int
    device: torch.device
    window: int | None = None
    stride: int | None = None
    dtype: torch.dtype | None = None
    panels: int = 0

    def logits(self, network: nn.Module, image: Tensor) -> Tensor:
        """Full-image or sliding-window logits Tensor[B, C, H, W] at the image's size (float32).

        Raises:
            NonFiniteLogitsError: a logit is NaN or infinite (weights that hold such values, or a forward pass
                that overflowed, e.g. in float16).
        """
        if self.window is not None:
            logits = sliding_window_logits(network, image, window=self.window, stride=self.stride)
        else:
            logits = network(image).float()
        if not bool(torch.isfinite(logits).all()):
            bad = int((~torch.isfinite(logits)).sum())
            kind = image.device.type
            precision = ""
            if torch.is_autocast_enabled(kind):
                dtype = str(torch.get_autocast_dtype(kind)).removeprefix("torch.")
                precision = f" under {dtype} autocast (amp=false evaluates in float32)"
            raise NonFiniteLogitsError(
                f"the network's logits for {len(image)} evaluation image(s) hold {bad} NaN or infinite value(s) of "
                f"{logits.numel()}{precision}: its weights or its forward pass overflowed, and such logits cannot "
                "be scored")
        return logits

    @torch.no_grad()
    def __call__(self, network: nn.Module, crfs: dict[str, MeanFieldCRF | None], loader: Iterable[dict], *,
                 panel: Path | None = None) -> dict[str, dict[str, Any]]:
        """The network's predictions alone and through each CRF, scored side by side (reduced over ranks).

        Args:
            crfs: ``{row name: CRF or None (the network alone)}``.
            loader: batches of evaluation samples (image, raw, valid, label).
            panel: where rank 0 writes a PNG of its first :attr:`panels` images, one column per row of ``crfs``.

        Returns:
            ``{row name: SegmentationMeter.summary()}``.
        """
        network.eval()
        for crf in crfs.values():
            if crf is not None:
                crf.eval()
        meters = {name: SegmentationMeter(self.num_classes, device=self.device) for name in crfs}
        rows: list[list[Tensor]] = []
        for batch in loader:
            image, label = batch["image"].to(self.device), batch["label"].to(self.device)
            raw, valid = batch["raw"].to(self.device), batch["valid"].to(self.device)
            with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
                logits = self.logits(network, image)
            bands = boundary_bands(label, BOUNDARY_WIDTHS)
            predictions = {}
            for name, crf in crfs.items():
                predictions[name] = (logits if crf is None else crf(logits, raw, valid)).argmax(1)
                meters[name].update(predictions[name], label, bands)
            for i in range(min(len(image), self.panels - len(rows))):
                rows.append([raw[i].cpu(), *(p[i].cpu() for p in predictions.values()), label[i].cpu()])
        for meter in meters.values():
            meter.reduce()
        check_labelled(next(iter(meters.values())).whole.counts.sum(), "evaluation")
        if panel is not None and rows and dist.is_main_process():
            save_panel(panel, rows, titles=["image", *crfs, "ground truth"], num_classes=self.num_classes)
        return {name: meter.summary() for name, meter in meters.items()}


def evaluate_baselines(
    network: nn.Module,
    evaluate: Evaluator,
    *,
    initial_crf: MeanFieldCRF,
    val_loader: Iterable[dict],
    grid: CRFGrid | None = None,
    held_out_loader: SizeBatches | DataLoader | None = None,
    panel: Path | None = None,
) -> dict[str, Any]:
    """The rows the learned CRF is compared with: the network alone, with ``initial_crf``, and (given a
    ``grid`` and the ``held_out_loader`` to search it on) with the best post-processing CRF of the grid.

    Returns:
        ``{"rows": {name: summary}, "grid_search": {params, held_out_miou, held_out_images, seconds, trials,
        at_edge} or None}``.
    """
    crfs: dict[str, MeanFieldCRF | None] = {"network alone": None, "network + initial CRF (fixed)": initial_crf}
    record = None
    if grid is not None:
        assert held_out_loader is not None, "a grid search needs held-out images"
        start = time.perf_counter()
        cached = cache_logits(network, held_out_loader, device=evaluate.device, predict=evaluate.logits)
        labelled = sum(((c.label != IGNORE_INDEX).sum() for c in cached), torch.zeros((), device=evaluate.device))
        check_labelled(dist.all_reduce_sum(labelled), "grid search's held-out")
        result = grid_search_crf(cached, num_classes=evaluate.num_classes, bilateral_weights=grid.bilateral_weights,
                                 theta_alphas=grid.theta_alphas, theta_betas=grid.theta_betas,
                                 spatial_weight=grid.spatial_weight, theta_gamma=grid.theta_gamma,
                                 iterations=grid.iterations, normalization=grid.normalization,
                                 ignore_index=IGNORE_INDEX, progress=dist.is_main_process())
        del cached
        record = {"params": result.params, "held_out_miou": result.miou,
                  "held_out_images": len(held_out_loader.dataset), "seconds": time.perf_counter() - start,
                  "trials": result.trials, "at_edge": result.at_edge}
        logger.info("grid-searched post-processing CRF: %s (held-out mIoU %.2f, %d combinations, %.0f s)",
                    result.params, 100 * result.miou, len(result.trials), record["seconds"])
        crfs["network + grid-searched CRF"] = fixed_crf(
            num_classes=evaluate.num_classes, spatial_weight=grid.spatial_weight, theta_gamma=grid.theta_gamma,
            iterations=grid.iterations, normalization=grid.normalization, **result.params).to(evaluate.device)
    rows = evaluate(network, crfs, val_loader, panel=panel)
    return {"rows": rows, "grid_search": record}
