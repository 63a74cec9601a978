"""CRFRNN around a user's own network: what it names when the network breaks the contract (logits
Tensor[B, num_classes, H, W] at the input's size) instead of the CRF's words about logits the caller never gave."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from crfrnn_deeplab import CRFRNN, MeanFieldCRF
from crfrnn_deeplab.models.conventions import TORCHVISION_CONVENTION


class _Network(nn.Module):
    """A 1×1 convolution to ``channels`` logits, returned as ``form`` says."""

    input_convention = TORCHVISION_CONVENTION

    def __init__(self, form: str = "tensor", *, channels: int = 3, num_classes: object = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 1)
        self.form = form
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> object:
        y = self.conv(x)
        return {
            "tensor": y,
            "dict": {"out": y, "aux": y},  # torchvision's segmentation models
            "tuple": (y, y),
            "stride 2": y[..., ::2, ::2],
            "channels last": y.permute(0, 2, 3, 1),
        }[self.form]


RAW = torch.rand(2, 3, 10, 12, generator=torch.Generator().manual_seed(0)) * 255
X = RAW / 255 - 0.5


@pytest.mark.parametrize("form, channels, error, match", [
    # before: "logits must be a torch.Tensor [B, C, H, W], got dict" (the CRF's argument)
    ("dict", 3, TypeError, r"the network must return logits Tensor\[B, C, H, W\] = \(2, 3, 10, 12\) \(or an "
                           r"MSCOutput\), got dict with keys \['out', 'aux'\]: wrap the network"),
    ("tuple", 3, TypeError, r"the network must return logits .* got tuple"),
    # before: "image (2, 3, 10, 12) does not match logits (2, 3, 5, 6): expected (2, 3, 5, 6)"
    ("stride 2", 3, ValueError, r"the network returned logits of shape \(2, 3, 5, 6\), expected Tensor\[B, C, H, W\] "
                                r"= \(2, 3, 10, 12\): it must upsample its logits to its input's size"),
    ("channels last", 3, ValueError, r"shape \(2, 10, 12, 3\), expected .*: it must return them channels first"),
    # before: "logits have 4 classes, the CRF was built for 3", where the network's num_classes says 3
    ("tensor", 4, ValueError, r"the network returned logits of 4 classes, but its num_classes \(and the CRF's\) is 3"),
])
def test_a_network_breaking_the_contract_is_named(form, channels, error, match):
    model = CRFRNN(network=_Network(form, channels=channels), crf=MeanFieldCRF(num_classes=3))
    with pytest.raises(error, match=match):
        model(X, RAW)


def test_a_network_keeping_the_contract_runs():
    torch.manual_seed(0)
    model = CRFRNN(network=_Network(), crf=MeanFieldCRF(num_classes=3, train_iterations=2)).train()
    out = model(X, RAW)
    assert out.crf.shape == (2, 3, 10, 12) and torch.equal(out.network, model.network(X))
    out.crf.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_an_unbatched_input_is_named_before_the_network_runs():
    # a convolution takes [3, H, W] too: the CRF then reported its logits' shape
    model = CRFRNN(network=_Network(), crf=MeanFieldCRF(num_classes=3))
    with pytest.raises(ValueError, match=r"x must be a Tensor\[B, 3, H, W\], got shape \(3, 10, 12\)"):
        model(X[0], RAW[0])


def test_a_bool_num_classes_is_refused():
    # True == 1, so a network with num_classes=True was wrapped with a one-class CRF
    with pytest.raises(TypeError, match=r"network must have an int attribute `num_classes` .*got True"):
        CRFRNN(network=_Network(num_classes=True), crf=MeanFieldCRF(num_classes=1))
