"""External layouts: every layout maps onto our keys so that our model reproduces the original network; wrapper
prefixes are removed in one place; a checkpoint that holds nothing says which file it is."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from crfrnn_deeplab import CAFFE_CONVENTION, MSC, TORCHVISION_CONVENTION, DeepLabV2
from crfrnn_deeplab.weights import CheckpointError, load_into, model_for_checkpoint, save_checkpoint
from crfrnn_deeplab.weights.layouts import ConversionError, convert_state_dict, detect_layout, strip_prefixes
from weights.deeplab_ports import (
    R50,
    R101,
    X,
    IshtMSDeeplab,
    KazutoDeepLabV1,
    KazutoDeepLabV2,
    KazutoMSC,
    assert_same,
    build_small,
    features,
    randomise_,
    scores,
    trunk,
)

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


def test_caffe_msc_checkpoint_reproduces_the_ports_fused_output(kazuto, kazuto_model):
    # kazuto1011's MSC fuses at the 1.0 scale's score map and resizes inputs with scale_factor: the converted model
    # is built with the same rules (fusion="score_map", image_resize="scale_factor") and must match it exactly.
    ref, _, _ = kazuto
    model, _ = kazuto_model
    assert (model.fusion, model.image_resize) == ("score_map", "scale_factor")
    x = torch.randn(1, 3, 65, 81, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = F.interpolate(KazutoMSC(ref).eval()(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        assert_same(model.eval()(x), expected)
        plain = MSC(model=model.model, scales=model.scales).eval()(x)  # fusion at the input size: not the same
    assert (plain - expected).abs().max() > 1e-3 * expected.abs().max()


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


# --- prefixes, reading


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


def test_convert_state_dict_reads_a_file_once_and_keeps_its_metadata(small, tmp_path):
    _, sd = small
    path = save_checkpoint(tmp_path / "ours.pt", {"model": sd, "class_names": ["a", "b", "c"]})
    converted = convert_state_dict(path)
    assert converted.layout == "crfrnn_deeplab" and converted.source == str(path)
    assert converted.metadata["class_names"] == ["a", "b", "c"] and converted.checkpoint_keys == tuple(sd)
    assert converted.state_dict.keys() == sd.keys() and converted.num_classes == 3
    assert converted.input_convention is None and converted.model_config is None and not converted.saved_from_msc
    with pytest.raises(ConversionError, match="unknown layout 'caffe'"):
        convert_state_dict(path, layout="caffe")


def test_an_empty_checkpoint_names_its_file(tmp_path):
    torch.save({}, tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match=r"empty\.pt is an empty dict: no state dict to load"):
        load_into(build_small(), tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match=r"empty\.pt is an empty dict"):
        model_for_checkpoint(tmp_path / "empty.pt")
    torch.save({"format": "crfrnn_deeplab/1", "model": {}}, tmp_path / "no_model.pt")
    with pytest.raises(CheckpointError, match=r"no_model\.pt: crfrnn_deeplab checkpoint without a state dict"):
        model_for_checkpoint(tmp_path / "no_model.pt")
    with pytest.raises(CheckpointError, match="<in-memory checkpoint> is an empty dict"):
        convert_state_dict({})


def test_our_checkpoint_saved_without_its_format_entry_keeps_what_it_records(small, tmp_path):
    # torch.save(model_entries(...)) instead of save_checkpoint: the state dict under "model" was read as a bare
    # one, so the recorded input convention, block layout and classes were dropped without a word
    from crfrnn_deeplab.weights.checkpoint import model_entries

    net, _ = small
    entries = model_entries(net, name="deeplabv2_resnet18", num_classes=3, options={"base_width": 8}, crf=None,
                            class_names=["sky", "road", "car"])
    entries["input_convention"] = CAFFE_CONVENTION.to_dict()
    torch.save(dict(entries), tmp_path / "unformatted.pt")
    model, report = model_for_checkpoint(tmp_path / "unformatted.pt")
    assert report.layout == "crfrnn_deeplab" and model.input_convention == CAFFE_CONVENTION
    assert report.class_names == ["sky", "road", "car"]
    target = build_small()
    load_into(target, tmp_path / "unformatted.pt")
    assert target.input_convention == CAFFE_CONVENTION
    bad = {**entries, "model_config": {**entries["model_config"], "num_classes": 5}}
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"bad\.pt: model_config\.num_classes is 5 but the weights are for 3"):
        load_into(build_small(), tmp_path / "bad.pt")
    foreign = {"model": entries["model"], "model_config": {"arch": "resnet18", "lr": 0.1}}  # another project's
    assert load_into(build_small(), foreign).layout == "crfrnn_deeplab"  # read as a state dict, as before
