"""``hubconf.py``: the torch.hub entry points check their ``crf`` argument (a bool, or MeanFieldCRF's options)."""

import importlib.util
from pathlib import Path

import pytest

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
    assert isinstance(_small(crf=True), CRFRNN)
    model = _small(crf={"train_iterations": 2})
    assert isinstance(model, CRFRNN) and model.crf.train_iterations == 2 and model.crf.num_classes == 3
    assert isinstance(_small(crf={}), CRFRNN)  # the default options


@pytest.mark.parametrize("crf", ["no", [1], 1, None])
def test_crf_that_is_neither_a_bool_nor_options_is_refused(crf):
    with pytest.raises(TypeError, match=r"deeplabv2_resnet18: crf must be True, False or a dict of MeanFieldCRF "
                                        r"options, got"):
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
    with pytest.raises(ValueError, match=r"joint\.pt holds a CRF layer with its own options"):
        hubconf.deeplabv2_resnet18(checkpoint=str(path), crf={"train_iterations": 2})
