"""DeepLab v2 heads: atrous spatial pyramid pooling (ASPP) with summed branches.

DeepLab v2 (Chen et al., TPAMI 2017, Sec. 3.2, Fig. 4) classifies every position of the stride-8 feature map
with several parallel 3×3 atrous convolutions of different rates, each producing class scores directly, and
**sums** the branches (DeepLab v3 concatenates 256-channel branches and adds a projection; that is a different
head). The variants of the paper are one class with different rates:

- ASPP-L: rates (6, 12, 18, 24) — the DeepLab v2 ResNet-101 default;
- ASPP-S: rates (2, 4, 8, 12);
- LargeFOV: one branch at rate 12.

Parameter names: branch ``i`` (in the order of ``rates``) is ``branches.{i}.weight`` (``Tensor[num_classes,
in_channels, 3, 3]``) and ``branches.{i}.bias`` (``Tensor[num_classes]``). The DeepLab v2 ports name them
``aspp.c{i}.weight`` / ``aspp.c{i}.bias`` with the same order and shapes, so a checkpoint converter maps
``aspp.c{i}.*`` onto ``head.branches.{i}.*`` one to one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

__all__ = [
    "ASPP",
    "HeadKind",
    "ASPP_L_RATES",
    "ASPP_S_RATES",
    "LARGEFOV_RATES",
    "HEAD_RATES",
    "build_head",
]

HeadKind = Literal["aspp_l", "aspp_s", "largefov"]

#: ASPP-L, the DeepLab v2 ResNet-101 head.
ASPP_L_RATES: tuple[int, ...] = (6, 12, 18, 24)
#: ASPP-S.
ASPP_S_RATES: tuple[int, ...] = (2, 4, 8, 12)
#: DeepLab-LargeFOV: a single rate-12 branch.
LARGEFOV_RATES: tuple[int, ...] = (12,)
#: Head name (the ``head`` option of the model builders) to its rates.
HEAD_RATES: dict[str, tuple[int, ...]] = {
    "aspp_l": ASPP_L_RATES,
    "aspp_s": ASPP_S_RATES,
    "largefov": LARGEFOV_RATES,
}


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


class ASPP(nn.Module):
    """DeepLab v2 ASPP: parallel 3×3 atrous convs to class scores, summed.

    ``scores = Σ_r conv3x3_r(features)``, each ``conv3x3_r`` with dilation = padding = ``r`` (so the spatial
    size is kept) and a bias. Weights are initialised from N(0, 0.01²) and biases to 0, as in DeepLab v2.

    Args:
        in_channels: channels of the backbone features.
        num_classes: number of classes (output channels of every branch).
        rates: one dilation rate per branch, e.g. :data:`ASPP_L_RATES`.

    Attributes:
        in_channels, num_classes, rates: as given.
        branches (nn.ModuleList[nn.Conv2d]): branch ``i`` has rate ``rates[i]``; keys ``branches.{i}.weight``
            and ``branches.{i}.bias``.
    """

    def __init__(self, *, in_channels: int, num_classes: int, rates: Sequence[int] = ASPP_L_RATES) -> None:
        super().__init__()
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("num_classes", num_classes)
        rates = tuple(rates)
        if not rates:
            raise ValueError("rates must name at least one dilation rate, got an empty sequence")
        for r in rates:
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise ValueError(f"rates must be positive ints, got {rates!r}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.rates = rates
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, kernel_size=3, padding=r, dilation=r, bias=True) for r in rates
        )
        for conv in self.branches:
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, features: Tensor) -> Tensor:
        """Class scores at the resolution of the features.

        Args:
            features (Tensor[B, in_channels, h, w]): backbone output.

        Returns:
            scores (Tensor[B, num_classes, h, w]): sum of the branches' scores (logits before upsampling).
        """
        scores = self.branches[0](features)
        for branch in self.branches[1:]:
            scores = scores + branch(features)
        return scores

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, num_classes={self.num_classes}, rates={self.rates}"


def build_head(kind: HeadKind, *, in_channels: int, num_classes: int) -> ASPP:
    """The named DeepLab v2 head.

    Args:
        kind: ``"aspp_l"`` (rates 6, 12, 18, 24), ``"aspp_s"`` (2, 4, 8, 12) or ``"largefov"`` (12).
        in_channels: channels of the backbone features.
        num_classes: number of classes.

    Returns:
        An :class:`ASPP` with the rates of ``kind``.
    """
    if kind not in HEAD_RATES:
        raise ValueError(f"head must be one of {sorted(HEAD_RATES)}, got {kind!r}")
    return ASPP(in_channels=in_channels, num_classes=num_classes, rates=HEAD_RATES[kind])
