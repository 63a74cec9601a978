"""Atrous ResNet backbones: shapes, Caffe/torchvision layout switches, checkpoint keys, BatchNorm policies."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from crfrnn_deeplab.models.backbone import (
    AtrousResNet,
    BasicBlock,
    resnet18_atrous,
    resnet34_atrous,
    resnet50_atrous,
    resnet101_atrous,
)


def _torchvision_trunk_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A torchvision classifier's state_dict without the classifier (``fc.*``)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}


@pytest.mark.parametrize("builder", [resnet18_atrous, resnet34_atrous])
@pytest.mark.parametrize(("size", "ceil_mode", "expected"), [(321, True, 41), (320, True, 41), (320, False, 40)])
def test_light_backbone_feature_size(builder, size, ceil_mode, expected):
    backbone = builder(base_width=16, ceil_mode=ceil_mode).eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, size, size))
    assert backbone.out_channels == 128 and backbone.output_stride == 8
    assert features.shape == (1, 128, expected, expected)


def test_output_stride_16():
    backbone = resnet18_atrous(base_width=8, output_stride=16).eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 321, 321))
    assert backbone.output_stride == 16
    assert features.shape == (1, 64, 21, 21)
    assert backbone.layer3[0].conv1.stride == (2, 2)
    assert backbone.layer4[0].conv1.dilation == (2, 2) and backbone.layer4[1].conv2.dilation == (2, 2)


def test_resnet101_structure_and_parameter_count():
    backbone = resnet101_atrous()
    assert backbone.out_channels == 2048 and backbone.output_stride == 8
    assert sum(p.numel() for p in backbone.parameters()) == 42_500_160
    assert not hasattr(backbone, "fc") and not hasattr(backbone, "avgpool")
    assert [len(getattr(backbone, f"layer{i}")) for i in range(1, 5)] == [3, 4, 23, 3]


def test_caffe_layout_is_the_default():
    backbone = resnet50_atrous()
    block = backbone.layer2[0]
    assert block.conv1.stride == (2, 2) and block.conv2.stride == (1, 1)
    assert backbone.maxpool.ceil_mode is True
    assert backbone.layer3[0].conv2.dilation == (2, 2) and backbone.layer3[0].conv2.padding == (2, 2)
    assert backbone.layer4[0].conv2.dilation == (4, 4) and backbone.layer4[0].conv2.padding == (4, 4)
    assert backbone.layer3[5].conv2.dilation == (2, 2) and backbone.layer4[2].conv2.dilation == (4, 4)
    # The dilated stages have no stride anywhere; the shortcut of layer2.0 keeps its stride.
    assert all(m.stride == (1, 1) for m in backbone.layer3.modules() if isinstance(m, nn.Conv2d))
    assert backbone.layer2[0].downsample[0].stride == (2, 2)


def test_torchvision_layout_switches():
    backbone = resnet50_atrous(stride_in_1x1=False, ceil_mode=False, dilate_first_block=False)
    block = backbone.layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
    assert backbone.maxpool.ceil_mode is False
    assert backbone.layer3[0].conv2.dilation == (1, 1) and backbone.layer3[1].conv2.dilation == (2, 2)
    assert backbone.layer4[0].conv2.dilation == (2, 2) and backbone.layer4[1].conv2.dilation == (4, 4)
    # With all three switches off the trunk is exactly torchvision's dilated ResNet-50.
    reference = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
    ours = {n: (m.stride, m.padding, m.dilation) for n, m in backbone.named_modules() if isinstance(m, nn.Conv2d)}
    theirs = {n: (m.stride, m.padding, m.dilation) for n, m in reference.named_modules() if isinstance(m, nn.Conv2d)}
    assert ours == theirs


def test_light_dilate_first_block_switch():
    assert resnet18_atrous(base_width=8).layer4[0].conv1.dilation == (4, 4)
    off = resnet18_atrous(base_width=8, dilate_first_block=False)
    assert off.layer3[0].conv1.dilation == (1, 1) and off.layer3[0].conv2.dilation == (2, 2)
    assert off.layer4[0].conv1.dilation == (2, 2) and off.layer4[1].conv1.dilation == (4, 4)


def test_torchvision_resnet50_checkpoint_loads_strictly():
    backbone = resnet50_atrous()
    state = _torchvision_trunk_state_dict(torchvision.models.resnet50(weights=None))
    assert set(backbone.state_dict()) == set(state)
    backbone.load_state_dict(state, strict=True)
    assert torch.equal(backbone.layer1[0].downsample[0].weight, state["layer1.0.downsample.0.weight"])


@pytest.mark.parametrize(("builder", "reference"), [(resnet18_atrous, "resnet18"), (resnet34_atrous, "resnet34")])
def test_torchvision_basic_resnet_checkpoint_loads_strictly(builder, reference):
    backbone = builder()
    state = _torchvision_trunk_state_dict(getattr(torchvision.models, reference)(weights=None))
    backbone.load_state_dict(state, strict=True)


def _sgd_step(backbone: AtrousResNet) -> None:
    backbone.train()
    trainable = [p for p in backbone.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    backbone(torch.randn(2, 3, 40, 40)).square().mean().backward()
    optimizer.step()


def test_frozen_batchnorm_does_not_change_in_a_training_step():
    torch.manual_seed(0)
    backbone = resnet18_atrous(base_width=8, norm="frozen")
    bn_names = [n for n, m in backbone.named_modules() if isinstance(m, nn.BatchNorm2d)]
    batchnorms = [backbone.get_submodule(n) for n in bn_names]
    assert batchnorms and all(type(m) is nn.BatchNorm2d for m in batchnorms)
    with torch.no_grad():  # non-trivial statistics and affine, as after loading a checkpoint
        for m in batchnorms:
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.uniform_(0.5, 1.5)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    _sgd_step(backbone)
    assert backbone.training and not any(m.training for m in batchnorms)
    after = backbone.state_dict()
    for key in (f"{n}.{t}" for n in bn_names for t in ("weight", "bias", "running_mean", "running_var")):
        assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])
    # Frozen affine parameters are still parameters (they count) but not trainable.
    assert all(not m.weight.requires_grad and not m.bias.requires_grad for m in batchnorms)
    assert all(isinstance(m.weight, nn.Parameter) for m in batchnorms)


def test_batch_norm_trains():
    torch.manual_seed(0)
    backbone = resnet18_atrous(base_width=8, norm="batch")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    _sgd_step(backbone)
    after = backbone.state_dict()
    assert backbone.bn1.training
    for key in ("bn1.running_mean", "bn1.running_var", "bn1.weight", "bn1.bias", "layer4.1.bn2.weight"):
        assert not torch.equal(before[key], after[key]), key


def test_sync_batch_norm_keeps_keys():
    backbone = resnet18_atrous(base_width=8, norm="sync")
    assert isinstance(backbone.bn1, nn.SyncBatchNorm) and isinstance(backbone.layer2[0].downsample[1], nn.SyncBatchNorm)
    assert set(backbone.state_dict()) == set(resnet18_atrous(base_width=8, norm="batch").state_dict())
    with torch.no_grad():
        assert backbone.eval()(torch.randn(1, 3, 33, 33)).shape == (1, 64, 5, 5)


def test_basic_block_dilation_keeps_size():
    block = BasicBlock(8, 8, dilation=4).eval()
    assert block(torch.randn(1, 8, 9, 9)).shape == (1, 8, 9, 9)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"output_stride": 32}, ValueError, r"output_stride must be one of \(8, 16\), got 32"),
        ({"norm": "group"}, ValueError, r"norm must be one of .*'frozen'.*got 'group'"),
        ({"base_width": 0}, ValueError, r"base_width must be a positive int, got 0"),
    ],
)
def test_bad_backbone_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        resnet18_atrous(**kwargs)


def test_bad_bottleneck_options():
    with pytest.raises(ValueError, match=r"output_stride must be one of \(8, 16\), got 4"):
        resnet50_atrous(output_stride=4)
    with pytest.raises(ValueError, match=r"norm must be one of .* got 'none'"):
        resnet50_atrous(norm="none")
