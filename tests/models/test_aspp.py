"""DeepLab v2 heads: summed atrous branches, initialisation, key names, bad arguments."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from crfrnn_deeplab.models.aspp import ASPP, ASPP_L_RATES, ASPP_S_RATES, HEAD_RATES, LARGEFOV_RATES, build_head


def test_branches_are_summed_not_concatenated():
    torch.manual_seed(0)
    head = ASPP(in_channels=6, num_classes=4, rates=(1, 2, 3))
    with torch.no_grad():
        for conv in head.branches:
            conv.bias.normal_()
        x = torch.randn(2, 6, 7, 9)
        expected = sum(F.conv2d(x, c.weight, c.bias, padding=r, dilation=r) for c, r in zip(head.branches, (1, 2, 3)))
        out = head(x)
    assert out.shape == (2, 4, 7, 9)
    torch.testing.assert_close(out, expected)


def test_aspp_l_layout_and_parameter_count():
    head = build_head("aspp_l", in_channels=2048, num_classes=21)
    assert head.rates == ASPP_L_RATES == (6, 12, 18, 24)
    assert [c.dilation for c in head.branches] == [(r, r) for r in ASPP_L_RATES]
    assert [c.padding for c in head.branches] == [(r, r) for r in ASPP_L_RATES]
    assert list(head.state_dict()) == [f"branches.{i}.{t}" for i in range(4) for t in ("weight", "bias")]
    assert sum(p.numel() for p in head.parameters()) == 1_548_372


def test_initialisation():
    torch.manual_seed(0)
    head = build_head("aspp_l", in_channels=256, num_classes=21)
    weights = torch.cat([c.weight.flatten() for c in head.branches])
    assert abs(weights.std().item() - 0.01) < 5e-4 and abs(weights.mean().item()) < 5e-4
    assert all(torch.count_nonzero(c.bias) == 0 for c in head.branches)


@pytest.mark.parametrize(("kind", "rates"), [("aspp_s", ASPP_S_RATES), ("largefov", LARGEFOV_RATES)])
def test_variants(kind, rates):
    head = build_head(kind, in_channels=8, num_classes=3)
    assert head.rates == rates == HEAD_RATES[kind] and len(head.branches) == len(rates)
    assert head(torch.randn(1, 8, 5, 5)).shape == (1, 3, 5, 5)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_classes": 0}, ValueError, r"num_classes must be >= 1, got 0"),
        ({"num_classes": 2.0}, TypeError, r"num_classes must be an int, got float 2.0"),
        ({"in_channels": -1}, ValueError, r"in_channels must be >= 1, got -1"),
        ({"rates": ()}, ValueError, r"rates must name at least one dilation rate"),
        ({"rates": (6, 0)}, ValueError, r"rates must be positive ints, got \(6, 0\)"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ASPP(**{"in_channels": 8, "num_classes": 3, **kwargs})


def test_unknown_head_kind():
    with pytest.raises(ValueError, match=r"head must be one of \['aspp_l', 'aspp_s', 'largefov'\], got 'aspp_xl'"):
        build_head("aspp_xl", in_channels=8, num_classes=3)
