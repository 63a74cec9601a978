"""Checkpoint conversion: every layout loads exactly (our model reproduces the original network), and every key
of the checkpoint and of the model is accounted for.

The Caffe-port references are assembled here from plain torch modules, keyed exactly like the ports:
kazuto1011/deeplab-pytorch (``libs/models/resnet.py``, ``deeplabv2.py``, ``deeplabv1.py``, ``msc.py``) and
isht7/pytorch-deeplab-resnet (``deeplab_resnet.py``). The layout logic is depth-generic, so the forward checks use
the ResNet-50 depth (3, 4, 6, 3); one test loads the full ResNet-101 key set.
"""

import subprocess
import sys

import pytest
import torch
import torchvision
from torch import nn

from crfrnn_deeplab import CAFFE_CONVENTION, CRFRNN, MSC, TORCHVISION_CONVENTION, DeepLabV2, MeanFieldCRF, get_model
from crfrnn_deeplab.weights.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from crfrnn_deeplab.weights.convert import (
    ConversionError,
    LoadReport,
    convert_state_dict,
    detect_layout,
    load_into,
    main,
    model_for_checkpoint,
    strip_prefixes,
)

R50 = (3, 4, 6, 3)
R101 = (3, 4, 23, 3)
TORCHVISION_BLOCKS = {"stride_in_1x1": False, "ceil_mode": False, "dilate_first_block": False}

# --- kazuto1011/deeplab-pytorch: _ConvBnReLU, _Bottleneck, _ResLayer, _Stem, DeepLabV2 / DeepLabV1, MSC


class ConvBnReLU(nn.Sequential):
    def __init__(self, cin, cout, k, stride, pad, dil, relu=True):
        super().__init__()
        self.add_module("conv", nn.Conv2d(cin, cout, k, stride, pad, dil, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout, eps=1e-5))
        if relu:
            self.add_module("relu", nn.ReLU())


class KazutoBottleneck(nn.Module):
    def __init__(self, cin, cout, stride, dilation, downsample):
        super().__init__()
        mid = cout // 4
        self.reduce = ConvBnReLU(cin, mid, 1, stride, 0, 1)  # the stride is in the 1×1
        self.conv3x3 = ConvBnReLU(mid, mid, 3, 1, dilation, dilation)
        self.increase = ConvBnReLU(mid, cout, 1, 1, 0, 1, relu=False)
        self.shortcut = ConvBnReLU(cin, cout, 1, stride, 0, 1, relu=False) if downsample else nn.Identity()

    def forward(self, x):
        return torch.relu(self.increase(self.conv3x3(self.reduce(x))) + self.shortcut(x))


def kazuto_trunk(n_blocks):
    """``layer1`` (stem) ... ``layer5`` as in kazuto1011's DeepLabV2: every block of a stage at its dilation."""
    stem = nn.Sequential()
    stem.add_module("conv1", ConvBnReLU(3, 64, 7, 2, 3, 1))
    stem.add_module("pool", nn.MaxPool2d(3, 2, 1, ceil_mode=True))
    layers = [("layer1", stem)]
    plan = [(64, 256, 1, 1), (256, 512, 2, 1), (512, 1024, 1, 2), (1024, 2048, 1, 4)]
    for i, (n, (cin, cout, stride, dilation)) in enumerate(zip(n_blocks, plan)):
        stage = nn.Sequential()
        for b in range(n):
            stage.add_module(
                f"block{b + 1}",
                KazutoBottleneck(cin if b == 0 else cout, cout, stride if b == 0 else 1, dilation, b == 0),
            )
        layers.append((f"layer{i + 2}", stage))
    return layers


class KazutoASPP(nn.Module):
    def __init__(self, num_classes, rates=(6, 12, 18, 24)):
        super().__init__()
        for i, r in enumerate(rates):
            self.add_module(f"c{i}", nn.Conv2d(2048, num_classes, 3, 1, r, r, bias=True))

    def forward(self, x):
        return sum(conv(x) for conv in self.children())


class KazutoDeepLabV2(nn.Sequential):
    def __init__(self, n_blocks, num_classes):
        super().__init__()
        for name, module in kazuto_trunk(n_blocks):
            self.add_module(name, module)
        self.add_module("aspp", KazutoASPP(num_classes))


class KazutoDeepLabV1(nn.Sequential):
    """The container of the COCO-pretrained init: the same trunk and a 1×1 ``fc`` classifier."""

    def __init__(self, n_blocks, num_classes):
        super().__init__()
        for name, module in kazuto_trunk(n_blocks):
            self.add_module(name, module)
        self.add_module("fc", nn.Conv2d(2048, num_classes, 1))


class KazutoMSC(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.base = base


# --- isht7/pytorch-deeplab-resnet: Bottleneck, Classifier_Module, ResNet, MS_Deeplab


class IshtBottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


class IshtClassifier(nn.Module):
    def __init__(self, rates, num_classes):
        super().__init__()
        self.conv2d_list = nn.ModuleList(nn.Conv2d(2048, num_classes, 3, 1, r, r, bias=True) for r in rates)

    def forward(self, x):
        out = self.conv2d_list[0](x)
        for conv in self.conv2d_list[1:]:
            out = out + conv(x)
        return out


class IshtResNet(nn.Module):
    def __init__(self, layers, num_classes):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], dilation=2)
        self.layer4 = self._make_layer(512, layers[3], dilation=4)
        self.layer5 = IshtClassifier((6, 12, 18, 24), num_classes)

    def _make_layer(self, planes, blocks, stride=1, dilation=1):
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4)
        )
        layers = [IshtBottleneck(self.inplanes, planes, stride, dilation, downsample)]
        self.inplanes = planes * 4
        layers += [IshtBottleneck(self.inplanes, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4, self.layer5):
            x = layer(x)
        return x


class IshtMSDeeplab(nn.Module):
    def __init__(self, layers, num_classes):
        super().__init__()
        self.Scale = IshtResNet(layers, num_classes)


# --- helpers


def randomise_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights *and* BatchNorm statistics (so that any wrong mapping shows in the outputs), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (1.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.num_batches_tracked.fill_(7)
    return module.eval()


def assert_same(actual, expected):
    """Equal up to float32 summation order (relative to the output's scale)."""
    assert actual.shape == expected.shape
    scale = expected.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def scores(model, x):
    """Stride-8 class scores of the bare DeepLabV2 inside ``model``."""
    net = model.model if isinstance(model, MSC) else model
    with torch.no_grad():
        return net.eval().scores(x)


def features(model, x):
    net = model.model if isinstance(model, MSC) else model
    with torch.no_grad():
        return net.eval().backbone(x)


X = torch.randn(1, 3, 65, 57, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def kazuto():
    """A random kazuto1011 DeepLab v2 (ResNet-50 depth, 5 classes), its MSC state dict and its output on X."""
    ref = randomise_(KazutoDeepLabV2(R50, num_classes=5))
    with torch.no_grad():
        y = ref(X)
    return ref, KazutoMSC(ref).state_dict(), y


@pytest.fixture(scope="module")
def kazuto_model(kazuto):
    """Our model loaded from the kazuto1011 checkpoint (shared by the tests that only read it)."""
    return model_for_checkpoint(kazuto[1])


def trunk(ref, x):
    with torch.no_grad():
        for name in ("layer1", "layer2", "layer3", "layer4", "layer5"):
            x = getattr(ref, name)(x)
    return x


# --- caffe_deeplabv2 (kazuto1011)


def test_caffe_layout_reproduces_the_port(kazuto, kazuto_model):
    ref, sd, y = kazuto
    assert next(iter(sd)) == "base.layer1.conv1.conv.weight" and "base.aspp.c3.bias" in sd
    assert detect_layout(sd) == "caffe_deeplabv2"
    model, report = kazuto_model
    assert isinstance(model, MSC)  # saved from kazuto1011's MSC wrapper (base.): the model is multi-scale too
    assert_same(scores(model, X), y)
    assert report.layout == "caffe_deeplabv2" and report.removed_prefix == "base."
    assert not report.unexpected and not report.missing and not report.mismatched
    assert set(report.used) == set(model.state_dict())  # every tensor, BatchNorm counters included
    used = report.used
    assert used["model.backbone.layer1.0.downsample.1.running_var"] == "base.layer2.block1.shortcut.bn.running_var"
    assert used["model.head.branches.2.weight"] == "base.aspp.c2.weight"


def test_caffe_conventions_travel_with_the_weights(kazuto_model):
    model, report = kazuto_model
    assert model.input_convention == CAFFE_CONVENTION == report.input_convention
    backbone = model.model.backbone
    assert backbone.maxpool.ceil_mode and backbone.layer2[0].conv1.stride == (2, 2)  # stride in the 1×1
    assert backbone.layer3[0].conv2.dilation == (2, 2) and backbone.layer4[0].conv2.dilation == (4, 4)
    raw = torch.tensor([10.0, 20.0, 30.0]).view(1, 3, 1, 1).expand(1, 3, 16, 16)  # RGB 0-255
    x = model.preprocess(raw)
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([30 - 104.008, 20 - 116.669, 10 - 122.675]))  # BGR


@pytest.mark.parametrize("wrap", ["", "module.", "module.base.", "scale.", "_orig_mod."])
def test_wrappers_and_older_names_map_identically(kazuto, wrap):
    ref, _, _ = kazuto
    expected = convert_state_dict({"base." + k: v for k, v in ref.state_dict().items()}).state_dict
    wrapped = {wrap + k: v for k, v in ref.state_dict().items()}
    older = {  # kazuto1011's 2018 names: the projection "proj", the ASPP under "stages"
        wrap + k.replace(".shortcut.", ".proj.").replace("aspp.", "aspp.stages."): v
        for k, v in ref.state_dict().items()
    }
    for sd in (wrapped, older):
        converted = convert_state_dict(sd)
        assert converted.layout == "caffe_deeplabv2" and converted.removed_prefix == wrap
        assert not converted.unknown and not converted.dropped
        assert converted.state_dict.keys() == expected.keys()
        assert all(torch.equal(converted.state_dict[k], expected[k]) for k in expected)


def test_caffe_coco_init_drops_fc_by_name(kazuto):
    ref, _, _ = kazuto
    v1 = KazutoDeepLabV1(R50, num_classes=91)
    sd = {**{k: v for k, v in ref.state_dict().items() if not k.startswith("aspp.")}, **v1.fc.state_dict(prefix="fc.")}
    assert sd.keys() == v1.state_dict().keys()
    with pytest.raises(ConversionError, match="pass num_classes"):
        model_for_checkpoint(sd)
    model, report = model_for_checkpoint(sd, num_classes=21)
    assert isinstance(model, DeepLabV2)  # not saved from an MSC wrapper
    assert report.unexpected == {
        "fc.weight": "DeepLab v1 classifier of the COCO initialisation, not DeepLab v2's",
        "fc.bias": "DeepLab v1 classifier of the COCO initialisation, not DeepLab v2's",
    }
    head = {k for k in model.state_dict() if k.startswith("head.")}
    assert set(report.missing) == head and all("no DeepLab v2 classifier" in r for r in report.missing.values())
    assert not report.mismatched and model.input_convention == CAFFE_CONVENTION
    assert_same(features(model, X), trunk(ref, X))


# --- scale_ports (isht7)


def test_scale_ports_layout_reproduces_the_port():
    ref = IshtMSDeeplab(R50, num_classes=4)
    randomise_(ref)
    with torch.no_grad():
        y = ref.Scale(X)
    sd = ref.state_dict()
    assert "Scale.layer1.0.downsample.1.running_mean" in sd and "Scale.layer5.conv2d_list.3.weight" in sd
    assert detect_layout(sd) == "scale_ports"
    old = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}  # saved by PyTorch < 0.4.1
    model, report = model_for_checkpoint(old)
    assert isinstance(model, MSC) and model.input_convention == CAFFE_CONVENTION
    assert_same(scores(model, X), y)
    counters = {k for k in model.state_dict() if k.endswith("num_batches_tracked")}
    assert set(report.missing) == counters and not report.unexpected
    assert all(k.endswith("num_batches_tracked") for k in report.initialised)
    assert report.used["model.head.branches.3.weight"] == "Scale.layer5.conv2d_list.3.weight"


# --- torchvision_resnet, torchvision_deeplabv3


@pytest.mark.parametrize("arch", ["resnet50", "resnet18"])
def test_torchvision_resnet_reproduces_torchvision(arch):
    if arch == "resnet50":  # torchvision's own dilated ResNet (its BasicBlock refuses dilation)
        tv = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
    else:
        tv = torchvision.models.resnet18(weights=None)
    randomise_(tv)
    model, report = model_for_checkpoint(tv.state_dict(), num_classes=3)
    assert isinstance(model, DeepLabV2) and model.input_convention == TORCHVISION_CONVENTION
    assert report.unexpected == {"fc.weight": "ImageNet classifier", "fc.bias": "ImageNet classifier"}
    assert set(report.missing) == {k for k in model.state_dict() if k.startswith("head.")}
    assert len(report.used) == len(tv.state_dict()) - 2
    backbone = model.backbone
    assert not backbone.maxpool.ceil_mode
    trunk_tv = nn.Sequential(*list(tv.children())[:-2])
    if arch == "resnet50":
        assert backbone.layer2[0].conv1.stride == (1, 1) and backbone.layer2[0].conv2.stride == (2, 2)
        with torch.no_grad():
            assert_same(features(model, X), trunk_tv(X))
    else:  # undilated torchvision ResNet-18: compare the stages before the first dilated one
        stem = nn.Sequential(*list(tv.children())[:6])  # conv1 bn1 relu maxpool layer1 layer2
        ours = nn.Sequential(*list(backbone.children())[:6]).eval()
        with torch.no_grad():
            assert_same(ours(X), stem(X))
        assert backbone.layer4[0].conv1.dilation == (2, 2) and backbone.layer4[1].conv1.dilation == (4, 4)


def test_torchvision_deeplabv3_backbone_reproduces_torchvision():
    from torchvision.models.segmentation import deeplabv3_resnet50

    tv = randomise_(deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=True))
    sd = tv.state_dict()
    assert detect_layout(sd) == "torchvision_deeplabv3"
    model, report = model_for_checkpoint(sd, num_classes=21)
    with torch.no_grad():
        assert_same(features(model, X), tv.backbone(X)["out"])
    assert set(report.unexpected) == {k for k in sd if k.startswith(("classifier.", "aux_classifier."))}
    assert all("not DeepLab v2's" in r for r in report.unexpected.values())
    assert set(report.used.values()) == {k for k in sd if k.startswith("backbone.")}
    assert model.input_convention == TORCHVISION_CONVENTION


def test_torchvision_resnet101_key_set_loads_completely():
    tv = torchvision.models.resnet101(weights=None)
    model = get_model("deeplabv2_resnet101", num_classes=2, **TORCHVISION_BLOCKS)
    report = load_into(model, tv.state_dict())
    assert set(report.used.values()) == set(tv.state_dict()) - {"fc.weight", "fc.bias"}
    assert model.input_convention == TORCHVISION_CONVENTION and "input convention changed" in report.notes[0]


# --- the full ResNet-101 key set of the Caffe port (no forward)


def test_full_resnet101_caffe_key_set_loads():
    with torch.device("meta"):
        shapes = KazutoMSC(KazutoDeepLabV2(R101, num_classes=21)).state_dict()
    sd = {k: torch.full(v.shape, 0.5, dtype=v.dtype) for k, v in shapes.items()}
    model, report = model_for_checkpoint(sd, msc=False)
    assert isinstance(model, DeepLabV2) and sum(p.numel() for p in model.parameters()) == 44_048_532
    assert len(sd) == len(model.state_dict()) == len(report.used)
    assert set(report.used.values()) == set(sd) and not report.unexpected and not report.missing
    assert torch.equal(model.head.branches[3].bias, sd["base.aspp.c3.bias"])


# --- architecture and convention checks


def test_block_layout_mismatch_is_refused(kazuto):
    _, sd, _ = kazuto
    torchvision_layout = get_model("deeplabv2_resnet50", num_classes=5, **TORCHVISION_BLOCKS)
    before = {k: v.clone() for k, v in torchvision_layout.state_dict().items()}
    with pytest.raises(ConversionError, match="stride_in_1x1=True, ceil_mode=True, dilate_first_block=True"):
        load_into(torchvision_layout, sd)
    assert all(torch.equal(v, torchvision_layout.state_dict()[k]) for k, v in before.items())  # untouched
    with pytest.raises(ConversionError, match=r"dilate_first_block=False \(or use model_for_checkpoint\)"):
        load_into(get_model("deeplabv2_resnet50", num_classes=5, stride_in_1x1=False, ceil_mode=False),
                  torchvision.models.resnet50(weights=None).state_dict())
    with pytest.raises(ConversionError, match="ResNet-50, the model ResNet-101 \\(build deeplabv2_resnet50"):
        load_into(get_model("deeplabv2_resnet101", num_classes=5), sd)
    with pytest.raises(ConversionError, match=r"ASPP rates \(6, 12, 18, 24\).*head='aspp_l'"):
        load_into(get_model("deeplabv2_resnet50", num_classes=5, head="aspp_s"), sd)
    report = load_into(get_model("deeplabv2_resnet50", num_classes=5, output_stride=16), sd)  # allowed, noted
    assert report.notes == ["weights trained at output stride 8 run at output stride 16"]


def test_our_checkpoint_records_its_layout(tmp_path):
    net = get_model("deeplabv2_resnet18", num_classes=3, base_width=8, ceil_mode=False)
    config = {"name": "deeplabv2_resnet18", "num_classes": 3, "options": {"base_width": 8, "ceil_mode": False}}
    ckpt = {"format": "crfrnn_deeplab/1", "model": net.state_dict(), "input_convention": CAFFE_CONVENTION.to_dict(),
            "model_config": config}
    with pytest.raises(ConversionError, match="recorded block layout; build the model with ceil_mode=False"):
        load_into(get_model("deeplabv2_resnet18", num_classes=3, base_width=8), ckpt)
    model, report = model_for_checkpoint(ckpt)
    assert not model.backbone.maxpool.ceil_mode and model.input_convention == CAFFE_CONVENTION
    assert set(report.used) == set(net.state_dict())
    with pytest.raises(ConversionError, match="records no model_config"):
        model_for_checkpoint(net.state_dict())
    report = load_into(get_model("deeplabv2_resnet18", num_classes=3, base_width=8, ceil_mode=False), net.state_dict())
    assert report.notes == ["the checkpoint records no input convention; the model keeps its own"]


# --- strictness: unused, missing and mismatched keys, reported exactly


@pytest.fixture(scope="module")
def small():
    """A light network of ours (ResNet-18 at width 8) and its state dict: fast, and our layout is depth-generic."""
    torch.manual_seed(0)
    net = randomise_(get_model("deeplabv2_resnet18", num_classes=3, base_width=8))
    return net, net.state_dict()


def build_small(num_classes=3):
    return get_model("deeplabv2_resnet18", num_classes=num_classes, base_width=8)


def test_unknown_missing_and_mismatched_keys_are_named(small):
    _, sd = small
    extra = {**sd, "backbone.layer2.0.extra.weight": torch.zeros(1), "aux.weight": torch.zeros(1)}
    with pytest.raises(ConversionError, match=r"2 checkpoint key\(s\) have no place in the model: "
                                              r"\['backbone.layer2.0.extra.weight', 'aux.weight'\]"):
        load_into(build_small(), extra)
    missing = {k: v for k, v in sd.items() if k != "backbone.layer3.1.conv2.weight"}
    with pytest.raises(ConversionError, match=r"1 model key\(s\) missing from the checkpoint: "
                                              r"\['backbone.layer3.1.conv2.weight'\]"):
        load_into(build_small(), missing)
    bad = {**sd, "backbone.layer1.0.conv1.weight": torch.zeros(8, 8, 1, 1)}
    with pytest.raises(ConversionError, match=r"shape mismatch: backbone.layer1.0.conv1.weight: "
                                              r"checkpoint \(8, 8, 1, 1\) vs model \(8, 8, 3, 3\)"):
        load_into(build_small(), bad)

    model = build_small()
    kept = model.state_dict()["backbone.layer3.1.conv2.weight"].clone()
    report = load_into(model, {**missing, "aux.weight": torch.zeros(1),
                               "backbone.layer1.0.conv1.weight": torch.zeros(8, 8, 1, 1)}, strict=False)
    assert report.unexpected == {"aux.weight": "no place in the model (strict=False)"}
    assert report.missing == {"backbone.layer3.1.conv2.weight": "missing from the checkpoint (strict=False)"}
    assert report.mismatched == {
        "backbone.layer1.0.conv1.weight": ("backbone.layer1.0.conv1.weight", (8, 8, 1, 1), (8, 8, 3, 3), False)
    }
    assert torch.equal(model.state_dict()["backbone.layer3.1.conv2.weight"], kept)
    assert len(report.used) == len(sd) - 2


def test_wrong_class_count_reinitialises_only_the_classifier(small):
    net, sd = small
    model = build_small(num_classes=7)
    head_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("head.")}
    report = load_into(model, sd)
    assert report.reinitialised_classifier and report.checkpoint_classes == 3
    assert set(report.mismatched) == set(head_before) and all(m.classes for m in report.mismatched.values())
    assert report.mismatched["head.branches.0.weight"].checkpoint_shape == (3, 64, 3, 3)
    assert set(report.initialised) == set(head_before) and not report.missing and not report.unexpected
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, head_before[k] if k.startswith("head.") else sd[k], rtol=0, atol=0)
    assert "different number of classes (3 in the checkpoint): re-initialised" in str(report)


# --- our own checkpoints, with and without the CRF


def test_our_checkpoints_with_and_without_crf(small, tmp_path):
    net, sd = small
    joint = CRFRNN(network=MSC(model=build_small()), crf=MeanFieldCRF(num_classes=3))
    crf_before = {k: v.clone() for k, v in joint.crf.state_dict().items()}
    report = load_into(joint, {"format": "crfrnn_deeplab/1", "model": sd})
    assert report.missing == {f"crf.{k}": "network-only checkpoint: the CRF keeps its initial values"
                              for k in crf_before}
    assert all(torch.equal(v, joint.state_dict()["network.model." + k]) for k, v in sd.items())
    assert all(torch.equal(v, joint.crf.state_dict()[k]) for k, v in crf_before.items())

    with torch.no_grad():
        joint.crf.compatibility.add_(0.25)
    path = save_checkpoint(tmp_path / "joint.pt", {"model": joint.state_dict()})
    other = CRFRNN(network=MSC(model=build_small()), crf=MeanFieldCRF(num_classes=3))
    report = load_into(other, path)
    assert set(report.used) == set(other.state_dict()) and report.source == str(path)
    torch.testing.assert_close(other.crf.compatibility, joint.crf.compatibility)

    plain = build_small()
    report = load_into(plain, path)  # a joint checkpoint initialises a network; the CRF is reported unused
    assert report.unexpected == {f"crf.{k}": "CRF parameters; the model has no CRF layer" for k in crf_before}
    assert report.removed_prefix == "" and set(report.used) == set(plain.state_dict())
    assert report.used["head.branches.0.bias"] == "network.model.head.branches.0.bias"

    bigger = CRFRNN(network=build_small(num_classes=5), crf=MeanFieldCRF(num_classes=5))
    report = load_into(bigger, path)  # the class-indexed CRF matrices go with the classifier; bandwidths load
    assert {k for k in report.mismatched if k.startswith("crf.")} == {
        "crf.spatial_weight", "crf.bilateral_weight", "crf.compatibility"
    }
    assert "crf.log_theta_alpha" in report.used


def test_model_for_our_joint_checkpoint(small, tmp_path):
    _, sd = small
    crf_options = {"spatial_weight": 2.0, "theta_alpha": 50.0, "train_iterations": 2}
    joint = CRFRNN(network=MSC(model=build_small()), crf=MeanFieldCRF(num_classes=3, **crf_options))
    joint.network.model.load_state_dict(sd)
    path = save_checkpoint(tmp_path / "final.pt", {
        "model": joint.state_dict(), "input_convention": CAFFE_CONVENTION.to_dict(),
        "model_config": {"name": "deeplabv2_resnet18_msc", "num_classes": 3, "options": {"base_width": 8},
                         "crf": crf_options},
    })
    model, report = model_for_checkpoint(path)
    assert isinstance(model, CRFRNN) and isinstance(model.network, MSC) and model.crf.train_iterations == 2
    assert set(report.used) == set(model.state_dict()) and model.input_convention == CAFFE_CONVENTION
    torch.testing.assert_close(model.crf.spatial_weight, joint.crf.spatial_weight)
    single, report = model_for_checkpoint(path, msc=False, num_classes=4)  # other wrapper, other classes
    assert isinstance(single.network, DeepLabV2) and single.num_classes == 4 and report.reinitialised_classifier
    assert torch.equal(single.network.backbone.conv1.weight, sd["backbone.conv1.weight"])


def test_load_into_wrapped_models(small):
    _, sd = small
    wrapped = nn.DataParallel(build_small())
    report = load_into(wrapped, {"module." + k: v for k, v in sd.items()})
    assert report.removed_prefix == "module."
    assert torch.equal(wrapped.module.head.branches[0].bias, sd["head.branches.0.bias"])


def test_strip_prefixes():
    t = torch.zeros(1)
    sd, removed = strip_prefixes({"module._orig_mod.base.a": t, "module._orig_mod.base.b.c": t})
    assert removed == "module._orig_mod.base." and list(sd) == ["a", "b.c"]
    sd, removed = strip_prefixes({"network._orig_mod.model.a": t, "crf.b": t})  # a compiled submodule
    assert removed == "" and list(sd) == ["network.model.a", "crf.b"]
    sd, removed = strip_prefixes({"Scale.conv1.weight": t, "Scale.layer5.conv2d_list.0.bias": t})
    assert removed == "Scale." and list(sd) == ["conv1.weight", "layer5.conv2d_list.0.bias"]
    sd, removed = strip_prefixes({"backbone.x": t, "head.y": t})
    assert removed == "" and list(sd) == ["backbone.x", "head.y"]


# --- files: bad ones give clear errors; the CLI round-trips


def test_bad_files(tmp_path, small):
    _, sd = small
    model = build_small()
    good = save_checkpoint(tmp_path / "good.pt", {"model": sd})
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pt is not a readable PyTorch checkpoint"):
        load_into(model, tmp_path / "truncated.pt")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.txt is not a readable PyTorch checkpoint.* starts with b'not '"):
        load_into(model, tmp_path / "notes.txt")
    torch.save({"model": nn.Linear(2, 2)}, tmp_path / "pickled.pt")  # a whole module: needs pickle execution
    with pytest.raises(CheckpointError, match=r"pickled.pt cannot be loaded with weights_only=True: .*"
                                              r"\(it pickles torch.nn.modules.linear.Linear\)"):
        load_into(model, tmp_path / "pickled.pt")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "no_weights.pt")
    with pytest.raises(CheckpointError, match=r"not a checkpoint: .* top-level keys are \['epoch', 'lr'\]"):
        load_into(model, tmp_path / "no_weights.pt")
    with pytest.raises(FileNotFoundError):
        load_into(model, tmp_path / "absent.pt")
    with pytest.raises(ConversionError, match="unknown checkpoint layout"):
        load_into(model, {"something.else": torch.zeros(1)})
    with pytest.raises(ConversionError, match="nothing matched: is 'caffe_deeplabv2' the right layout"):
        load_into(model, sd, layout="caffe_deeplabv2")


def test_convert_cli_round_trip(kazuto, kazuto_model, tmp_path, capsys):
    _, sd, y = kazuto
    src, dst = tmp_path / "deeplabv2_resnet50_msc-kazuto.pth", tmp_path / "ours.pt"
    torch.save(sd, src)
    assert main([str(src), str(dst)]) == 0
    out = capsys.readouterr().out
    assert "caffe_deeplabv2 checkpoint" in out and "prefix 'base.' removed" in out and f"wrote {dst}" in out

    ckpt = load_checkpoint(dst)
    assert ckpt["model_config"] == {
        "name": "deeplabv2_resnet50_msc", "num_classes": 5, "crf": None,
        "options": {"stride_in_1x1": True, "ceil_mode": True, "dilate_first_block": True, "head": "aspp_l"},
    }
    assert ckpt["input_convention"] == CAFFE_CONVENTION.to_dict()
    assert ckpt["source"]["layout"] == "caffe_deeplabv2" and ckpt["source"]["path"] == str(src)
    assert len(ckpt["source"]["sha256"]) == 64 and ckpt["source"]["unused"] == {}

    model, report = model_for_checkpoint(dst)
    assert report.layout == "crfrnn_deeplab" and not report.unexpected and not report.missing
    assert isinstance(model, MSC) and model.input_convention == CAFFE_CONVENTION
    direct, _ = kazuto_model
    assert model.state_dict().keys() == direct.state_dict().keys()
    assert all(torch.equal(v, direct.state_dict()[k]) for k, v in model.state_dict().items())
    reloaded = scores(model, X)
    assert torch.equal(reloaded, scores(direct, X))  # identical outputs
    assert_same(reloaded, y)

    assert main([str(src), str(src)]) == 2 and "must differ" in capsys.readouterr().err
    assert main([str(tmp_path / "absent.pth"), str(dst)]) == 2
    assert "error:" in capsys.readouterr().err


def test_convert_cli_runs_as_a_module(tmp_path):
    tv = torchvision.models.resnet18(weights=None)
    torch.save({"state_dict": tv.state_dict(), "epoch": 90}, tmp_path / "resnet18.pth")
    cmd = [sys.executable, "-m", "crfrnn_deeplab.weights.convert", str(tmp_path / "resnet18.pth"), str(tmp_path / "out.pt"),
           "--num-classes", "4"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "torchvision_resnet checkpoint" in run.stdout and "ImageNet classifier: fc.weight, fc.bias" in run.stdout
    model, report = model_for_checkpoint(tmp_path / "out.pt")
    assert model.num_classes == 4 and model.input_convention == TORCHVISION_CONVENTION
    loaded = model.backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in tv.state_dict().items() if not k.startswith("fc."))
    ckpt = load_checkpoint(tmp_path / "out.pt")
    assert ckpt["source"]["unused"] == {"fc.weight": "ImageNet classifier", "fc.bias": "ImageNet classifier"}
    assert ckpt["model_config"]["options"] == {"ceil_mode": False, "dilate_first_block": False, "base_width": 64}


def test_report_reads_well(kazuto_model):
    _, report = kazuto_model
    assert isinstance(report, LoadReport)
    text = str(report)
    assert text.splitlines()[0] == (
        "caffe_deeplabv2 checkpoint <in-memory checkpoint>, prefix 'base.' removed: 326 of 326 model tensors loaded"
    )
    assert "input convention: BGR, 0–255, mean (104.008, 116.669, 122.675), no std" in text


def test_network_name_reads_the_architecture_through_wrappers():
    from crfrnn_deeplab.weights.convert import network_name

    assert network_name(get_model("deeplabv2_resnet34", num_classes=3, base_width=8)) == "deeplabv2_resnet34"
    msc = get_model("deeplabv2_resnet50_msc", num_classes=3)
    assert network_name(CRFRNN(network=msc, crf=MeanFieldCRF(num_classes=3))) == "deeplabv2_resnet50"
    with pytest.raises(TypeError, match="DeepLabV2, MSC or CRFRNN model, got Conv2d"):
        network_name(nn.Conv2d(3, 3, 1))
