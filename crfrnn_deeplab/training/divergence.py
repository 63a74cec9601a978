"""Noticing that training diverges before a diverged state is saved: a non-finite loss or gradient norm, a
loss far above its running average, or a parameter driven to a non-finite value (directly, or through the
``exp`` of a log-parameterised one such as the CRF's bandwidths), or the CRF's weights grown past what its messages
can hold."""

from __future__ import annotations

import math

import torch
from torch import nn

from crfrnn_deeplab.crf import MeanFieldCRF
from crfrnn_deeplab.crf.fast_inference import check_mixes

__all__ = ["DivergenceError", "LossMonitor", "crf_parameter_problem", "non_finite_parameters"]


class DivergenceError(RuntimeError):
    """Training diverged; the update that showed it was not saved (the last checkpoint is intact)."""


class LossMonitor:
    """An exponential moving average of the loss, and the loss above which a step counts as divergence.

    Args:
        factor: a step whose loss exceeds ``factor`` × the average diverges (0: never; a non-finite loss
            always does). The average starts at the first loss seen, so the check applies from the second step.
        beta: weight of the previous average in each update.
    """

    def __init__(self, factor: float, *, beta: float = 0.9) -> None:
        self.factor, self.beta = factor, beta
        self.average: float | None = None

    @property
    def limit(self) -> float:
        """The largest loss accepted for the next step (``inf`` until a loss was seen, or when disabled)."""
        if not self.factor or self.average is None:
            return math.inf
        return self.factor * self.average

    def update(self, loss: float) -> None:
        self.average = loss if self.average is None else self.beta * self.average + (1 - self.beta) * loss


def non_finite_parameters(module: nn.Module) -> list[str]:
    """Names of the parameters that are not finite, or whose ``exp`` is not (parameters named ``log_*``: the
    CRF's bandwidths are stored as logarithms, and an overflowing ``exp`` would break every later use)."""
    bad = []
    for name, p in module.named_parameters():
        value = p.detach()
        if not torch.isfinite(value).all() or (name.rpartition(".")[2].startswith("log_")
                                                and not torch.isfinite(value.float().exp()).all()):
            bad.append(name)
    return bad


def crf_parameter_problem(crf: MeanFieldCRF) -> str | None:
    """What makes the CRF's parameters unusable after an update, or None: a parameter that is not finite
    (:func:`non_finite_parameters`), or kernel weights times compatibility so large that the next forward would
    refuse them (:func:`~crfrnn_deeplab.crf.fast_inference.check_mixes`)."""
    if bad := non_finite_parameters(crf):
        return f"the CRF parameter(s) {', '.join(bad)} overflowed in the update"
    try:
        with torch.no_grad():
            check_mixes(crf.pairwise(torch.float32), torch.float32)  # as the forward multiplies them
    except ValueError as e:
        return f"the update made the CRF's weights too large: {e}"
    return None
