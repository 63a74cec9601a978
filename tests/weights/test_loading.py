"""Strict loading: every key of the checkpoint and of the model is accounted for in the report; unknown,
missing and mismatched keys are named (as the checkpoint names them); bad files give clear errors."""

import pytest
import torch
import torchvision
from torch import nn

from crfrnn_deeplab import CRFRNN, MSC, TORCHVISION_CONVENTION, MeanFieldCRF, get_model
from crfrnn_deeplab.weights import CheckpointError, LoadReport, load_into, save_checkpoint
from crfrnn_deeplab.weights.layouts import ConversionError
from weights.deeplab_ports import CAFFE_BLOCKS, TORCHVISION_BLOCKS, build_small


def test_torchvision_resnet101_key_set_loads_completely():
    tv = torchvision.models.resnet101(weights=None)
    model = get_model("deeplabv2_resnet101", num_classes=2, **TORCHVISION_BLOCKS)
    report = load_into(model, tv.state_dict())
    assert set(report.used.values()) == set(tv.state_dict()) - {"fc.weight", "fc.bias"}
    assert model.input_convention == TORCHVISION_CONVENTION and "input convention changed" in report.notes[0]


# --- strictness: unused, missing and mismatched keys, reported exactly


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


def test_a_shape_mismatch_names_the_key_as_the_checkpoint_has_it(kazuto):
    _, sd, _ = kazuto
    bad = {**sd, "base.layer2.block1.reduce.conv.weight": torch.zeros(64, 64, 3, 3)}
    model = get_model("deeplabv2_resnet50_msc", num_classes=5, **CAFFE_BLOCKS)
    with pytest.raises(ConversionError, match=r"shape mismatch: base\.layer2\.block1\.reduce\.conv\.weight "
                                              r"\(the model's model\.backbone\.layer1\.0\.conv1\.weight\): "
                                              r"checkpoint \(64, 64, 3, 3\) vs model \(64, 64, 1, 1\)"):
        load_into(model, bad)


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


def test_load_into_wrapped_models(small):
    _, sd = small
    wrapped = nn.DataParallel(build_small())
    report = load_into(wrapped, {"module." + k: v for k, v in sd.items()})
    assert report.removed_prefix == "module."
    assert torch.equal(wrapped.module.head.branches[0].bias, sd["head.branches.0.bias"])


def test_the_report_carries_the_class_names_of_the_same_classes(small):
    _, sd = small
    ckpt = {"format": "crfrnn_deeplab/1", "model": sd, "class_names": ["sky", "road", "car"]}
    assert load_into(build_small(), ckpt).class_names == ["sky", "road", "car"]
    assert load_into(build_small(num_classes=4), ckpt).class_names is None  # another set of classes


# --- files: bad ones give clear errors


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
                                              r"\(it pickles the global torch\.nn\.modules\.linear\.Linear, .*"
                                              r"re-save its tensors alone"):  # (not "convert it": the converter
        load_into(model, tmp_path / "pickled.pt")                              # reads files the same way)
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "no_weights.pt")
    with pytest.raises(CheckpointError, match=r"not a checkpoint: .* top-level keys are \['epoch', 'lr'\]"):
        load_into(model, tmp_path / "no_weights.pt")
    with pytest.raises(FileNotFoundError):
        load_into(model, tmp_path / "absent.pt")
    with pytest.raises(ConversionError, match="unknown checkpoint layout"):
        load_into(model, {"something.else": torch.zeros(1)})
    with pytest.raises(ConversionError, match="nothing matched: is 'caffe_deeplabv2' the right layout"):
        load_into(model, sd, layout="caffe_deeplabv2")


def test_a_truncated_legacy_file_says_why(small, tmp_path):
    _, sd = small
    legacy = tmp_path / "legacy.pt"
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)  # PyTorch < 1.6's format: a pickle
    (tmp_path / "cut.pt").write_bytes(legacy.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"cut\.pt is not a readable PyTorch checkpoint .*: \S"):
        load_into(build_small(), tmp_path / "cut.pt")


def test_report_reads_well(kazuto_model):
    _, report = kazuto_model
    assert isinstance(report, LoadReport)
    text = str(report)
    assert text.splitlines()[0] == (
        "caffe_deeplabv2 checkpoint <in-memory checkpoint>, prefix 'base.' removed: 326 of 326 model tensors loaded"
    )
    assert "input convention: BGR, 0–255, mean (104.008, 116.669, 122.675), no std" in text


# --- values: what load_state_dict would cast or compute NaN from is refused, strict or not


@pytest.mark.parametrize("strict", [True, False])
def test_negative_batchnorm_variances_are_refused(small, strict):
    _, sd = small
    bad = {**sd, "backbone.layer2.0.bn1.running_var": sd["backbone.layer2.0.bn1.running_var"].clone()}
    bad["backbone.layer2.0.bn1.running_var"][:3] = -1.0
    with pytest.raises(CheckpointError, match=r"negative BatchNorm variances in 1 tensor\(s\): "
                                              r"backbone\.layer2\.0\.bn1\.running_var \(3 of 16 values\)"):
        load_into(build_small(), bad, strict=strict)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_a_tensor_of_another_dtype_kind_is_refused(small, dtype):
    _, sd = small
    w = sd["backbone.conv1.weight"]
    bad = {**sd, "backbone.conv1.weight": (w * 10).to(dtype)}
    model = build_small()
    before = model.backbone.conv1.weight.detach().clone()
    with pytest.raises(CheckpointError, match=rf"another kind than the model's: backbone\.conv1\.weight "
                                              rf"\({dtype}, the model's is torch\.float32\)"):
        load_into(model, bad)
    assert torch.equal(model.backbone.conv1.weight, before)


def test_safe_dtype_conversions_load(small):
    _, sd = small
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        model = build_small()
        load_into(model, {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()})
        torch.testing.assert_close(model.backbone.conv1.weight, sd["backbone.conv1.weight"].to(dtype).float())
    counter = "backbone.bn1.num_batches_tracked"
    model = build_small()
    load_into(model, {**sd, counter: torch.tensor(7.0)})  # a whole count saved as a float
    assert model.state_dict()[counter].dtype == torch.int64 and int(model.state_dict()[counter]) == 7
    with pytest.raises(CheckpointError, match=rf"{counter} \(torch\.float32, not a whole count, the model's is "
                                              r"torch\.int64\)"):
        load_into(build_small(), {**sd, counter: torch.tensor(2.5)})


@pytest.mark.parametrize("entry, message", [
    ("meta", r"'backbone\.conv1\.weight' is a meta tensor \(a shape without values\)"),
    ("sparse", r"'backbone\.conv1\.weight' is a sparse_coo tensor; a state dict holds dense tensors"),
    ("int key", r"its key 5 is not a string \(type int\)"),
    ("tuple key", r"its key \('a', 'b'\) is not a string \(type tuple\)"),
    ("not a tensor", r"'backbone\.conv1\.weight' holds a value of type int, not a tensor$"),
])
def test_unusual_state_dict_contents_are_named(small, tmp_path, entry, message):
    _, sd = small
    bad = dict(sd)
    w = sd["backbone.conv1.weight"]
    if entry == "meta":
        bad["backbone.conv1.weight"] = torch.empty(w.shape, device="meta")
    elif entry == "sparse":
        bad["backbone.conv1.weight"] = w.to_sparse()
    elif entry == "int key":
        bad[5] = torch.zeros(1)
    elif entry == "tuple key":
        bad[("a", "b")] = torch.zeros(1)
    else:
        bad["backbone.conv1.weight"] = 3
    with pytest.raises(CheckpointError, match=r"<in-memory checkpoint> is not a usable state dict: " + message):
        load_into(build_small(), bad)
    with pytest.raises(CheckpointError, match=r"<in-memory checkpoint> \(its state dict under 'state_dict'\) is "
                                              r"not a usable state dict: " + message):
        load_into(build_small(), {"state_dict": bad, "epoch": 3})
    with pytest.raises(CheckpointError, match=r"crfrnn_deeplab checkpoint without a state dict under 'model' \("
                                              + message.removesuffix("$")):
        load_into(build_small(), {"format": "crfrnn_deeplab/1", "model": bad})


def test_float64_values_that_overflow_float32_are_refused(small):
    # finite in float64, infinite once load_state_dict casts them into the float32 model: the check looked at the
    # checkpoint's values only, so the model was loaded with inf weights (and predicted NaN)
    _, sd = small
    bad = {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}
    bad["backbone.conv1.weight"][0, 0, 0, :2] = torch.tensor([1e39, -1e300], dtype=torch.float64)
    model = build_small()
    before = model.backbone.conv1.weight.detach().clone()
    with pytest.raises(CheckpointError, match=r"NaN or infinite values in 1 tensor\(s\): backbone\.conv1\.weight "
                                              r"\(2 of 1176 values, finite in torch\.float64 but not in the model's "
                                              r"torch\.float32\)"):
        load_into(model, bad)
    assert torch.equal(model.backbone.conv1.weight, before)
    big = {**sd, "backbone.conv1.weight": sd["backbone.conv1.weight"].double() * 1e30}  # large, but a float32
    load_into(build_small(), big)
