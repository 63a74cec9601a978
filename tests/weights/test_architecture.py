"""The architecture the weights need: a model of another depth, block layout or head is refused with the builder
option to change; the output stride may differ (noted)."""

import pytest
import torch
import torchvision

from crfrnn_deeplab import CAFFE_CONVENTION, get_model
from crfrnn_deeplab.weights import load_into, model_for_checkpoint
from crfrnn_deeplab.weights.architecture import Trunk, checkpoint_trunk, model_trunk
from crfrnn_deeplab.weights.layouts import ConversionError, convert_state_dict
from weights.deeplab_ports import TORCHVISION_BLOCKS


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


def test_trunks_are_read_from_weights_and_modules(kazuto, kazuto_model):
    _, sd, _ = kazuto
    held = checkpoint_trunk(convert_state_dict(sd))
    assert held == Trunk((3, 4, 6, 3), True) and held.depth == 50 and held.network == "deeplabv2_resnet50"
    model, _ = kazuto_model
    trunk, switches = model_trunk(model.model.backbone)
    assert trunk == held and switches == {"stride_in_1x1": True, "ceil_mode": True, "dilate_first_block": True}
    odd = Trunk((1, 1, 1, 1), False)
    assert odd.depth is None and odd.network is None and odd.describe() == "a ResNet with BasicBlocks (1, 1, 1, 1)"
