"""Segmentation metrics from a confusion matrix, and boundary (trimap) accuracy where a CRF earns its keep.

- :class:`ConfusionMatrix` accumulates ``C×C`` counts (rows: ground truth, columns: prediction), ignoring the
  ignore label, on any device; :meth:`ConfusionMatrix.reduce` sums it across ``torch.distributed`` ranks.
- :func:`scores`: mIoU, per-class IoU, pixel accuracy, mean class accuracy, frequency-weighted IoU (the
  definitions of Long et al., FCN, 2015, Sec. 5). Classes absent from both ground truth and prediction are
  left out of the means (NaN per-class IoU), as is usual for VOC.
- :func:`boundary_band`: the trimap of Kohli et al. (2009) used by DeepLab (Chen et al., TPAMI 2017, Fig. 5):
  pixels within ``width`` pixels of a ground-truth label edge. Accumulating a second confusion matrix on the
  band gives the boundary mIoU.
- :class:`SegmentationMeter`: one confusion matrix for the whole image and one per boundary band, the report
  every evaluation prints (``miou``, ``pixel_acc``, ``mean_class_acc``, ``fwiou``, ``iou``,
  ``boundary_miou_{w}px``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from crfrnn_deeplab.distributed import all_reduce_sum

__all__ = ["ConfusionMatrix", "scores", "boundary_band", "boundary_bands", "SegmentationMeter", "BOUNDARY_WIDTHS"]

#: Half-widths (pixels) of the boundary bands reported by default.
BOUNDARY_WIDTHS: tuple[int, ...] = (2, 5, 10)


class ConfusionMatrix:
    """Accumulated ``C×C`` confusion counts (int64).

    Args:
        num_classes: C.
        ignore_index: label value that is not counted.
        device: where the counts live.
    """

    def __init__(self, num_classes: int, *, ignore_index: int = 255, device: torch.device | str = "cpu") -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)

    def update(self, prediction: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        """Adds a batch.

        Args:
            prediction: Tensor[...] int, predicted classes in ``[0, C)``.
            target: Tensor[...] int of the same shape, classes in ``[0, C)`` or ``ignore_index``.
            mask: optional Tensor[...] bool: count only these pixels (e.g. a boundary band).
        """
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
        keep = target != self.ignore_index
        if mask is not None:
            keep &= mask
        t, p = target[keep].long(), prediction[keep].long()
        bad = (t < 0) | (t >= self.num_classes)
        if bad.any():
            raise ValueError(
                f"target has labels {sorted(set(t[bad].tolist()))[:10]} outside [0, {self.num_classes}) that are "
                f"not the ignore label {self.ignore_index}"
            )
        if ((p < 0) | (p >= self.num_classes)).any():
            raise ValueError(f"prediction has classes outside [0, {self.num_classes})")
        counts = torch.bincount(t * self.num_classes + p, minlength=self.num_classes**2)
        self.counts += counts.view(self.num_classes, self.num_classes).to(self.counts.device)

    def reduce(self) -> None:
        """Sums the counts over all ranks of the default process group (no-op when not distributed)."""
        all_reduce_sum(self.counts)

    def scores(self) -> dict[str, float | list[float]]:
        """See :func:`scores`."""
        return scores(self.counts)


def scores(counts: Tensor) -> dict[str, float | list[float]]:
    """Standard segmentation scores of a confusion matrix (rows: ground truth, columns: prediction).

    Returns:
        ``{"miou", "pixel_acc", "mean_class_acc", "fwiou", "iou": per-class list}``; values in [0, 1], NaN for
        an empty matrix.
    """
    c = counts.double()
    tp = c.diag()
    gt, pred = c.sum(1), c.sum(0)
    union = gt + pred - tp
    total = c.sum()
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))
    present = union > 0
    acc = torch.where(gt > 0, tp / gt.clamp_min(1), torch.full_like(tp, math.nan))
    nan = float("nan")
    return {
        "miou": float(iou[present].mean()) if present.any() else nan,
        "pixel_acc": float(tp.sum() / total) if total > 0 else nan,
        "mean_class_acc": float(acc[gt > 0].mean()) if (gt > 0).any() else nan,
        "fwiou": float((gt[present] / total * iou[present]).sum()) if total > 0 else nan,
        "iou": iou.tolist(),
    }


def boundary_band(target: Tensor, width: int) -> Tensor:
    """Pixels within ``width`` pixels (Chebyshev distance) of a label edge of ``target``.

    An edge is a pair of 4-neighbours with different labels, ignore-label borders included (VOC draws its
    ignore band exactly on object boundaries). Ignored pixels themselves are then excluded by the confusion
    matrix.

    Args:
        target: Tensor[B, H, W] or Tensor[H, W] int labels.
        width: band half-width in pixels (>= 1).

    Returns:
        Tensor of bool, same shape as ``target``.
    """
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    t = target if target.dim() == 3 else target[None]
    edge = torch.zeros_like(t, dtype=torch.bool)
    dy = t[:, 1:, :] != t[:, :-1, :]
    dx = t[:, :, 1:] != t[:, :, :-1]
    edge[:, 1:, :] |= dy
    edge[:, :-1, :] |= dy
    edge[:, :, 1:] |= dx
    edge[:, :, :-1] |= dx
    # Dilating the one-pixel-thick edge by width - 1 more pixels gives the band of half-width `width`.
    k = 2 * (width - 1) + 1
    band = F.max_pool2d(edge[:, None].float(), k, stride=1, padding=width - 1)[:, 0] > 0
    return band if target.dim() == 3 else band[0]


def boundary_bands(target: Tensor, widths: Sequence[int] = BOUNDARY_WIDTHS) -> dict[int, Tensor]:
    """:func:`boundary_band` for each width (computed once per batch and shared by every prediction scored)."""
    return {w: boundary_band(target, w) for w in widths}


class SegmentationMeter:
    """Whole-image and boundary-band confusion matrices of one model's predictions.

    Args:
        num_classes: C.
        widths: boundary band half-widths in pixels.
        ignore_index: label value that is not counted.
        device: where the counts live (the device of the process group's backend when distributed).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        widths: Sequence[int] = BOUNDARY_WIDTHS,
        ignore_index: int = 255,
        device: torch.device | str = "cpu",
    ) -> None:
        self.widths = tuple(widths)
        self.whole = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=device)
        self.bands = {w: ConfusionMatrix(num_classes, ignore_index=ignore_index, device=device) for w in self.widths}

    def update(self, prediction: Tensor, target: Tensor, bands: dict[int, Tensor] | None = None) -> None:
        """Adds a batch; ``bands`` from :func:`boundary_bands` (computed here when omitted)."""
        if bands is None:
            bands = boundary_bands(target, self.widths)
        self.whole.update(prediction, target)
        for w in self.widths:
            self.bands[w].update(prediction, target, mask=bands[w])

    def reduce(self) -> None:
        """Sums every matrix over the ranks (no-op when not distributed)."""
        self.whole.reduce()
        for cm in self.bands.values():
            cm.reduce()

    def summary(self) -> dict[str, float | list[float]]:
        """:func:`scores` of the whole image plus ``boundary_miou_{w}px`` for each band."""
        out = self.whole.scores()
        for w in self.widths:
            out[f"boundary_miou_{w}px"] = self.bands[w].scores()["miou"]
        return out
