"""Prediction: crfrnn_deeplab.predict.api (model.predict) and the command line, python -m crfrnn_deeplab.predict."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from crfrnn_deeplab import CRFRNN, MSC, MeanFieldCRF, get_model
from crfrnn_deeplab.weights.checkpoint import CheckpointError, load_checkpoint, model_entries, save_checkpoint
from crfrnn_deeplab.weights import model_for_checkpoint
from crfrnn_deeplab.data import voc_colormap
from crfrnn_deeplab.data.io import read_image
from crfrnn_deeplab.images import MAX_SCALE
from crfrnn_deeplab.predict.api import MAX_CRF_ITERATIONS, Prediction, predict, to_raw_batch
from crfrnn_deeplab.predict.cli import main, output_names
from train_script import import_train

ROOT = Path(__file__).resolve().parents[2]
NUM_CLASSES = 4


# tests/test_train.py's TINY run, cut to one step per stage on four images (a few seconds on 2 CPU cores).
TINY = [
    "data.image_size=65", "data.crop_size=49", "data.train_images=4", "data.val_images=2",
    "model.options.base_width=8", "crf.train_iterations=2", "crf.eval_iterations=2",
    "stage1.batch_size=4", "stage2.batch_size=4", "stage1.iterations=1", "stage2.iterations=1",
    "eval.batch_size=2", "eval.panels=0", "log_every=1", "grid_search.enabled=false", "threads=2",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A stage-2 (CRF-RNN) checkpoint of a tiny synthetic run."""
    out = tmp_path_factory.mktemp("run")
    assert import_train().main(TINY + [f"out_dir={out}"]) == 0
    return out / "stage2" / "last.pt"


def _random_image(rng, height, width):
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture
def images(tmp_path):
    """A folder of PNG/JPEG/BMP images of different sizes, a corrupt PNG and a text file; a second folder with a
    PNG of the same stem as one in the first."""
    rng = np.random.default_rng(0)
    first, second = tmp_path / "in1", tmp_path / "in2"
    first.mkdir()
    second.mkdir()
    Image.fromarray(_random_image(rng, 40, 52)).save(first / "a.png")
    Image.fromarray(_random_image(rng, 37, 45)).save(first / "b.jpg", quality=95)
    Image.fromarray(_random_image(rng, 33, 30)).save(first / "c.bmp")
    (first / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    (first / "notes.txt").write_text("not an image")
    Image.fromarray(_random_image(rng, 48, 36)).save(second / "a.png")
    return first, second


def _read_labels(path):
    """A palette PNG's index values (uint8 [H, W]) and its palette (uint8 [256, 3])."""
    with Image.open(path) as im:
        assert im.mode == "P"
        return np.asarray(im), np.asarray(im.getpalette(), dtype=np.uint8).reshape(-1, 3)


# ------------------------------------------------------------------------------------------------------------
# the command line


def test_cli_writes_a_label_map_per_image_and_reports_the_corrupt_file(checkpoint, images, tmp_path, capsys):
    first, second = images
    out = tmp_path / "out"
    rc = main(["--checkpoint", str(checkpoint), str(first), str(second), "--out", str(out),
               "--overlay", "--panel", "--probabilities", "--batch-size", "2"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "broken.png" in captured.err and "cannot decode" in captured.err
    assert "4 written, 1 failed" in captured.out  # notes.txt has no image suffix: not an input
    model, _ = model_for_checkpoint(checkpoint)
    names = {"a": first / "a.png", "b": first / "b.jpg", "c": first / "c.bmp", "a_2": second / "a.png"}
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{n}.png" for n in names)
    for name, source in names.items():
        image = read_image(source)
        labels, colours = _read_labels(out / f"{name}.png")
        assert labels.shape == image.shape[:2]
        assert labels.max() < model.num_classes
        np.testing.assert_array_equal(colours[: model.num_classes], voc_colormap(model.num_classes))
        expected = model.predict(image)
        np.testing.assert_array_equal(labels, expected.labels.numpy())
        probabilities = np.load(out / "probabilities" / f"{name}.npy")
        assert probabilities.dtype == np.float16 and probabilities.shape == (model.num_classes, *image.shape[:2])
        np.testing.assert_allclose(probabilities.astype(np.float32), expected.probabilities.numpy(), atol=1e-3)
        with Image.open(out / "overlays" / f"{name}.png") as overlay:
            assert overlay.size == (image.shape[1], image.shape[0])
        assert (out / "panels" / f"{name}.png").is_file()
    classes = json.loads((out / "classes.json").read_text())
    assert classes["class_names"] == load_checkpoint(checkpoint)["class_names"]
    assert classes["num_classes"] == model.num_classes == len(classes["class_names"]) == 6


def test_cli_exit_status_from_a_subprocess(checkpoint, images, tmp_path):
    first, _ = images
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "crfrnn_deeplab.predict", "--checkpoint", str(checkpoint), str(first / "a.png"),
         str(first / "broken.png"), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 1, run.stderr
    assert str(first / "broken.png") in run.stderr
    assert "1 written, 1 failed" in run.stdout
    labels, _ = _read_labels(out / "a.png")
    assert labels.shape == (40, 52)


def test_cli_no_crf_writes_the_network_argmax(checkpoint, images, tmp_path):
    first, _ = images
    out = tmp_path / "out"
    assert main(["--checkpoint", str(checkpoint), str(first / "b.jpg"), "--out", str(out), "--no-crf"]) == 0
    model, _ = model_for_checkpoint(checkpoint)
    network = model.network.eval()
    raw = torch.tensor(read_image(first / "b.jpg")).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        expected = network(network.preprocess(raw))[0].argmax(0)
    labels, _ = _read_labels(out / "b.png")
    np.testing.assert_array_equal(labels, expected.numpy())


def test_cli_never_overwrites_an_input(checkpoint, images):
    first, _ = images
    before = (first / "a.png").read_bytes()
    assert main(["--checkpoint", str(checkpoint), str(first), "--out", str(first)]) == 2
    assert (first / "a.png").read_bytes() == before
    assert not (first / "classes.json").exists()


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_cli_refuses_to_overwrite_existing_outputs(checkpoint, images, tmp_path, capsys):
    first, _ = images
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"someone else's file")  # an unrelated file with an output's name
    before = _snapshot(out)
    assert main(["--checkpoint", str(checkpoint), str(first), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "a.png' already exists; pass --overwrite" in err and err.count("\n") == 1  # one line, no traceback
    assert _snapshot(out) == before
    assert main(["--checkpoint", str(checkpoint), str(first), "--out", str(out), "--overwrite"]) == 1  # broken.png
    assert (out / "a.png").read_bytes() != b"someone else's file"
    again = _snapshot(out)
    assert main(["--checkpoint", str(checkpoint), str(first), "--out", str(out)]) == 2  # a second run: refused
    assert _snapshot(out) == again


def test_cli_out_that_is_a_file(checkpoint, images, tmp_path, capsys):
    first, _ = images
    (tmp_path / "out").write_text("not a directory")
    assert main(["--checkpoint", str(checkpoint), str(first), "--out", str(tmp_path / "out")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert (tmp_path / "out").read_text() == "not a directory"


def test_cli_missing_checkpoint_is_exit_status_2(images, tmp_path, capsys):
    first, _ = images
    assert main(["--checkpoint", str(tmp_path / "nope.pt"), str(first), "--out", str(tmp_path / "out")]) == 2
    assert "nope.pt" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_output_names_get_a_suffix_when_stems_collide():
    paths = [Path("x/a.png"), Path("y/a.jpg"), Path("z/A.png"), Path("x/a_2.png"), Path("x/b.png")]
    assert output_names(paths) == ["a", "a_2", "A_3", "a_2_2", "b"]


# ------------------------------------------------------------------------------------------------------------
# the library


def _network(seed=0):
    torch.manual_seed(seed)
    return get_model("deeplabv2_resnet18", num_classes=NUM_CLASSES, base_width=8)


def _crfrnn(seed=0):
    return CRFRNN(network=_network(seed), crf=MeanFieldCRF(num_classes=NUM_CLASSES, eval_iterations=2))


MODELS = {"deeplab": _network, "msc": lambda: MSC(model=_network()), "crfrnn": _crfrnn}


@pytest.fixture
def raws():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in ((24, 30), (17, 21), (24, 30))]


@pytest.mark.parametrize("kind", ["deeplab", "msc", "crfrnn"])
def test_a_mixed_size_batch_gives_each_image_its_own_prediction(kind, raws):
    model = MODELS[kind]()
    together = predict(model, raws, batch_size=3)
    assert len(together) == 3
    for raw, p in zip(raws, together):
        alone = model.predict(raw)
        assert isinstance(alone, Prediction)
        assert p.labels.shape == raw.shape[1:] and p.probabilities.shape == (NUM_CLASSES, *raw.shape[1:])
        torch.testing.assert_close(p.probabilities, alone.probabilities, atol=1e-5, rtol=0)
        torch.testing.assert_close(p.probabilities.sum(0), torch.ones(raw.shape[1:]))
        assert torch.equal(p.labels, p.probabilities.argmax(0))
        assert (p.network_labels is not None) == (kind == "crfrnn")


def test_numpy_pil_and_tensor_inputs_give_the_same_prediction(raws):
    model = _network()
    raw = raws[0]
    hwc = raw.permute(1, 2, 0).numpy()
    expected = model.predict(hwc)
    for image in (Image.fromarray(hwc), raw, raw.float(), raw.double()):
        p = model.predict(image)
        assert isinstance(p, Prediction)
        assert torch.equal(p.labels, expected.labels)
        torch.testing.assert_close(p.probabilities, expected.probabilities)
    batch = model.predict(torch.stack([raw, raw]).float())
    assert isinstance(batch, list) and len(batch) == 2
    assert all(torch.equal(p.labels, expected.labels) for p in batch)
    assert [r.shape for r in to_raw_batch([hwc, Image.fromarray(hwc).convert("L")])] == [raw.shape, raw.shape]


def test_test_time_augmentation_averages_the_logits(raws):
    model = _crfrnn()
    raw = raws[1][None].float()
    network = model.network.eval()
    with torch.no_grad():
        x = network.preprocess(raw)
        half = tuple((s - 1) // 2 + 1 for s in raw.shape[-2:])  # DeepLab v2's floor((S - 1) * s) + 1
        small = F.interpolate(x, size=half, mode="bilinear", align_corners=False)

        def back(z):
            return F.interpolate(z, size=raw.shape[-2:], mode="bilinear", align_corners=False)

        passes = [network(x), network(x.flip(-1)).flip(-1), back(network(small)), back(network(small.flip(-1)).flip(-1))]
        logits = sum(passes) / 4
        crf_logits = model.crf.eval()(logits, raw)
    p = model.predict(raws[1], flip=True, scales=(1.0, 0.5))
    torch.testing.assert_close(p.probabilities, crf_logits[0].softmax(0), atol=1e-5, rtol=0)
    assert torch.equal(p.network_labels, logits[0].argmax(0))
    network_only = model.predict(raws[1], flip=True, scales=(1.0, 0.5), crf=False)
    torch.testing.assert_close(network_only.probabilities, logits[0].softmax(0), atol=1e-5, rtol=0)
    assert network_only.network_labels is None
    assert not torch.equal(p.probabilities, network_only.probabilities)  # the CRF did run


def test_predict_restores_the_model_state_and_honours_crf_iterations(raws):
    model = _crfrnn().train()
    model.network.backbone.eval()  # a mixed state must come back as it was
    modes = {name: m.training for name, m in model.named_modules()}
    zero = model.predict(raws[0], crf_iterations=0)  # no mean-field step: the CRF returns the network's logits
    assert torch.equal(zero.labels, zero.network_labels)
    several = model.predict(raws[0])
    assert not torch.equal(several.labels, several.network_labels)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert model.crf.eval_iterations == 2
    assert all(p.grad is None for p in model.parameters())
    double = model.double().predict(raws[0])  # the model's own dtype
    torch.testing.assert_close(double.probabilities, several.probabilities, atol=1e-4, rtol=0)


@pytest.mark.parametrize("image, error, match", [
    (np.zeros((20, 20, 3), np.float32), TypeError, "uint8"),
    (np.zeros((20, 20), np.uint8), ValueError, "greyscale"),
    (np.zeros((20, 20, 4), np.uint8), ValueError, "RGBA"),
    (np.zeros((3, 20, 20), np.uint8), ValueError, "channels first"),
    (torch.zeros(3, 20, 20, dtype=torch.complex64), TypeError, "complex64"),
    (torch.zeros(3, 20, 20, dtype=torch.bool), TypeError, "bool"),
    (torch.full((3, 20, 20), 1000, dtype=torch.int32), ValueError, "above 255.*16-bit"),
    (torch.zeros(4, 20, 20), ValueError, "3 \\(RGB\\) channels"),
    (torch.zeros(20, 20, 3), ValueError, "permute"),
    (torch.zeros(20, 20), ValueError, "shape \\(3, H, W\\)"),
    (torch.full((3, 20, 20), -1.0), ValueError, "0-255"),
    (torch.full((3, 20, 20), 300.0), ValueError, "0-255"),
    (torch.full((3, 20, 20), float("nan")), ValueError, "NaN"),
    (torch.zeros(3, 0, 20), ValueError, "empty"),
    ("image.png", TypeError, "str"),
    ([], ValueError, "at least one image"),
    ([np.zeros((20, 20, 3), np.uint8), 7], TypeError, "image 1"),
])
def test_bad_images_raise_clear_errors(image, error, match):
    with pytest.raises(error, match=match):
        to_raw_batch(image)


def test_bad_options_raise_clear_errors(raws):
    network, model = _network(), _crfrnn()
    with pytest.raises(ValueError, match="too small"):
        network.predict(torch.zeros(3, 5, 40))
    with pytest.raises(ValueError, match="at scale 0.5"):
        network.predict(torch.zeros(3, 12, 40), scales=(1.0, 0.5))
    with pytest.raises(ValueError, match="no CRF"):
        network.predict(raws[0], crf_iterations=2)
    with pytest.raises(ValueError, match="crf=False"):
        model.predict(raws[0], crf=False, crf_iterations=2)
    with pytest.raises(ValueError, match="scales"):
        model.predict(raws[0], scales=())
    with pytest.raises(ValueError, match="batch_size"):
        model.predict(raws[0], batch_size=0)
    with pytest.raises(TypeError, match="DeepLabV2, MSC or CRFRNN"):
        predict(torch.nn.Conv2d(3, 4, 1), raws[0])


# ------------------------------------------------------------------------------------------------------------
# hostile inputs: no lost file, no silent wrong result, one clear error


def _tiny_checkpoint(path, *, model=None):
    """A CRF-RNN checkpoint of :func:`_crfrnn` (no training: milliseconds), optionally of another ``model``."""
    model = _crfrnn() if model is None else model
    return save_checkpoint(path, model_entries(
        model, name="deeplabv2_resnet18", num_classes=NUM_CLASSES, options={"base_width": 8},
        crf={"eval_iterations": 2}, class_names=None))


@pytest.fixture
def one_image(tmp_path):
    """in/q.png, a 20 x 24 RGB image, and its bytes."""
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / "q.png"
    Image.fromarray(_random_image(np.random.default_rng(1), 20, 24)).save(path)
    return path, path.read_bytes()


def test_overwrite_replaces_a_hard_link_to_an_input_without_writing_into_the_input(tmp_path, one_image):
    source, before = one_image
    checkpoint = _tiny_checkpoint(tmp_path / "ck.pt")
    out = tmp_path / "out"
    out.mkdir()
    os.link(source, out / "q.png")  # the output's name is another name of the input file
    assert main([str(source), "--checkpoint", str(checkpoint), "--out", str(out), "--overwrite"]) == 0
    assert source.read_bytes() == before
    labels, _ = _read_labels(out / "q.png")
    assert labels.shape == (20, 24) and not os.path.samefile(source, out / "q.png")


def test_overwrite_replaces_a_symlink_not_its_target(tmp_path, one_image):
    source, _ = one_image
    checkpoint = _tiny_checkpoint(tmp_path / "ck.pt")
    elsewhere = tmp_path / "elsewhere.png"
    elsewhere.write_bytes(b"a file outside --out")
    out = tmp_path / "out"
    out.mkdir()
    (out / "q.png").symlink_to(elsewhere)
    (out / "classes.json").symlink_to(elsewhere)
    assert main([str(source), "--checkpoint", str(checkpoint), "--out", str(out), "--overwrite"]) == 0
    assert elsewhere.read_bytes() == b"a file outside --out"
    assert not (out / "q.png").is_symlink() and not (out / "classes.json").is_symlink()
    assert _read_labels(out / "q.png")[0].shape == (20, 24)
    assert json.loads((out / "classes.json").read_text())["num_classes"] == NUM_CLASSES


def test_a_dangling_symlink_is_an_existing_output(tmp_path, one_image, capsys):
    source, _ = one_image
    checkpoint = _tiny_checkpoint(tmp_path / "ck.pt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "q.png").symlink_to(tmp_path / "nowhere.png")  # writing through it would create a file outside --out
    assert main([str(source), "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert not (tmp_path / "nowhere.png").exists()


def test_an_interrupted_write_leaves_no_truncated_output(tmp_path, one_image, monkeypatch, capsys):
    source, _ = one_image
    checkpoint = _tiny_checkpoint(tmp_path / "ck.pt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "q.png").write_bytes(b"the previous output")

    def interrupted(self, fp, *args, **kwargs):  # Ctrl-C halfway through PIL's writing of the label map
        if isinstance(fp, (str, os.PathLike)):
            with open(fp, "wb") as f:
                f.write(b"\x89PNG half a file")
        else:
            fp.write(b"\x89PNG half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted)
    # Ctrl-C was a bare KeyboardInterrupt traceback; now one line and status 130 (128 + SIGINT), as train.py
    assert main([str(source), "--checkpoint", str(checkpoint), "--out", str(out), "--overwrite"]) == 130
    err = capsys.readouterr().err
    assert "stopped by SIGINT after 0 of 1 images written" in err and "Traceback" not in err
    assert (out / "q.png").read_bytes() == b"the previous output"
    assert sorted(p.name for p in out.iterdir()) == ["classes.json", "q.png"]  # no temporary file left behind


def test_a_checkpoint_with_nan_weights_is_refused_at_load(tmp_path, one_image, capsys):
    model = _crfrnn()
    with torch.no_grad():
        model.crf.spatial_weight.fill_(float("nan"))
        model.network.backbone.bn1.running_var[0] = float("inf")
    checkpoint = _tiny_checkpoint(tmp_path / "nan.pt", model=model)
    with pytest.raises(CheckpointError, match=r"NaN or infinite values in 2 tensor\(s\).*crf\.spatial_weight "
                                              rf"\({NUM_CLASSES ** 2} of {NUM_CLASSES ** 2} values\)"):
        model_for_checkpoint(checkpoint)
    source, _ = one_image
    out = tmp_path / "out"
    assert main([str(source), "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "crf.spatial_weight" in err and "running_var (1 of 8 values)" in err and err.count("\n") == 1
    assert not out.exists()


def test_an_image_over_the_decompression_bomb_limit_is_reported_and_skipped(tmp_path, one_image, monkeypatch,
                                                                             capsys):
    source, _ = one_image
    checkpoint = _tiny_checkpoint(tmp_path / "ck.pt")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(source.parent / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # q.png (480 pixels) passes; 1600 > 2 x 500 is a bomb
    assert main([str(source.parent), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]) == 1
    captured = capsys.readouterr()
    assert "big.png" in captured.err and "decompression bomb" in captured.err
    assert "1 written, 1 failed" in captured.out and (tmp_path / "out" / "q.png").is_file()


def test_a_flipped_numpy_view_is_accepted(raws):
    model = _network()
    hwc = raws[0].permute(1, 2, 0).numpy()
    flipped = model.predict(hwc[:, ::-1])  # negative strides
    assert torch.equal(flipped.labels, model.predict(hwc[:, ::-1].copy()).labels)


@pytest.mark.parametrize("scales", [(1e300,), (1.0, MAX_SCALE * 2)])
def test_a_huge_scale_is_a_clear_error(raws, scales):
    with pytest.raises(ValueError, match=rf"scales must be at most {MAX_SCALE:g}"):
        _network().predict(raws[0], scales=scales)


def test_cli_huge_scale_and_crf_iterations_are_usage_errors(tmp_path, one_image, capsys):
    source, _ = one_image
    checkpoint = _tiny_checkpoint(tmp_path / "ck.pt")
    for option, value, message in [("--scales", "1,1e300", "scales must be at most"),
                                   ("--crf-iterations", "1000000000", f"0..{MAX_CRF_ITERATIONS}")]:
        with pytest.raises(SystemExit) as exit_:
            main([str(source), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"), option, value])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device, match", [
    ("meta", "meta tensors hold no data"),
    ("cuda:99", "not available|does not exist"),
    ("nonsense", "not a torch device"),
])
def test_an_unusable_device_is_refused_before_anything_moves_or_is_written(raws, tmp_path, one_image, capsys,
                                                                            device, match):
    model = _crfrnn()
    with pytest.raises(ValueError, match=match):
        model.predict(raws[0], device=device)
    assert all(p.device.type == "cpu" for p in model.parameters())
    source, _ = one_image
    checkpoint = _tiny_checkpoint(tmp_path / "ck.pt")
    assert main([str(source), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"), "--device", device]) == 2
    assert "--device" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_model_on_the_meta_device_is_refused(raws):
    with torch.device("meta"):
        model = _network()
    with pytest.raises(ValueError, match="meta device"):
        model.predict(raws[0])
    with pytest.raises(ValueError, match="image 0 is a meta tensor"):  # and an image on it
        _network().predict(torch.zeros(3, 20, 24, device="meta"))


def test_numpy_integers_are_accepted_and_non_bools_refused(raws):
    model = _crfrnn()
    expected = model.predict(raws[0], crf_iterations=1)
    p = model.predict(raws[0], crf_iterations=np.int64(1), batch_size=np.int32(2))
    assert torch.equal(p.probabilities, expected.probabilities)
    assert model.crf.eval_iterations == 2 and type(model.crf.eval_iterations) is int
    assert torch.equal(model.predict(raws[0], crf=np.bool_(False)).labels, model.predict(raws[0], crf=False).labels)
    for option, value, error, match in [
        ("crf", "no", TypeError, "crf must be True or False, got str 'no'"),
        ("flip", 1, TypeError, "flip must be True or False, got int 1"),
        ("batch_size", True, TypeError, "batch_size must be an int, got bool"),
        ("batch_size", 2.0, TypeError, "batch_size must be an int, got float"),
        ("crf_iterations", "3", TypeError, "crf_iterations must be an int, got str"),
        ("crf_iterations", -1, ValueError, rf"crf_iterations must be an int in 0..{MAX_CRF_ITERATIONS}, got -1"),
        ("crf_iterations", 10**9, ValueError, rf"0..{MAX_CRF_ITERATIONS}, got 1000000000"),
    ]:
        with pytest.raises(error, match=match):
            model.predict(raws[0], **{option: value})
