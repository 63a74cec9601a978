"""Model registry: every registered model builds and runs; names, options and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from crfrnn_deeplab.models import MSC, DeepLabV2
from crfrnn_deeplab.models.conventions import CAFFE_CONVENTION, TORCHVISION_CONVENTION
from crfrnn_deeplab.models.registry import get_model, list_models, register_model

REQUIRED = [
    "deeplabv2_resnet101",
    "deeplabv2_resnet50",
    "deeplabv2_resnet101_msc",
    "deeplabv2_resnet50_msc",
    "deeplabv2_resnet18",
    "deeplabv2_resnet34",
]


def test_list_models_is_sorted_and_complete():
    names = list_models()
    assert names == sorted(names)
    assert set(REQUIRED) <= set(names)


@pytest.mark.parametrize("name", list_models())
@torch.no_grad()
def test_every_registered_model_builds_and_runs(name):
    torch.manual_seed(0)
    model = get_model(name, num_classes=3).eval()
    size = model.min_input_size + 9
    logits = model(torch.randn(1, 3, size, size + 4))
    assert logits.shape == (1, 3, size, size + 4)
    assert torch.isfinite(logits).all()
    assert model.num_classes == 3


def test_resnet101_parameter_count():
    model = get_model("deeplabv2_resnet101", num_classes=21)
    assert isinstance(model, DeepLabV2)
    assert sum(p.numel() for p in model.parameters()) == 44_048_532


def test_default_input_conventions():
    assert get_model("deeplabv2_resnet50", num_classes=2).input_convention == CAFFE_CONVENTION
    assert get_model("deeplabv2_resnet18", num_classes=2, base_width=8).input_convention == TORCHVISION_CONVENTION


def test_options_are_passed_through():
    model = get_model(
        "deeplabv2_resnet18_msc",
        num_classes=4,
        scales=(1.0, 0.5),
        output_stride=16,
        head="largefov",
        norm="frozen",
        base_width=8,
        ceil_mode=False,
        dilate_first_block=False,
        input_convention=CAFFE_CONVENTION,
    )
    assert isinstance(model, MSC) and model.scales == (1.0, 0.5)
    inner = model.model
    assert inner.output_stride == 16 and inner.head.rates == (12,) and inner.backbone.norm == "frozen"
    assert inner.backbone.out_channels == 64 and inner.backbone.maxpool.ceil_mode is False
    assert inner.backbone.layer4[0].conv1.dilation == (1, 1)
    assert model.input_convention == CAFFE_CONVENTION
    big = get_model("deeplabv2_resnet50", num_classes=2, stride_in_1x1=False, head="aspp_s")
    assert big.backbone.layer2[0].conv2.stride == (2, 2) and big.head.rates == (2, 4, 8, 12)


def test_unknown_model_name_lists_known_names():
    message = r"unknown model 'deeplabv3_resnet101'; known models: \[.*'deeplabv2_resnet101'"
    with pytest.raises(ValueError, match=message):
        get_model("deeplabv3_resnet101", num_classes=21)


def test_unknown_option_is_named():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['stride_in_1x1'\] for model 'deeplabv2_resnet18'"):
        get_model("deeplabv2_resnet18", num_classes=21, stride_in_1x1=True)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['base_width'\] for model 'deeplabv2_resnet101_msc'"):
        get_model("deeplabv2_resnet101_msc", num_classes=21, base_width=16)


@pytest.mark.parametrize(
    ("num_classes", "error", "match"),
    [
        (0, ValueError, r"num_classes must be >= 1, got 0"),
        (-3, ValueError, r"num_classes must be >= 1, got -3"),
        ("21", TypeError, r"num_classes must be an int, got str"),
    ],
)
def test_bad_num_classes(num_classes, error, match):
    with pytest.raises(error, match=match):
        get_model("deeplabv2_resnet18", num_classes=num_classes)


def test_bad_option_values():
    with pytest.raises(ValueError, match=r"head must be one of .* got 'aspp'"):
        get_model("deeplabv2_resnet18", num_classes=2, head="aspp", base_width=8)
    with pytest.raises(ValueError, match=r"output_stride must be one of \(8, 16\), got 32"):
        get_model("deeplabv2_resnet18", num_classes=2, output_stride=32)


@pytest.mark.parametrize("name", ["deeplabv2_resnet18", "deeplabv2_resnet50"])
@pytest.mark.parametrize("stride", [8.0, True, "8"])
def test_non_int_output_stride_is_named(name, stride):
    # 8.0 == 8 once passed the backbone's check and failed later as a broken "backbone contract"
    with pytest.raises(ValueError, match=r"output_stride must be one of \(8, 16\), got .*an int is needed"):
        get_model(name, num_classes=2, output_stride=stride, **({"base_width": 8} if "18" in name else {}))


@pytest.mark.parametrize("name", [["deeplabv2_resnet18"], None, 3])
def test_model_name_must_be_a_string(name):
    with pytest.raises(TypeError, match=r"model name must be a str, got .*; known models: \[.*'deeplabv2_resnet18'"):
        get_model(name, num_classes=2)


def test_register_model_decorator():
    @register_model(name="_test_tiny_model")
    def tiny(*, num_classes: int, width: int = 2) -> nn.Module:
        return nn.Conv2d(3, num_classes * width, 1)

    try:
        assert "_test_tiny_model" in list_models()
        assert get_model("_test_tiny_model", num_classes=2, width=3).out_channels == 6
        with pytest.raises(ValueError, match=r"a model named '_test_tiny_model' is already registered"):
            register_model(name="_test_tiny_model")(tiny)
    finally:
        from crfrnn_deeplab.models import registry

        registry._MODELS.pop("_test_tiny_model")

    with pytest.raises(TypeError, match=r"model builder 'no_classes' must take a num_classes keyword argument"):

        @register_model
        def no_classes() -> nn.Module:
            return nn.Identity()
