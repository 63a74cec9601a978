"""The model a checkpoint needs: built from what the checkpoint records or holds, from a registered model of the
right kind (single-scale or MSC), and loaded from one conversion of the checkpoint."""

import re

import pytest
import torch
from torch import nn

from crfrnn_deeplab import CAFFE_CONVENTION, CRFRNN, MSC, DeepLabV2, MeanFieldCRF, get_model
from crfrnn_deeplab.models import registry
from crfrnn_deeplab.weights import CheckpointError, layouts, load_into, model_for_checkpoint, save_checkpoint
from crfrnn_deeplab.weights.factory import model_variant, network_name
from weights.deeplab_ports import build_small


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


def test_network_name_reads_the_architecture_through_wrappers():
    assert network_name(get_model("deeplabv2_resnet34", num_classes=3, base_width=8)) == "deeplabv2_resnet34"
    msc = get_model("deeplabv2_resnet50_msc", num_classes=3)
    assert network_name(CRFRNN(network=msc, crf=MeanFieldCRF(num_classes=3))) == "deeplabv2_resnet50"
    with pytest.raises(TypeError, match="DeepLabV2, MSC or CRFRNN model, got Conv2d"):
        network_name(nn.Conv2d(3, 3, 1))


@pytest.mark.parametrize("kind", ["file", "kazuto"])
def test_a_checkpoint_is_read_unwrapped_and_converted_once(kind, small, kazuto, tmp_path, monkeypatch):
    if kind == "file":
        _, sd = small
        source = save_checkpoint(tmp_path / "ours.pt", {"model": sd, "model_config": {
            "name": "deeplabv2_resnet18", "num_classes": 3, "options": {"base_width": 8}}})
    else:
        source = sd = kazuto[1]
    calls = {"read": 0, "unwrap": 0, "keys": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(layouts, "load_checkpoint", counted("read", layouts.load_checkpoint))
    monkeypatch.setattr(layouts, "_unwrap_checkpoint", counted("unwrap", layouts._unwrap_checkpoint))
    for layout, key_map in layouts._KEY_MAPS.items():
        monkeypatch.setitem(layouts._KEY_MAPS, layout, counted("keys", key_map))
    model, report = model_for_checkpoint(source)
    assert calls == {"read": int(kind == "file"), "unwrap": 1, "keys": len(sd)}  # each key mapped once
    assert set(report.used) == set(model.state_dict())


def test_the_msc_twin_comes_from_the_registry(small, monkeypatch):
    assert model_variant("deeplabv2_resnet18", multi_scale=True) == "deeplabv2_resnet18_msc"
    assert model_variant("deeplabv2_resnet18_msc", multi_scale=False) == "deeplabv2_resnet18"
    assert model_variant("deeplabv2_resnet50", multi_scale=False) == "deeplabv2_resnet50"
    toy = registry.ModelSpec(name="toy", builder=lambda *, num_classes: build_small(num_classes))
    monkeypatch.setitem(registry._MODELS, "toy", toy)
    with pytest.raises(ValueError, match=r"'toy' has no registered multi-scale \(MSC\) twin"):
        model_variant("toy", multi_scale=True)
    # a name that looks like the twin is not one unless the registry records it as multi-scale
    monkeypatch.setitem(registry._MODELS, "toy_msc", registry.ModelSpec(name="toy_msc", builder=toy.builder))
    with pytest.raises(ValueError, match="no registered multi-scale"):
        model_variant("toy", multi_scale=True)
    _, sd = small
    ckpt = {"format": "crfrnn_deeplab/1", "model": sd,
            "model_config": {"name": "toy", "num_classes": 3, "options": {}}}
    assert isinstance(model_for_checkpoint(ckpt)[0], DeepLabV2)
    with pytest.raises(ValueError, match="'toy' has no registered multi-scale"):
        model_for_checkpoint(ckpt, msc=True)


def test_input_convention_is_not_a_choice(small):
    _, sd = small
    with pytest.raises(TypeError, match="input_convention comes with the checkpoint"):
        model_for_checkpoint(sd, input_convention=CAFFE_CONVENTION)


def test_an_unknown_option_lists_the_options_that_can_be_chosen(small, kazuto):
    # the list offered input_convention, which test_input_convention_is_not_a_choice refuses
    _, sd = small
    ours = {"format": "crfrnn_deeplab/1", "model": sd,
            "model_config": {"name": "deeplabv2_resnet18", "num_classes": 3, "options": {"base_width": 8}}}
    for source, name in ((ours, "deeplabv2_resnet18"), (kazuto[1], "deeplabv2_resnet50_msc")):
        with pytest.raises(TypeError, match=rf"unknown option\(s\) \['foo'\] for model '{name}'; accepted: \[") as info:
            model_for_checkpoint(source, foo=1)
        assert "'output_stride'" in str(info.value) and "input_convention" not in str(info.value)
    edited = {**ours, "model_config": {**ours["model_config"], "options": {"widht": 8}}}
    with pytest.raises(CheckpointError, match=r"\['widht'\] not option\(s\) of 'deeplabv2_resnet18'; its") as info:
        model_for_checkpoint(edited)
    assert "'base_width'" in str(info.value) and "input_convention" not in str(info.value)


_CONFIG = {"name": "deeplabv2_resnet18", "num_classes": 3, "options": {"base_width": 8}, "crf": None}


@pytest.mark.parametrize("entry, value, message", [
    ("num_classes", 3.7, r"model_config\.num_classes must be an int >= 1, got 3\.7"),
    ("num_classes", "x", r"model_config\.num_classes must be an int >= 1, got 'x'"),
    ("num_classes", True, r"model_config\.num_classes must be an int >= 1, got True"),
    ("num_classes", 4, r"model_config\.num_classes is 4 but the weights are for 3 classes"),
    ("options", [1, 2], r"model_config\.options must be a dict of keyword options \(or None\), got \[1, 2\]"),
    ("options", {"widht": 8}, r"model_config\.options: \['widht'\] not option\(s\) of 'deeplabv2_resnet18'"),
    ("options", {"base_width": 8, "output_stride": 7},
     r"the model its model_config records \(deeplabv2_resnet18, .*\) cannot be built: .*output_stride"),
    ("crf", "yes", r"model_config\.crf must be a dict of keyword options \(or None\), got 'yes'"),
    ("crf", {"foo": 1}, r"model_config\.crf: unknown MeanFieldCRF option\(s\) \['foo'\]"),
    ("crf", {"num_classes": 3}, r"model_config\.crf: num_classes is not a CRF option"),
    ("crf", {"spatial_weight": "x"}, r"cannot be built: spatial_weight must be a finite number"),
    ("name", 5, r"model_config\.name must be a registered model name \(a string\), got 5"),
    ("name", "deeplabv9", r"model_config\.name 'deeplabv9' is not a registered model"),
    ("colour", "red", r"unknown model_config key\(s\) \['colour'\]"),
])
def test_hand_edited_model_config_entries_are_named(small, tmp_path, entry, value, message):
    _, sd = small
    path = save_checkpoint(tmp_path / "edited.pt", {"model": sd, "model_config": {**_CONFIG, entry: value}})
    with pytest.raises(CheckpointError, match=r"edited\.pt: .*" + message):
        model_for_checkpoint(path)


def test_class_names_must_fit_the_classes(small):
    _, sd = small
    with pytest.raises(CheckpointError, match=r"lists 2 name\(s\) but model_config\.num_classes is 3 classes"):
        model_for_checkpoint({"format": "crfrnn_deeplab/1", "model": sd, "model_config": _CONFIG,
                              "class_names": ["a", "b"]})
    with pytest.raises(CheckpointError, match=r"class_names lists 4 name\(s\) but the weights have 3 classes"):
        load_into(build_small(), {"format": "crfrnn_deeplab/1", "model": sd, "class_names": list("abcd")})
    with pytest.raises(CheckpointError, match=r"input_convention 'BGR' is not valid"):
        load_into(build_small(), {"format": "crfrnn_deeplab/1", "model": sd, "input_convention": "BGR"})


def test_an_empty_crf_entry_still_builds_the_crf(small):
    _, sd = small
    model, _ = model_for_checkpoint({"format": "crfrnn_deeplab/1", "model": sd, "model_config": {**_CONFIG, "crf": {}}},
                                    num_classes=3)
    assert isinstance(model, CRFRNN)


@pytest.mark.parametrize("msc", ["no", 0, 1, "True"])
def test_msc_must_be_a_bool(small, msc):
    _, sd = small
    with pytest.raises(TypeError, match=r"msc must be True, False or None \(as the checkpoint was\), got"):
        model_for_checkpoint({"format": "crfrnn_deeplab/1", "model": sd, "model_config": _CONFIG}, msc=msc)


@pytest.mark.parametrize("wrapper", ["base.", "scale."])
def test_a_torchvision_resnet_under_a_base_prefix_is_not_taken_for_an_msc_port(wrapper):
    # base. / scale. are the MSC wrappers of kazuto1011's Caffe ports only: a torchvision ResNet held as
    # `self.base = resnet18()` was built as an MSC model (multi-scale fusion the weights were never trained for)
    import torchvision

    sd = {wrapper + k: v for k, v in torchvision.models.resnet18(weights=None).state_dict().items()}
    model, report = model_for_checkpoint(sd, num_classes=3)
    assert report.layout == "torchvision_resnet" and report.removed_prefix == wrapper
    assert type(model) is DeepLabV2
    assert isinstance(model_for_checkpoint(sd, num_classes=3, msc=True)[0], MSC)  # asked for: still possible


def test_a_trained_crf_that_model_config_does_not_record_is_not_dropped(small, tmp_path):
    # model_for_checkpoint (and so the converter and predict) built what model_config said: the trained CRF in the
    # weights was reported unused and left out of the model, and the converter wrote a file without it
    from crfrnn_deeplab.weights.convert import convert_checkpoint

    _, sd = small
    joint = CRFRNN(network=build_small(), crf=MeanFieldCRF(num_classes=3))
    joint.network.load_state_dict(sd)
    with torch.no_grad():
        joint.crf.compatibility.add_(0.5)
    path = save_checkpoint(tmp_path / "odd.pt", {"model": joint.state_dict(), "model_config": _CONFIG})
    message = r"odd\.pt: its weights hold a CRF layer \(crf\.\*\) but model_config\.crf records none"
    for call in (lambda: model_for_checkpoint(path), lambda: model_for_checkpoint(path, num_classes=4),
                 lambda: convert_checkpoint(path, tmp_path / "out.pt")):
        with pytest.raises(CheckpointError, match=message):
            call()
    assert not (tmp_path / "out.pt").exists()
    model = CRFRNN(network=build_small(), crf=MeanFieldCRF(num_classes=3))
    load_into(model, path)  # the weights as they are, into the model the caller built
    assert torch.equal(model.crf.compatibility, joint.crf.compatibility)
