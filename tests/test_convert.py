"""Checkpoint conversion: each external layout loads exactly (same outputs as the original network)."""

import pytest
import torch
import torchvision
from torch import nn

from crfrnn_deeplab import CAFFE_CONVENTION, CRFRNN, TORCHVISION_CONVENTION, MeanFieldCRF, get_model
from crfrnn_deeplab.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from crfrnn_deeplab.convert import (
    ConversionError,
    detect_layout,
    load_into,
    main,
    model_for_checkpoint,
    strip_prefixes,
)

# --- a plain-module reference of the Caffe-converted DeepLab v2 (kazuto1011/deeplab-pytorch's structure)


class ConvBnReLU(nn.Sequential):
    def __init__(self, cin, cout, k, stride, pad, dil, relu):
        super().__init__()
        self.add_module("conv", nn.Conv2d(cin, cout, k, stride, pad, dil, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))
        if relu:
            self.add_module("relu", nn.ReLU())


class CaffeBottleneck(nn.Module):
    def __init__(self, cin, cout, stride, dil, downsample):
        super().__init__()
        mid = cout // 4
        self.reduce = ConvBnReLU(cin, mid, 1, stride, 0, 1, True)  # Caffe: the stride is in the 1×1
        self.conv3x3 = ConvBnReLU(mid, mid, 3, 1, dil, dil, True)
        self.increase = ConvBnReLU(mid, cout, 1, 1, 0, 1, False)
        self.shortcut = ConvBnReLU(cin, cout, 1, stride, 0, 1, False) if downsample else nn.Identity()

    def forward(self, x):
        return torch.relu(self.increase(self.conv3x3(self.reduce(x))) + self.shortcut(x))


class CaffeDeepLabV2(nn.Sequential):
    """Stride-8 class scores, keys ``layer1.conv1.{conv,bn}``, ``layerN.blockM.*``, ``aspp.c{i}``."""

    def __init__(self, n_blocks, num_classes, rates=(6, 12, 18, 24)):
        super().__init__()
        stem = nn.Sequential()
        stem.add_module("conv1", ConvBnReLU(3, 64, 7, 2, 3, 1, True))
        stem.add_module("pool", nn.MaxPool2d(3, 2, 1, ceil_mode=True))
        self.add_module("layer1", stem)
        plan = [(64, 256, 1, 1), (256, 512, 2, 1), (512, 1024, 1, 2), (1024, 2048, 1, 4)]
        for i, (n, (cin, cout, stride, dil)) in enumerate(zip(n_blocks, plan)):
            layer = nn.Sequential()
            for b in range(n):
                first = b == 0
                layer.add_module(
                    f"block{b + 1}",
                    CaffeBottleneck(cin if first else cout, cout, stride if first else 1, dil, first),
                )
            self.add_module(f"layer{i + 2}", layer)
        aspp = nn.Module()
        for i, r in enumerate(rates):
            aspp.add_module(f"c{i}", nn.Conv2d(2048, num_classes, 3, 1, r, r, bias=True))
        self.add_module("aspp", aspp)

    def forward(self, x):
        for name in ("layer1", "layer2", "layer3", "layer4", "layer5"):
            x = getattr(self, name)(x)
        return sum(conv(x) for conv in self.aspp.children())


def randomise_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights *and* BatchNorm statistics, so that a wrong mapping shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                else:
                    t.copy_(torch.randn(t.shape, generator=g) * (0.05 if t.dim() > 1 else 0.2))
    return module.eval()


def caffe_to_scale(sd):
    """The same weights under the older ports' ``Scale.`` torchvision-style names."""
    part = {"reduce": ("conv1", "bn1"), "conv3x3": ("conv2", "bn2"), "increase": ("conv3", "bn3")}
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        if p[0] == "layer1":
            new = f"{'conv1' if p[2] == 'conv' else 'bn1'}.{p[3]}"
        elif p[0] == "aspp":
            new = f"layer5.conv2d_list.{p[1][1:]}.{p[2]}"
        else:
            stage, block = int(p[0][5:]) - 1, int(p[1][5:]) - 1
            if p[2] == "shortcut":
                new = f"layer{stage}.{block}.downsample.{0 if p[3] == 'conv' else 1}.{p[4]}"
            else:
                new = f"layer{stage}.{block}.{part[p[2]][0 if p[3] == 'conv' else 1]}.{p[4]}"
        out["Scale." + new] = v
    return out


@pytest.fixture(scope="module")
def caffe_reference():
    ref = randomise_(CaffeDeepLabV2((3, 4, 6, 3), num_classes=5))
    x = torch.randn(1, 3, 65, 57, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = ref(x)
    return ref, x, y


def trunk(ref, x):
    for name in ("layer1", "layer2", "layer3", "layer4", "layer5"):
        x = getattr(ref, name)(x)
    return x


def scores(model, x):
    with torch.no_grad():
        return model.eval().scores(x)


@pytest.mark.parametrize("wrap", ["", "base.", "module.base."])
def test_caffe_layout_loads_exactly(caffe_reference, wrap):
    ref, x, y = caffe_reference
    sd = {wrap + k: v for k, v in ref.state_dict().items()}
    assert detect_layout(sd) == "caffe_deeplabv2"
    model, report = model_for_checkpoint(sd)
    torch.testing.assert_close(scores(model, x), y, rtol=1e-4, atol=1e-4)
    assert report.input_convention == CAFFE_CONVENTION and model.input_convention == CAFFE_CONVENTION
    assert not report.dropped


def test_caffe_layout_older_names(caffe_reference):
    ref, x, y = caffe_reference
    old = {k.replace(".shortcut.", ".proj.").replace("aspp.", "aspp.stages."): v for k, v in ref.state_dict().items()}
    model, _ = model_for_checkpoint(old)
    torch.testing.assert_close(scores(model, x), y, rtol=1e-4, atol=1e-4)


def test_caffe_coco_init_drops_fc_by_name(caffe_reference):
    ref, x, y = caffe_reference
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("aspp.")}
    sd["fc1_voc12_c0.weight"] = torch.zeros(3)
    model, report = model_for_checkpoint(sd, num_classes=21)
    assert list(report.dropped) == ["fc1_voc12_c0.weight"]
    assert all("no DeepLab v2 head" in r for k, r in report.initialised.items() if k.startswith("head."))
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(x), trunk(ref, x))


def test_scale_layout_loads_exactly(caffe_reference):
    ref, x, y = caffe_reference
    sd = caffe_to_scale(ref.state_dict())
    assert detect_layout(sd) == "scale_ports"
    model, report = model_for_checkpoint(sd)
    torch.testing.assert_close(scores(model, x), y, rtol=1e-4, atol=1e-4)
    assert model.input_convention == CAFFE_CONVENTION


def test_torchvision_resnet_loads_exactly():
    tv = randomise_(torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True]))
    x = torch.randn(1, 3, 64, 48)
    trunk = nn.Sequential(*list(tv.children())[:-2])
    model, report = model_for_checkpoint(tv.state_dict(), num_classes=4)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().backbone(x), trunk(x), rtol=1e-4, atol=1e-4)
    assert sorted(report.dropped) == ["fc.bias", "fc.weight"] and "ImageNet" in report.dropped["fc.weight"]
    assert model.input_convention == TORCHVISION_CONVENTION
    head = {k for k in model.state_dict() if k.startswith("head.")}
    assert {k for k in report.initialised if k.startswith("head.")} == head


def test_torchvision_deeplabv3_backbone_loads_exactly():
    from torchvision.models.segmentation import deeplabv3_resnet50

    tv = randomise_(deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=True))
    x = torch.randn(1, 3, 64, 48)
    model, report = model_for_checkpoint(tv.state_dict(), num_classes=21)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().backbone(x), tv.backbone(x)["out"], rtol=1e-4, atol=1e-4)
    assert report.dropped and all(k.startswith(("classifier.", "aux_classifier.")) for k in report.dropped)
    assert all("v3 head" in r for r in report.dropped.values())


def test_block_layout_mismatch_is_refused(caffe_reference):
    ref, _, _ = caffe_reference
    tv_layout = get_model(
        "deeplabv2_resnet50", num_classes=5, stride_in_1x1=False, ceil_mode=False, dilate_first_block=False
    )
    with pytest.raises(ConversionError, match="stride_in_1x1=True, ceil_mode=True, dilate_first_block=True"):
        load_into(tv_layout, ref.state_dict())
    caffe_layout = get_model("deeplabv2_resnet50", num_classes=5)
    tv = torchvision.models.resnet50(weights=None)
    with pytest.raises(ConversionError, match="stride_in_1x1=False"):
        load_into(caffe_layout, tv.state_dict())


def test_wrong_class_count_reinitialises_only_the_classifier(caffe_reference):
    ref, x, _ = caffe_reference
    model = get_model("deeplabv2_resnet50", num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("head.")}
    report = load_into(model, ref.state_dict())
    assert {k for k, r in report.initialised.items() if "classes" in r} == set(before)
    for k, v in before.items():
        torch.testing.assert_close(model.state_dict()[k], v)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().backbone(x), trunk(ref, x))


def test_unknown_missing_and_mismatched_keys_are_named(caffe_reference):
    ref, _, _ = caffe_reference
    sd = dict(ref.state_dict())
    with pytest.raises(ConversionError, match=r"no place in the model: \['layer2.block1.extra.weight'\]"):
        extra = {**sd, "layer2.block1.extra.weight": torch.zeros(1)}
        load_into(get_model("deeplabv2_resnet50", num_classes=5), extra)
    missing = {k: v for k, v in sd.items() if k != "layer3.block2.conv3x3.conv.weight"}
    with pytest.raises(ConversionError, match=r"missing from the checkpoint: \['backbone.layer2.1.conv2.weight'\]"):
        load_into(get_model("deeplabv2_resnet50", num_classes=5), missing)
    report = load_into(get_model("deeplabv2_resnet50", num_classes=5), missing, strict=False)
    assert report.initialised["backbone.layer2.1.conv2.weight"] == "missing from the checkpoint (strict=False)"
    bad = {**sd, "layer2.block1.reduce.conv.weight": torch.zeros(64, 64, 3, 3)}
    shapes = r"backbone.layer1.0.conv1.weight: checkpoint \(64, 64, 3, 3\) vs model \(64, 64, 1, 1\)"
    with pytest.raises(ConversionError, match=shapes):
        load_into(get_model("deeplabv2_resnet50", num_classes=5), bad)


def test_our_checkpoints_with_and_without_crf(tmp_path):
    torch.manual_seed(0)
    net = get_model("deeplabv2_resnet50", num_classes=3)
    joint = CRFRNN(network=get_model("deeplabv2_resnet50_msc", num_classes=3), crf=MeanFieldCRF(num_classes=3))
    report = load_into(joint, {"format": "crfrnn_deeplab/1", "model": net.state_dict()})
    assert all("network-only" in report.initialised[k] for k in joint.state_dict() if k.startswith("crf."))
    for k, v in net.state_dict().items():
        torch.testing.assert_close(joint.state_dict()["network.model." + k], v)
    with torch.no_grad():
        joint.crf.compatibility.add_(1.0)
    path = save_checkpoint(tmp_path / "joint.pt", {"model": joint.state_dict()})
    other = CRFRNN(network=get_model("deeplabv2_resnet50_msc", num_classes=3), crf=MeanFieldCRF(num_classes=3))
    report = load_into(other, path)
    assert not report.initialised.keys() - {k for k in report.initialised if k.endswith("num_batches_tracked")}
    torch.testing.assert_close(other.crf.compatibility, joint.crf.compatibility)


def test_strip_prefixes():
    wrapped = {"module._orig_mod.base.a": torch.zeros(1), "module._orig_mod.base.b": torch.zeros(1)}
    sd, removed = strip_prefixes(wrapped)
    assert removed == "module._orig_mod.base." and sorted(sd) == ["a", "b"]


def test_bad_files(tmp_path):
    model = get_model("deeplabv2_resnet50", num_classes=3)
    good = save_checkpoint(tmp_path / "good.pt", {"model": {"w": torch.zeros(1000)}})
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_into(model, tmp_path / "truncated.pt")
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="readme.txt"):
        load_into(model, tmp_path / "readme.txt")
    torch.save({"model": nn.Linear(2, 2)}, tmp_path / "pickled.pt")  # a pickled module, not a state dict
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_into(model, tmp_path / "pickled.pt")
    with pytest.raises(ConversionError, match="unknown checkpoint layout"):
        load_into(model, {"something.else": torch.zeros(1)})


def test_convert_cli_round_trip(tmp_path, caffe_reference, capsys):
    ref, x, y = caffe_reference
    src = tmp_path / "deeplabv2_caffe.pth"
    torch.save({"base." + k: v for k, v in ref.state_dict().items()}, src)
    assert main([str(src), str(tmp_path / "ours.pt")]) == 0
    assert "layout caffe_deeplabv2" in capsys.readouterr().out
    ckpt = load_checkpoint(tmp_path / "ours.pt")
    assert ckpt["input_convention"] == CAFFE_CONVENTION.to_dict() and ckpt["source"]["layout"] == "caffe_deeplabv2"
    model, report = model_for_checkpoint(tmp_path / "ours.pt")
    assert report.layout == "crfrnn_deeplab" and model.input_convention == CAFFE_CONVENTION
    torch.testing.assert_close(scores(model, x), y, rtol=1e-4, atol=1e-4)
    with pytest.raises(SystemExit):
        main([str(src), str(src)])  # never overwrites its input


def test_full_resnet101_caffe_key_set_loads():
    ref = CaffeDeepLabV2((3, 4, 23, 3), num_classes=21)
    model, report = model_for_checkpoint(ref.state_dict())
    assert sum(p.numel() for p in model.parameters()) == 44_048_532
    assert set(report.loaded) == set(model.state_dict())  # every tensor, BatchNorm counters included
    for k, v in model.state_dict().items():
        if k.startswith("head.branches.3."):
            torch.testing.assert_close(v, ref.state_dict()["aspp.c3." + k.split(".")[-1]])
