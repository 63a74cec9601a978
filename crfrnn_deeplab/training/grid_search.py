"""The post-processing CRF baseline: a fixed-weight dense CRF whose parameters are grid-searched.

DeepLab v2 (Chen et al., TPAMI 2017, Sec. 4.1) cross-validates the fully-connected CRF on a held-out subset:
the bilateral kernel's weight ``w`` and bandwidths ``θα`` (position) and ``θβ`` (colour) are searched on a
grid for the best mIoU, the spatial (smoothness) kernel is kept fixed (``w = 3, θγ = 3``). This is the
baseline a CRF learned end to end has to beat.

The network's logits are computed once (:func:`cache_logits`); every combination then only runs mean-field
inference, and the bilateral lattice of an image is built once per ``(θα, θβ)`` and shared by all weights.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm import tqdm

from crfrnn_deeplab.crf.fast_inference import mean_field_inference
from crfrnn_deeplab.crf.kernels import Normalization
from crfrnn_deeplab.crf.mean_field import fixed_crf
from crfrnn_deeplab.distributed import all_reduce_sum
from crfrnn_deeplab.training.metrics import ConfusionMatrix

__all__ = ["CRFGrid", "CachedSample", "GridSearchResult", "cache_logits", "grid_search_crf"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CRFGrid:
    """What is searched (the bilateral kernel's weight and bandwidths) and what is fixed (the spatial kernel,
    the number of iterations, the normalisation) in a post-processing CRF grid search."""

    bilateral_weights: Sequence[float]
    theta_alphas: Sequence[float]
    theta_betas: Sequence[float]
    spatial_weight: float = 3.0
    theta_gamma: float = 3.0
    iterations: int = 10
    normalization: Normalization = "symmetric"


@dataclass
class CachedSample:
    """One batch of held-out images with the network's logits.

    Attributes:
        logits: Tensor[B, C, H, W] float32.
        raw: Tensor[B, 3, H, W], RGB 0-255.
        valid: Tensor[B, H, W] bool.
        label: Tensor[B, H, W] int64 (255 = ignore).
    """

    logits: Tensor
    raw: Tensor
    valid: Tensor
    label: Tensor


@dataclass
class GridSearchResult:
    """The best combination and every combination's held-out mIoU.

    Attributes:
        params: ``{"bilateral_weight", "theta_alpha", "theta_beta"}`` of the best combination.
        miou: its held-out mIoU.
        trials: ``[{"bilateral_weight", "theta_alpha", "theta_beta", "miou"}, ...]`` in search order.
        at_edge: the parameters whose best value is the smallest or largest searched (a warning is logged:
            the optimum may lie outside the grid).
    """

    params: dict[str, float]
    miou: float
    trials: list[dict[str, float]] = field(default_factory=list)
    at_edge: list[str] = field(default_factory=list)


@torch.no_grad()
def cache_logits(
    network: nn.Module, batches: Iterable[dict], *, device: torch.device,
    predict: Callable[[nn.Module, Tensor], Tensor] | None = None,
) -> list[CachedSample]:
    """Runs ``network`` (eval mode) once over ``batches`` of transformed samples (image/raw/valid/label).

    Args:
        predict: optional ``predict(network, image) -> logits`` (e.g. sliding-window inference); default
            ``network(image)``.
    """
    network.eval()
    cached = []
    for batch in batches:
        image = batch["image"].to(device)
        logits = predict(network, image) if predict is not None else network(image)
        cached.append(
            CachedSample(logits.float(), batch["raw"].to(device), batch["valid"].to(device), batch["label"].to(device))
        )
    return cached


@torch.no_grad()
def grid_search_crf(
    samples: Sequence[CachedSample],
    *,
    num_classes: int,
    bilateral_weights: Sequence[float],
    theta_alphas: Sequence[float],
    theta_betas: Sequence[float],
    spatial_weight: float = 3.0,
    theta_gamma: float = 3.0,
    iterations: int = 10,
    normalization: Normalization = "symmetric",
    ignore_index: int = 255,
    progress: bool = False,
) -> GridSearchResult:
    """Searches ``bilateral_weights × theta_alphas × theta_betas`` for the best mIoU on ``samples``.

    Under ``torch.distributed`` each rank passes its shard of the held-out images; the confusion matrices are
    summed over the ranks, so every rank returns the same result.

    Args:
        progress: show a progress bar (one step per held-out batch and combination).

    Returns:
        The :class:`GridSearchResult`; ties go to the combination searched first.
    """
    if not samples:
        raise ValueError("grid_search_crf needs at least one held-out sample")
    axes = {"bilateral_weights": bilateral_weights, "theta_alphas": theta_alphas, "theta_betas": theta_betas}
    for name, values in axes.items():
        if len(values) == 0:
            raise ValueError(f"grid_search_crf: {name} is empty; give at least one value to search")
    combos = list(itertools.product(theta_alphas, theta_betas, bilateral_weights))
    device = samples[0].logits.device
    counts = torch.zeros(len(combos), num_classes, num_classes, dtype=torch.long, device=device)
    crfs = {
        (a, b, w): fixed_crf(
            num_classes=num_classes, bilateral_weight=w, theta_alpha=a, theta_beta=b, spatial_weight=spatial_weight,
            theta_gamma=theta_gamma, iterations=iterations, normalization=normalization,
        ).to(device)
        for a, b, w in combos
    }
    bar = tqdm(total=len(samples) * len(combos), desc="CRF grid search", disable=not progress, dynamic_ncols=True)
    for sample in samples:
        unary = sample.logits.float().permute(0, 2, 3, 1).contiguous()  # [B, H, W, C], as MeanFieldCRF
        raw = sample.raw.float()
        for (alpha, beta), group in itertools.groupby(enumerate(combos), key=lambda x: x[1][:2]):
            group = list(group)
            # The lattice depends on the bandwidths only: built once, shared by every weight (what
            # MeanFieldCRF.forward computes, with the kernels hoisted out of the loop over weights).
            kernels = crfs[group[0][1]].kernels(raw, sample.valid)
            for index, combo in group:
                z = mean_field_inference(unary, kernels, crfs[combo].pairwise(), iterations)
                cm = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=device)
                cm.update(z.argmax(-1), sample.label)
                counts[index] += cm.counts
                bar.update(1)
    bar.close()
    all_reduce_sum(counts)
    axes = {"bilateral_weight": bilateral_weights, "theta_alpha": theta_alphas, "theta_beta": theta_betas}
    return _best_of(combos, counts, axes, ignore_index=ignore_index)


def _best_of(combos: list[tuple[float, float, float]], counts: Tensor, axes: dict[str, Sequence[float]], *,
             ignore_index: int) -> GridSearchResult:
    """The result of a search: every ``(θα, θβ, w)`` combination's mIoU from its confusion ``counts``, the best
    (ties to the first), and the axes whose best value is at an end of the grid (logged as a warning)."""
    trials = []
    for (alpha, beta, w), c in zip(combos, counts):
        cm = ConfusionMatrix(c.shape[-1], ignore_index=ignore_index)
        cm.counts = c.cpu()
        trials.append({"bilateral_weight": w, "theta_alpha": alpha, "theta_beta": beta, "miou": cm.scores()["miou"]})
    best = max(trials, key=lambda t: (t["miou"], -trials.index(t)))
    params = {k: best[k] for k in ("bilateral_weight", "theta_alpha", "theta_beta")}
    logger.info("grid search over %d combinations: best %s (held-out mIoU %.4f)", len(combos), params, best["miou"])
    at_edge = [k for k, values in axes.items() if len(set(values)) > 1 and params[k] in (min(values), max(values))]
    if at_edge:
        logger.warning("the best post-processing CRF lies on the edge of the grid in %s: the optimum may be "
                       "outside it; extend the grid there for a fair baseline", ", ".join(at_edge))
    return GridSearchResult(params=params, miou=best["miou"], trials=trials, at_edge=at_edge)
