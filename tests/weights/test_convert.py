"""The converter: a checkpoint of any layout written as one of ours (the payload of
:func:`~crfrnn_deeplab.weights.checkpoint.model_entries` plus its source), from Python and as ``python -m``."""

import os
import re
import stat
import subprocess
import sys

import pytest
import torch
import torchvision

from crfrnn_deeplab import CAFFE_CONVENTION, MSC, TORCHVISION_CONVENTION
from crfrnn_deeplab.weights import load_checkpoint, model_for_checkpoint, save_checkpoint
from crfrnn_deeplab.weights.convert import convert_checkpoint, main
from weights.deeplab_ports import X, assert_same, scores


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
        "options": {"stride_in_1x1": True, "ceil_mode": True, "dilate_first_block": True, "head": "aspp_l",
                    "fusion": "score_map", "image_resize": "scale_factor"},
    }
    assert ckpt["input_convention"] == CAFFE_CONVENTION.to_dict()
    assert ckpt["source"]["layout"] == "caffe_deeplabv2" and ckpt["source"]["path"] == str(src)
    assert len(ckpt["source"]["sha256"]) == 64 and ckpt["source"]["unused"] == {}

    model, report = model_for_checkpoint(dst)
    assert report.layout == "crfrnn_deeplab" and not report.unexpected and not report.missing
    assert isinstance(model, MSC) and model.input_convention == CAFFE_CONVENTION
    assert (model.fusion, model.image_resize) == ("score_map", "scale_factor")  # the source's MSC rules, recorded
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
    cmd = [sys.executable, "-m", "crfrnn_deeplab.weights.convert", str(tmp_path / "resnet18.pth"),
           str(tmp_path / "out.pt"), "--num-classes", "4"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "RuntimeWarning" not in run.stderr, run.stderr  # the package does not import the module run as __main__
    assert "torchvision_resnet checkpoint" in run.stdout and "ImageNet classifier: fc.weight, fc.bias" in run.stdout
    model, report = model_for_checkpoint(tmp_path / "out.pt")
    assert model.num_classes == 4 and model.input_convention == TORCHVISION_CONVENTION
    loaded = model.backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in tv.state_dict().items() if not k.startswith("fc."))
    ckpt = load_checkpoint(tmp_path / "out.pt")
    assert ckpt["source"]["unused"] == {"fc.weight": "ImageNet classifier", "fc.bias": "ImageNet classifier"}
    assert ckpt["model_config"]["options"] == {"ceil_mode": False, "dilate_first_block": False, "base_width": 64}


def test_converted_checkpoint_is_the_model_entries_plus_its_source(small, tmp_path):
    _, sd = small
    src = save_checkpoint(tmp_path / "ours.pt", {
        "model": sd, "class_names": ["a", "b", "c"], "step": 9,
        "model_config": {"name": "deeplabv2_resnet18", "num_classes": 3, "options": {"base_width": 8}},
    })
    convert_checkpoint(src, tmp_path / "same.pt")
    ckpt = load_checkpoint(tmp_path / "same.pt")
    assert set(ckpt) == {"format", "model", "model_config", "input_convention", "class_names", "source"}
    assert ckpt["class_names"] == ["a", "b", "c"] and ckpt["model_config"]["crf"] is None
    convert_checkpoint(src, tmp_path / "msc.pt", msc=True, num_classes=4)
    ckpt = load_checkpoint(tmp_path / "msc.pt")
    assert ckpt["model_config"]["name"] == "deeplabv2_resnet18_msc" and ckpt["class_names"] is None


def test_converter_errors_name_the_file(tmp_path, capsys):
    torch.save({}, tmp_path / "empty.pt")
    assert main([str(tmp_path / "empty.pt"), str(tmp_path / "out.pt")]) == 2
    assert "empty.pt is an empty dict" in capsys.readouterr().err


def _ours(small, tmp_path, **entries):
    _, sd = small
    return save_checkpoint(tmp_path / "ours.pt", {
        "model": sd, "model_config": {"name": "deeplabv2_resnet18", "num_classes": 3, "options": {"base_width": 8}},
        **entries,
    })


def test_an_existing_name_at_dst_is_only_replaced_with_overwrite(small, tmp_path, capsys):
    src = _ours(small, tmp_path)
    link = tmp_path / "link.pt"
    link.symlink_to(tmp_path / "nowhere.pt")  # dangling: Path.exists() is False, but the name is taken
    assert main([str(src), str(link)]) == 2
    assert "the destination exists; pass --overwrite" in capsys.readouterr().err
    assert link.is_symlink() and not (tmp_path / "nowhere.pt").exists()
    assert main([str(src), str(link), "--overwrite"]) == 0
    assert not link.is_symlink() and load_checkpoint(link)["model_config"]["num_classes"] == 3
    assert not (tmp_path / "nowhere.pt").exists()  # the link is replaced, nothing is written through it


def test_a_dst_that_names_a_directory_or_lies_below_a_file_is_refused(small, tmp_path, capsys):
    src = _ours(small, tmp_path)
    assert main([str(src), str(tmp_path / "nodir") + os.sep]) == 2
    assert "ends in a path separator, so it names a directory" in capsys.readouterr().err
    assert not (tmp_path / "nodir").exists()
    (tmp_path / "adir").mkdir()
    assert main([str(src), str(tmp_path / "adir"), "--overwrite"]) == 2
    assert "the destination is a directory" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main([str(src), str(tmp_path / "file" / "out.pt")]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot write {tmp_path / 'file' / 'out.pt'}: {tmp_path / 'file'} is not a directory" in err
    assert "Errno" not in err and (tmp_path / "file").read_text() == "x"


def test_overwrite_keeps_the_usual_permissions(small, tmp_path):
    src = _ours(small, tmp_path)
    dst = tmp_path / "out.pt"
    dst.write_bytes(b"old")
    dst.chmod(0o644)
    old = os.umask(0o022)
    try:
        assert main([str(src), str(dst), "--overwrite"]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(dst.stat().st_mode) == 0o644


@pytest.mark.parametrize("names, message", [
    (["a"], r"class_names lists 1 name\(s\) but model_config\.num_classes is 3 classes"),
    (["a", 2, "c"], r"class_names must be a list of strings, got \['a', 2, 'c'\]"),
])
def test_class_names_that_do_not_fit_are_not_copied(small, tmp_path, capsys, names, message):
    src = _ours(small, tmp_path, class_names=names)
    assert main([str(src), str(tmp_path / "out.pt")]) == 2
    assert re.search(r"error: .*ours\.pt: " + message, capsys.readouterr().err)
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("value", ["0", "-3", "2.5", "abc"])
def test_num_classes_that_is_not_a_count_is_a_usage_error(small, tmp_path, capsys, value):
    # --num-classes 0 was reported as the source's model_config failing to build ("ours.pt: the model its
    # model_config records ... cannot be built: num_classes must be >= 1, got 0"), as if the file were wrong
    src = _ours(small, tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main([str(src), str(tmp_path / "out.pt"), "--num-classes", value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "ours.pt" not in err
    assert f"argument --num-classes: expected the model's number of classes, an int >= 1, got '{value}'" in err
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("value, error, message", [
    (0, ValueError, r"got 0"), (-3, ValueError, r"got -3"), (2.0, TypeError, r"got float 2\.0"),
    (True, TypeError, r"got bool True"),
])
def test_num_classes_passed_to_the_api_is_named_not_the_file(small, tmp_path, value, error, message):
    src = _ours(small, tmp_path)
    for call in (lambda: convert_checkpoint(src, tmp_path / "out.pt", num_classes=value),
                 lambda: model_for_checkpoint(src, num_classes=value)):
        with pytest.raises(error, match=r"^num_classes must be an int >= 1 \(the model's classes\) or None \(the "
                                        r"checkpoint's\), " + message + "$"):
            call()
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("name", ["..", "."])
def test_a_dst_whose_last_component_is_a_dot_names_a_directory(small, tmp_path, capsys, name):
    # DST "new/..": os.path.isdir is False while new/ does not exist, so the converter created new/ and failed
    # renaming its temporary file onto "new/.." with "[Errno 16] Device or resource busy: '.../new/....tmp'"
    src = _ours(small, tmp_path)
    dst = os.path.join(tmp_path, "new", name)  # not pathlib, which drops a "."
    assert main([str(src), dst, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"error: the destination {dst} ends in {name!r}, so it names a directory; give a file name" in err
    assert not (tmp_path / "new").exists() and ".tmp" not in err
    with pytest.raises(ValueError, match="so it names a directory"):
        convert_checkpoint(src, dst)
