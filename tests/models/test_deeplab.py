"""DeepLabV2 and MSC: shapes, gradients, parameter groups, multi-scale fusion, input validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from crfrnn_deeplab.crf import MeanFieldCRF

from crfrnn_deeplab.models.aspp import ASPP
from crfrnn_deeplab.models.backbone import resnet18_atrous
from crfrnn_deeplab.models import CRFRNN, MSC, DeepLabV2, MSCOutput, get_model
from crfrnn_deeplab.models.builders import (
    deeplabv2_resnet18,
    deeplabv2_resnet50,
    deeplabv2_resnet101,
)
from crfrnn_deeplab.models.conventions import CAFFE_CONVENTION, TORCHVISION_CONVENTION


@pytest.fixture(scope="module")
def resnet101() -> DeepLabV2:
    torch.manual_seed(0)
    return deeplabv2_resnet101(num_classes=21).eval()


@pytest.fixture
def light() -> DeepLabV2:
    torch.manual_seed(0)
    return deeplabv2_resnet18(num_classes=3, base_width=8)


def _assert_every_trainable_parameter_has_a_finite_gradient(model: nn.Module) -> None:
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for name, p in trainable:
        assert p.grad is not None, f"{name} received no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"


def test_resnet101_parameter_count(resnet101):
    assert sum(p.numel() for p in resnet101.parameters()) == 44_048_532  # 42,500,160 trunk + 1,548,372 ASPP-L
    assert resnet101.num_classes == 21 and resnet101.output_stride == 8
    assert resnet101.input_convention == CAFFE_CONVENTION


@torch.no_grad()
def test_resnet101_shapes(resnet101):
    features = []
    hook = resnet101.backbone.register_forward_hook(lambda module, args, out: features.append(out.shape))
    try:
        logits = resnet101(torch.randn(1, 3, 321, 321))
        assert logits.shape == (1, 21, 321, 321)
        assert features[-1] == (1, 2048, 41, 41)
        assert resnet101(torch.randn(1, 3, 97, 65)).shape == (1, 21, 97, 65)
        assert features[-1] == (1, 2048, 13, 9)
    finally:
        hook.remove()


def test_light_model_forward_and_preprocess(light):
    raw = torch.randint(0, 256, (2, 3, 37, 50), dtype=torch.uint8)
    assert light.input_convention == TORCHVISION_CONVENTION
    x = light.preprocess(raw)
    torch.testing.assert_close(x, TORCHVISION_CONVENTION.normalize(raw))
    assert light(x).shape == (2, 3, 37, 50)
    assert light.scores(x).shape == (2, 3, 5, 7)


def test_upsampling_is_bilinear_without_corner_alignment(light):
    light.eval()
    x = torch.randn(1, 3, 40, 48)
    with torch.no_grad():
        expected = nn.functional.interpolate(light.scores(x), size=(40, 48), mode="bilinear", align_corners=False)
        torch.testing.assert_close(light(x), expected)


@pytest.mark.parametrize("norm", ["batch", "frozen"])
def test_every_trainable_parameter_gets_a_gradient_light(norm):
    torch.manual_seed(0)
    model = deeplabv2_resnet18(num_classes=3, base_width=8, norm=norm).train()
    target = torch.randint(0, 3, (2, 41, 41))
    nn.functional.cross_entropy(model(torch.randn(2, 3, 41, 41)), target).backward()
    _assert_every_trainable_parameter_has_a_finite_gradient(model)


def test_every_trainable_parameter_gets_a_gradient_resnet50():
    torch.manual_seed(0)
    model = deeplabv2_resnet50(num_classes=2).train()
    target = torch.randint(0, 2, (1, 33, 33))
    nn.functional.cross_entropy(model(torch.randn(1, 3, 33, 33)), target).backward()
    _assert_every_trainable_parameter_has_a_finite_gradient(model)
    bn = model.backbone.bn1
    assert bn.weight.grad is None and not bn.training  # frozen BatchNorm


def test_parameter_groups_partition_the_trainable_parameters():
    model = deeplabv2_resnet18(num_classes=3, base_width=8, norm="frozen")
    groups = [model.backbone_parameters(), model.head_weights(), model.head_biases()]
    ids = [id(p) for group in groups for p in group]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in groups[1]} == {id(c.weight) for c in model.head.branches}
    assert {id(p) for p in groups[2]} == {id(c.bias) for c in model.head.branches}
    assert id(model.backbone.bn1.weight) not in set(ids)  # frozen affine is not trained


def test_msc_training_output_and_fusion(light):
    msc = MSC(model=light, scales=(1.0, 0.75, 0.5)).train()
    x = torch.randn(2, 3, 33, 41)
    out = msc(x)
    assert isinstance(out, MSCOutput) and len(out.per_scale) == 3
    assert out.fused.shape == (2, 3, 33, 41)
    assert all(o.shape == (2, 3, 33, 41) for o in out.per_scale)
    torch.testing.assert_close(out.fused, torch.stack(out.per_scale).amax(dim=0), rtol=0, atol=0)
    target = torch.randint(0, 3, (2, 33, 41))
    sum(nn.functional.cross_entropy(o, target) for o in (out.fused, *out.per_scale)).backward()
    _assert_every_trainable_parameter_has_a_finite_gradient(msc)


def test_msc_eval_returns_tensor_and_single_scale_equals_model(light):
    light.eval()
    x = torch.randn(1, 3, 30, 30)
    with torch.no_grad():
        fused = MSC(model=light).eval()(x)
        assert isinstance(fused, torch.Tensor) and fused.shape == (1, 3, 30, 30)
        torch.testing.assert_close(MSC(model=light, scales=(1.0,)).eval()(x), light(x))


def test_msc_delegates(light):
    msc = MSC(model=light)
    assert msc.input_convention is light.input_convention and msc.num_classes == 3
    assert msc.head_biases() == light.head_biases() and msc.backbone_parameters() == light.backbone_parameters()
    assert msc.min_input_size == 15  # floor((15 - 1) * 0.5) + 1 == 8 == output stride
    raw = torch.full((1, 3, 4, 4), 128, dtype=torch.uint8)
    torch.testing.assert_close(msc.preprocess(raw), light.preprocess(raw))
    assert set(msc.state_dict()) == {f"model.{k}" for k in light.state_dict()}


_BAD_INPUTS = [
    (torch.randn(3, 32, 32), ValueError, r"expected a 4-D tensor of shape \(B, 3, H, W\), got shape \(3, 32, 32\)"),
    (torch.randn(1, 4, 32, 32), ValueError, r"expected 3 channels .* got 4"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), TypeError, r"floating-point .* got dtype torch.uint8.*preprocess"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.bool), TypeError, r"floating-point .* got dtype torch.bool"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.int64), TypeError, r"floating-point .* got dtype torch.int64"),
    ([[0.0]], TypeError, r"expected a Tensor\[B, 3, H, W\], got list"),
]


@pytest.mark.parametrize(("x", "error", "match"), _BAD_INPUTS)
def test_bad_input_deeplab(light, x, error, match):
    with pytest.raises(error, match=match):
        light(x)


@pytest.mark.parametrize(("x", "error", "match"), _BAD_INPUTS)
def test_bad_input_msc(light, x, error, match):
    with pytest.raises(error, match=match):
        MSC(model=light)(x)


def test_too_small_images(light):
    with pytest.raises(ValueError, match=r"image of size 7x20 is too small: the minimum is 8x8"):
        light(torch.randn(1, 3, 7, 20))
    light(torch.randn(2, 3, 8, 8))  # the minimum itself is accepted
    msc = MSC(model=light)
    with pytest.raises(ValueError, match=r"image of size 20x14 is too small: the minimum is 15x15"):
        msc(torch.randn(1, 3, 20, 14))
    msc(torch.randn(2, 3, 15, 15))


def test_bad_construction():
    backbone = resnet18_atrous(base_width=8)
    with pytest.raises(ValueError, match=r"num_classes must be >= 1, got 0"):
        deeplabv2_resnet18(num_classes=0, base_width=8)

    class Head(nn.Module):
        in_channels, num_classes = 64, 0

    with pytest.raises(ValueError, match=r"num_classes must be >= 1, got head.num_classes=0"):
        DeepLabV2(backbone=backbone, head=Head(), input_convention=TORCHVISION_CONVENTION)
    with pytest.raises(ValueError, match=r"head.in_channels \(32\) must equal backbone.out_channels \(64\)"):
        DeepLabV2(backbone=backbone, head=ASPP(in_channels=32, num_classes=2), input_convention=CAFFE_CONVENTION)
    with pytest.raises(TypeError, match=r"input_convention must be an InputConvention, got str"):
        DeepLabV2(backbone=backbone, head=ASPP(in_channels=64, num_classes=2), input_convention="caffe")
    with pytest.raises(TypeError, match=r"backbone must have an int attribute 'out_channels'"):
        DeepLabV2(backbone=nn.Identity(), head=ASPP(in_channels=64, num_classes=2), input_convention=CAFFE_CONVENTION)


def test_bad_msc_construction(light):
    with pytest.raises(ValueError, match=r"scales must be a non-empty sequence .* got \(\)"):
        MSC(model=light, scales=())
    with pytest.raises(ValueError, match=r"scales must be positive finite numbers, got \(1.0, -0.5\)"):
        MSC(model=light, scales=(1.0, -0.5))
    with pytest.raises(ValueError, match=r"scales must be at most 8 .* got 1e\+300"):  # overflowed the resize
        MSC(model=light, scales=(1.0, 1e300))
    with pytest.raises(ValueError, match=r"at most 8 .* got 8.0000001"):  # not "got 8"
        MSC(model=light, scales=(8.0000001,))
    with pytest.raises(TypeError, match=r"model must be a DeepLabV2, got Identity"):
        MSC(model=nn.Identity())


@pytest.mark.parametrize("scales", [(1.0, 0.75, 0.5), (0.5, 1.0)])
def test_msc_score_map_fusion_matches_deeplab_v2(light, scales):
    # DeepLab v2's Caffe model (and its PyTorch ports) take the max over the scales at the stride-8 score map of
    # the unscaled image, then upsample once; the reference is written here with plain torch calls.
    torch.manual_seed(3)
    x = torch.randn(2, 3, 41, 53)
    msc = MSC(model=light, scales=scales, fusion="score_map").eval()
    with torch.no_grad():
        base = light.scores(x)
        maps = []
        for s in scales:
            h, w = math.floor(40 * s) + 1, math.floor(52 * s) + 1
            xs = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
            maps.append(torch.nn.functional.interpolate(light.scores(xs), size=base.shape[-2:], mode="bilinear",
                                                        align_corners=False))
        expected = torch.nn.functional.interpolate(torch.stack(maps).max(0).values, size=(41, 53), mode="bilinear",
                                                   align_corners=False)
        out = msc(x)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
        assert (out - MSC(model=light, scales=scales).eval()(x)).abs().max() > 1e-3  # the two fusions differ
    train_out = msc.train()(x)
    assert len(train_out.per_scale) == len(scales) and train_out.fused.shape == (2, 3, 41, 53)


def test_msc_fusion_is_checked(light):
    with pytest.raises(ValueError, match="fusion must be 'input' or 'score_map', got 'mean'"):
        MSC(model=light, fusion="mean")
    with pytest.raises(ValueError, match="1.0 must be a scale"):
        MSC(model=light, scales=(0.75, 0.5), fusion="score_map")
    assert get_model("deeplabv2_resnet18_msc", num_classes=3, base_width=8, fusion="score_map").fusion == "score_map"


# --- input dtypes, raw images for preprocess, the joint model's parts -------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("wrap", [False, True], ids=["deeplab", "msc"])
def test_input_dtype_other_than_the_weights_is_named(light, dtype, wrap):
    model = (MSC(model=light) if wrap else light).eval()
    with pytest.raises(TypeError, match=rf"dtype {dtype} does not match the model's weights \(torch.float32\).*"
                                        r"x.float\(\).*model.double\(\)"):
        model(torch.randn(1, 3, 16, 16).to(dtype))


def test_matching_dtypes_and_autocast_are_accepted(light):
    light.eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert light.double()(x.double()).dtype == torch.float64  # model.double() is the other way out
        light.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 (or bfloat16) input, float32 weights
            assert light(x).dtype == torch.bfloat16
            assert MSC(model=light).eval()(x.bfloat16()).shape == (1, 3, 16, 16)
            with pytest.raises(TypeError, match=r"torch.float64 does not match .*does not take float64"):
                light(x.double())  # autocast does not cast float64


@pytest.mark.parametrize("wrap", [False, True], ids=["deeplab", "msc"])
def test_preprocess_refuses_what_is_not_a_raw_rgb_tensor(light, wrap):
    model = MSC(model=light) if wrap else light
    image = np.full((8, 8, 3), 128, np.uint8)
    with pytest.raises(TypeError, match=r"got a numpy array of shape \(8, 8, 3\).*torch.from_numpy\(image\)"
                                        r".permute\(2, 0, 1\).*model.predict"):
        model.preprocess(image)
    with pytest.raises(TypeError, match=r"got a PIL image.*permute\(2, 0, 1\).*model.predict"):
        model.preprocess(Image.fromarray(image))
    with pytest.raises(ValueError, match=r"images has negative values .*not the normalised network input"):
        model.preprocess(torch.full((1, 3, 8, 8), -0.5))
    with pytest.raises(ValueError, match=r"images contains NaN or infinite values"):
        model.preprocess(torch.full((1, 3, 8, 8), float("nan")))
    with pytest.raises(ValueError, match=r"images has values above 255"):
        model.preprocess(torch.full((3, 8, 8), 300.0))


def test_preprocess_warns_for_a_0_1_image(light, caplog):
    with caplog.at_level("WARNING", logger="crfrnn_deeplab.images"):
        light.preprocess(torch.rand(1, 3, 8, 8))
    assert "expected raw RGB in 0-255, not 0-1" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="crfrnn_deeplab.images"):
        light.preprocess(torch.rand(1, 3, 8, 8) * 255)
    assert not caplog.text


def test_crfrnn_names_a_missing_crf(light):
    with pytest.raises(TypeError, match=r"crf must be a CRF layer such as MeanFieldCRF\(num_classes=3\), got NoneType"):
        CRFRNN(network=light, crf=None)
    with pytest.raises(TypeError, match=r"network must have an int attribute `num_classes`"):
        CRFRNN(network=_Convention(), crf=MeanFieldCRF(num_classes=3))


@pytest.mark.parametrize("x, raw, error, match", [
    # a list was a ValueError "... with the shape of x ()"
    ([1], torch.zeros(1, 3, 8, 9), TypeError, r"x must be a Tensor\[B, 3, H, W\], got list"),
    (torch.zeros(1, 3, 8, 9), np.zeros((1, 3, 8, 9)), TypeError, r"raw must be a Tensor\[B, 3, H, W\], got ndarray"),
    (torch.zeros(1, 3, 8, 9), torch.zeros(1, 3, 8, 8), ValueError,
     r"raw must be the raw RGB image with the shape of x \(1, 3, 8, 9\), got \(1, 3, 8, 8\)"),
])
def test_crfrnn_names_what_is_wrong_with_its_inputs(light, x, raw, error, match):
    with pytest.raises(error, match=match):
        CRFRNN(network=light, crf=MeanFieldCRF(num_classes=3))(x, raw)


class _Convention(nn.Module):
    input_convention = TORCHVISION_CONVENTION
