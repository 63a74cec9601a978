"""The prediction CLI and API against hostile inputs (second audit): every case here was a bare traceback, a
message that did not name the problem, or a file left behind, before its fix."""

import json
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crfrnn_deeplab import CRFRNN, MeanFieldCRF, get_model
from crfrnn_deeplab.predict import predict, to_raw_batch
from crfrnn_deeplab.predict.cli import main
from crfrnn_deeplab.weights.checkpoint import model_entries, save_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _checkpoint(path, *, num_classes=3, crf=True):
    """A checkpoint of a tiny untrained model (milliseconds)."""
    torch.manual_seed(0)
    model = get_model("deeplabv2_resnet18", num_classes=num_classes, base_width=4)
    if crf:
        model = CRFRNN(network=model, crf=MeanFieldCRF(num_classes=num_classes, eval_iterations=1))
    return save_checkpoint(path, model_entries(
        model, name="deeplabv2_resnet18", num_classes=num_classes, options={"base_width": 4},
        crf={"eval_iterations": 1} if crf else None, class_names=None))


@pytest.fixture
def setup(tmp_path):
    """(checkpoint, in/q.png: a 20 x 24 RGB image)."""
    (tmp_path / "in").mkdir()
    image = tmp_path / "in" / "q.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(image)
    return _checkpoint(tmp_path / "ck.pt"), image


def _files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


# ------------------------------------------------------------------------------------------------------------
# the output directory


@pytest.mark.parametrize("dangling", ["out", "out/overlays"])
def test_an_output_directory_that_is_a_dangling_symlink_is_a_usage_error(tmp_path, setup, capsys, dangling):
    # was: the checks passed (a dangling link does not "exist"), then mkdir raised a bare FileExistsError
    checkpoint, image = setup
    if dangling != "out":
        (tmp_path / "out").mkdir()
    (tmp_path / dangling).symlink_to(tmp_path / "nowhere")
    assert main([str(image), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"), "--overlay"]) == 2
    err = capsys.readouterr().err
    assert f"output directory {str(tmp_path / dangling)!r} is a dangling symlink" in err and err.count("\n") == 1
    assert not (tmp_path / "nowhere").exists() and not os.path.lexists(tmp_path / "out" / "classes.json")


@pytest.mark.parametrize("fails", ["mkdir", "write"])
def test_an_output_directory_that_cannot_be_written_is_one_line_and_status_2(tmp_path, setup, capsys, monkeypatch,
                                                                              fails):
    # was: a PermissionError / OSError traceback from mkdir or from writing classes.json (a read-only --out; the
    # tests run as any user, so the refusal is simulated where the CLI meets the file system)
    checkpoint, image = setup

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "out"))

    if fails == "mkdir":
        monkeypatch.setattr(Path, "mkdir", refuse)
    else:
        monkeypatch.setattr(sys.modules[main.__module__], "atomic_write", refuse)
    assert main([str(image), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write into the output directory {str(tmp_path / 'out')!r}")
    assert "Permission denied" in err and err.count("\n") == 1


def test_a_model_of_more_classes_than_a_palette_png_holds_is_refused_before_writing(tmp_path, setup, capsys):
    # was: a ValueError traceback from palette() after the model was loaded
    _, image = setup
    checkpoint = _checkpoint(tmp_path / "wide.pt", num_classes=300, crf=False)
    assert main([str(image), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "holds a model of 300 classes" in err and "0..255" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_256_classes_still_fit(tmp_path, setup):
    _, image = setup
    checkpoint = _checkpoint(tmp_path / "full.pt", num_classes=256, crf=False)
    assert main([str(image), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "classes.json").read_text())["num_classes"] == 256


# ------------------------------------------------------------------------------------------------------------
# the inputs and the options


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_an_input_that_is_a_fifo_is_named_as_such(tmp_path, setup, capsys):
    # was: "input ... does not exist" for a path that does exist
    checkpoint, _ = setup
    os.mkfifo(tmp_path / "pipe.png")
    assert main([str(tmp_path / "pipe.png"), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]) == 2
    assert f"input {str(tmp_path / 'pipe.png')!r} is neither a file nor a directory" in capsys.readouterr().err
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")  # a dangling link is still "does not exist"
    assert main([str(tmp_path / "gone.png"), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]) == 2
    assert "gone.png' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option, value, message", [
    ("--batch-size", "abc", "argument --batch-size: expected an integer >= 1, got 'abc'"),  # was "_positive_int"
    ("--batch-size", "0", "argument --batch-size: expected an integer >= 1, got '0'"),
    ("--crf-iterations", "2.5", "argument --crf-iterations: expected an integer in 0..1000, got '2.5'"),
])
def test_non_integer_options_name_what_was_expected(tmp_path, setup, capsys, option, value, message):
    checkpoint, image = setup
    with pytest.raises(SystemExit) as exit_:
        main([str(image), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"), option, value])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
# stopping


def test_sigterm_removes_the_file_being_written_and_exits_143(tmp_path, setup):
    # was: killed at once (status -15), leaving the temporary .q.png.<random>.tmp behind in --out
    checkpoint, image = setup
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        from PIL import Image
        from crfrnn_deeplab.predict.cli import main

        def terminated(self, fp, *args, **kwargs):  # SIGTERM halfway through writing the label map
            fp.write(b"\\x89PNG half a file")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)

        Image.Image.save = terminated
        sys.exit(main([{str(image)!r}, "--checkpoint", {str(checkpoint)!r}, "--out", {str(out)!r}]))
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 128 + signal.SIGTERM, run.stderr
    assert "stopped by SIGTERM after 0 of 1 images written" in run.stderr and "Traceback" not in run.stderr
    assert _files(out) == ["classes.json"]  # no truncated q.png, no temporary file


# ------------------------------------------------------------------------------------------------------------
# the library


def test_a_truncated_pil_image_is_a_value_error_naming_it(tmp_path, setup):
    # was: PIL's bare OSError "image file is truncated", naming no image of the list
    _, image = setup
    data = image.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with Image.open(image) as whole, Image.open(tmp_path / "cut.png") as cut:  # PIL decodes lazily: open works
        with pytest.raises(ValueError, match=r"image 1: cannot decode the PIL image \(RGB, 24x20\): .*truncated"):
            to_raw_batch([whole, cut])


def test_a_0_1_image_is_warned_about_by_its_name_first(caplog):
    # the model's own checks (preprocess, the CRF) warn again about their float copies, naming no image
    torch.manual_seed(0)
    model = CRFRNN(network=get_model("deeplabv2_resnet18", num_classes=3, base_width=4),
                   crf=MeanFieldCRF(num_classes=3, eval_iterations=1))
    dark = np.random.default_rng(0).integers(0, 2, (20, 24, 3), dtype=np.uint8)
    with caplog.at_level(logging.WARNING):
        model.predict(torch.tensor(dark).permute(2, 0, 1).float())
    assert caplog.records[0].getMessage() == "image 0 has values of at most 1: expected raw RGB in 0-255, not 0-1"


def test_a_0_1_float_image_file_is_named_in_a_warning(tmp_path, setup, capsys, caplog):
    # was: read as 0-255, so black; the only hint was the models' warnings, which named no file
    checkpoint, _ = setup
    path = tmp_path / "in" / "unit.tif"
    Image.fromarray(np.random.default_rng(0).uniform(0, 1, (20, 24)).astype(np.float32), mode="F").save(path)
    assert main([str(path), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]) == 0
    assert f"warning: {str(path)!r} has pixel values of at most 1 (of 0-255)" in capsys.readouterr().err
    caplog.clear()
    with Image.open(path) as im, caplog.at_level(logging.WARNING):
        to_raw_batch([Image.new("RGB", (4, 4)), im])
    assert [r.getMessage() for r in caplog.records] == [
        "image 1 is a float (mode 'F') image with values of at most 1: expected 0-255, not 0-1"]


@pytest.mark.parametrize("crf", [False, True])
def test_a_network_whose_logits_are_not_finite_is_named_not_segmented(crf):
    # was (crf=False): every pixel labelled 0 from the argmax of NaN, probabilities NaN, no error
    network = get_model("deeplabv2_resnet18", num_classes=3, base_width=4)
    with torch.no_grad():
        for p in network.parameters():
            p.fill_(math.nan)
    model = CRFRNN(network=network, crf=MeanFieldCRF(num_classes=3, eval_iterations=1)) if crf else network
    image = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"the network's logits for 2 image\(s\) hold 2880 NaN or infinite value\(s\) "
                                         r"of 2880 \(the network computes in float32\)"):
        predict(model, [image, image], crf=crf)
