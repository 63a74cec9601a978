"""``hubconf.py``: the torch.hub entry points check their ``crf`` argument (a bool, or MeanFieldCRF's options)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from crfrnn_deeplab import CRFRNN, DeepLabV2, MeanFieldCRF
from crfrnn_deeplab.weights import save_checkpoint
from weights.deeplab_ports import build_small

_spec = importlib.util.spec_from_file_location("hubconf", Path(__file__).resolve().parents[2] / "hubconf.py")
hubconf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hubconf)


def _small(**kwargs):
    return hubconf.deeplabv2_resnet18(num_classes=3, base_width=8, **kwargs)


def test_crf_true_false_or_options():
    assert isinstance(_small(), DeepLabV2) and isinstance(_small(crf=False), DeepLabV2)
    assert isinstance(_small(crf=None), DeepLabV2)  # None: as the checkpoint; without one, no CRF
    assert isinstance(_small(crf=True), CRFRNN)
    model = _small(crf={"train_iterations": 2})
    assert isinstance(model, CRFRNN) and model.crf.train_iterations == 2 and model.crf.num_classes == 3
    assert isinstance(_small(crf={}), CRFRNN)  # the default options


@pytest.mark.parametrize("crf", ["no", [1], 1, 0.0])
def test_crf_that_is_neither_a_bool_nor_options_is_refused(crf):
    with pytest.raises(TypeError, match=r"deeplabv2_resnet18: crf must be None \(as the checkpoint\), True, False or "
                                        r"a dict of MeanFieldCRF options, got"):
        _small(crf=crf)


def test_crf_options_are_checked_by_name():
    with pytest.raises(TypeError, match=r"deeplabv2_resnet18: crf: unknown MeanFieldCRF option\(s\) \['foo'\]; "
                                        r"accepted: \[.*'theta_alpha'"):
        _small(crf={"foo": 1})
    with pytest.raises(TypeError, match=r"crf: num_classes is not a CRF option: the CRF gets the model's number of "
                                        r"classes"):
        _small(crf={"num_classes": 5})


def test_crf_options_cannot_override_a_checkpoint_crf(tmp_path):
    joint = CRFRNN(network=build_small(), crf=MeanFieldCRF(num_classes=3))
    path = save_checkpoint(tmp_path / "joint.pt", {"model": joint.state_dict(), "model_config": {
        "name": "deeplabv2_resnet18", "num_classes": 3, "options": {"base_width": 8}, "crf": {}}})
    assert isinstance(hubconf.deeplabv2_resnet18(checkpoint=str(path), crf=True), CRFRNN)
    with pytest.raises(ValueError, match=r"joint\.pt records its CRF layer's options"):
        hubconf.deeplabv2_resnet18(checkpoint=str(path), crf={"train_iterations": 2})


def _trained_joint(tmp_path, classes=3):
    """A CRFRNN checkpoint whose CRF is not at its initial values (bilateral weights 7, θβ 20, one iteration)."""
    joint = CRFRNN(network=build_small(num_classes=classes), crf=MeanFieldCRF(
        num_classes=classes, bilateral_weight=7.0, theta_beta=20.0, train_iterations=1))
    path = save_checkpoint(tmp_path / "joint.pt", {"model": joint.state_dict(), "model_config": {
        "name": "deeplabv2_resnet18", "num_classes": classes, "options": {"base_width": 8},
        "crf": {"train_iterations": 1}}})
    return joint, str(path)


@pytest.mark.parametrize("num_classes", [None, 3])
@pytest.mark.parametrize("crf", [None, True])
def test_a_checkpoint_crf_is_loaded_not_replaced(tmp_path, num_classes, crf):
    # With num_classes, the checkpoint's trained CRF was dropped (crf=True put a new one at its initial values
    # in its place, and by default a DeepLabV2 came back), silently.
    joint, path = _trained_joint(tmp_path)
    model = hubconf.deeplabv2_resnet18(checkpoint=path, num_classes=num_classes, crf=crf,
                                       **({} if num_classes is None else {"base_width": 8}))
    assert isinstance(model, CRFRNN) and model.crf.train_iterations == 1  # the recorded options
    for key, value in joint.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize("num_classes", [None, 3])
def test_crf_false_leaves_a_checkpoint_crf_out(tmp_path, num_classes):
    # Without num_classes, crf=False (the old default, so indistinguishable from "not given") still gave a CRFRNN.
    joint, path = _trained_joint(tmp_path)
    model = hubconf.deeplabv2_resnet18(checkpoint=path, num_classes=num_classes, crf=False,
                                       **({} if num_classes is None else {"base_width": 8}))
    assert isinstance(model, DeepLabV2)
    for key, value in joint.network.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_other_classes_keep_the_checkpoint_crf_bandwidths(tmp_path):
    joint, path = _trained_joint(tmp_path)
    model = hubconf.deeplabv2_resnet18(checkpoint=path, num_classes=5, base_width=8)
    assert isinstance(model, CRFRNN) and model.crf.num_classes == 5
    assert model.crf.bandwidths["theta_beta"] == pytest.approx(20.0)  # loaded; the class matrices re-initialised
    assert torch.equal(model.crf.bilateral_weight, 10.0 * torch.eye(5))
    with pytest.raises(ValueError, match=r"joint\.pt records its CRF layer's options"):
        hubconf.deeplabv2_resnet18(checkpoint=path, num_classes=5, base_width=8, crf={"train_iterations": 2})


def test_a_bare_state_dict_crf_loads_into_the_options_given(tmp_path, caplog):
    # A state dict records no CRF options: its weights loaded into MeanFieldCRF's defaults silently, and a dict of
    # the right options was refused as "its own options"
    joint = CRFRNN(network=build_small(), crf=MeanFieldCRF(num_classes=3, normalization="after", train_iterations=1,
                                                           bilateral_weight=7.0))
    path = tmp_path / "bare.pt"
    torch.save(joint.state_dict(), path)
    given = hubconf.deeplabv2_resnet18(checkpoint=str(path), num_classes=3, base_width=8,
                                       crf={"normalization": "after", "train_iterations": 1})
    assert given.crf.normalization == "after" and given.crf.train_iterations == 1
    assert torch.equal(given.crf.bilateral_weight, joint.crf.bilateral_weight)
    with caplog.at_level("WARNING", logger="crfrnn_deeplab.hub"):
        default = hubconf.deeplabv2_resnet18(checkpoint=str(path), num_classes=3, base_width=8)
    assert default.crf.normalization == "symmetric" and torch.equal(default.crf.bilateral_weight, 7.0 * torch.eye(3))
    assert "records no options of its CRF layer: it gets MeanFieldCRF's defaults" in caplog.text


@pytest.mark.parametrize("weights_crf", [True, False])
def test_weights_and_model_config_that_disagree_on_the_crf(tmp_path, weights_crf):
    # Without num_classes the model_config decided (a trained CRF in the weights was dropped, or a new one added);
    # with it, the weights. Now: refused without num_classes, the weights with it.
    joint, _ = _trained_joint(tmp_path)
    model = joint if weights_crf else joint.network
    config = {"name": "deeplabv2_resnet18", "num_classes": 3, "options": {"base_width": 8},
              **({} if weights_crf else {"crf": {}})}
    path = str(save_checkpoint(tmp_path / "odd.pt", {"model": model.state_dict(), "model_config": config}))
    held, recorded = ("a", "none") if weights_crf else ("no", "one")
    with pytest.raises(ValueError, match=rf"odd\.pt's weights hold {held} CRF layer but its model_config records "
                                         rf"{recorded}; pass num_classes"):
        hubconf.deeplabv2_resnet18(checkpoint=path)
    read = hubconf.deeplabv2_resnet18(checkpoint=path, num_classes=3, base_width=8)
    assert isinstance(read, CRFRNN) == weights_crf
    if weights_crf:
        assert torch.equal(read.crf.bilateral_weight, joint.crf.bilateral_weight)
