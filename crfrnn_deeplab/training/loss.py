"""The training loss: pixel cross-entropy on full-resolution logits, of a network (every MSC scale) or of a
network + CRF model (the CRF's output, optionally plus the network's)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crfrnn_deeplab.data import IGNORE_INDEX
from crfrnn_deeplab.models import CRFRNN, MSCOutput

__all__ = ["segmentation_loss", "forward_loss"]


def segmentation_loss(output: Tensor | MSCOutput, label: Tensor, *, normaliser: Tensor | float,
                      ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Summed pixel cross-entropy divided by ``normaliser``, on the full-resolution logits; for MSC, on the
    fused logits and on each scale's (DeepLab v2 trains every scale).

    Dividing the sum by the number of labelled pixels in the whole (accumulated, all-rank) batch makes the
    gradient independent of how that batch is split into micro-batches and processes.

    Args:
        output: logits Tensor[B, C, H, W] or an :class:`MSCOutput`.
        label: Tensor[B, H, W] int64.
        normaliser: the divisor (e.g. the labelled pixel count of the global batch).
    """
    outputs = [output.fused, *output.per_scale] if isinstance(output, MSCOutput) else [output]
    total = sum(F.cross_entropy(o.float(), label, ignore_index=ignore_index, reduction="sum") for o in outputs)
    return total / normaliser


def forward_loss(model: nn.Module, batch: dict[str, Any], *, device: torch.device, normaliser: Tensor,
                 network_loss_weight: float = 0.0) -> Tensor:
    """The loss on one micro-batch (``model`` may be DDP-wrapped): a :class:`CRFRNN`'s on the CRF's output, plus
    ``network_loss_weight`` × the network's; a network's on its output (every MSC scale).

    Args:
        batch: ``image`` (normalised), ``raw`` (RGB 0-255), ``valid`` and ``label`` tensors of a micro-batch.
        normaliser: see :func:`segmentation_loss`.
    """
    image = batch["image"].to(device, non_blocking=True)
    label = batch["label"].to(device, non_blocking=True)
    if isinstance(getattr(model, "module", model), CRFRNN):
        out = model(image, batch["raw"].to(device, non_blocking=True), batch["valid"].to(device, non_blocking=True))
        loss = segmentation_loss(out.crf, label, normaliser=normaliser)
        if network_loss_weight:
            loss = loss + network_loss_weight * segmentation_loss(out.network, label, normaliser=normaliser)
        return loss
    return segmentation_loss(model(image), label, normaliser=normaliser)
