"""The pictures of predictions: the class palette, colorize, make_panel and save_panel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from crfrnn_deeplab.data import voc_colormap
from crfrnn_deeplab.visualize import colorize, make_panel, palette, save_panel


def test_the_ignore_index_is_drawn_white():
    colours = palette(3, ignore_index=0)
    assert colours.shape == (256, 3) and colours.dtype == np.uint8
    np.testing.assert_array_equal(colours[0], [255, 255, 255])
    np.testing.assert_array_equal(colours[1:], voc_colormap()[1:])


@pytest.mark.parametrize("kwargs, error, match", [
    # 300 was a bare IndexError; -1 silently drew entry 255 white
    ({"ignore_index": 300}, ValueError,
     r"ignore_index must be in 0\.\.255 \(an entry of the 256-colour map\), got 300"),
    ({"ignore_index": -1}, ValueError, r"ignore_index must be in 0\.\.255 .*, got -1"),
    ({"ignore_index": 1.5}, TypeError, r"ignore_index must be an int, got float 1.5"),
    ({"ignore_index": True}, TypeError, r"ignore_index must be an int, got bool True"),
    ({"num_classes": 0}, ValueError, r"num_classes must be in 1\.\.256, got 0"),
    ({"num_classes": "3"}, TypeError, r"num_classes must be an int, got str '3'"),
])
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        palette(**{"num_classes": 3, **kwargs})


# ------------------------------------------------------------------------------------------------------------
# colorize, make_panel and save_panel against hostile inputs: each was a silently wrong picture or an obscure
# error (IndexError, PIL's "Cannot handle this data type", "unknown file extension") before its fix


def test_colorize_keeps_valid_indices_and_draws_minus_one_in_the_ignore_colour():
    colours = palette(21)
    label = np.arange(-1, 255).reshape(16, 16)
    np.testing.assert_array_equal(colorize(label, colours), colours[label % 256])
    np.testing.assert_array_equal(colorize(torch.tensor([[True, False]]), colours), colours[[[1, 0]]])
    np.testing.assert_array_equal(colorize(np.array([[-1]]), colours)[0, 0], [255, 255, 255])


@pytest.mark.parametrize("label, colours, error, match", [
    # was: 300 silently drawn in class 44's colour, 1.7 as class 1, NaN as an arbitrary class
    (np.array([[0, 300]]), None, ValueError, r"indices in \[0, 300\], outside the 256-colour palette \(-256\.\.255\)"),
    (np.array([[-257]]), None, ValueError, r"outside the 256-colour palette"),
    (np.array([[1.7]]), None, TypeError, r"integer class indices, got dtype float64"),
    (torch.full((2, 2), float("nan")), None, TypeError, r"integer class indices, got dtype float32"),
    # was: IndexError, or a float palette that PIL could not draw
    (np.zeros((2, 2), np.int64), np.zeros((0, 3), np.uint8), ValueError, r"empty palette"),
    (np.zeros((2, 2), np.int64), palette(3) / 255.0, TypeError, r"uint8 \[N, 3\] palette.*float64"),
])
def test_colorize_refuses_what_it_would_draw_wrongly(label, colours, error, match):
    with pytest.raises(error, match=match):
        colorize(label, palette(3) if colours is None else colours)


IMAGE = np.zeros((4, 5, 3), np.uint8)
LABEL = np.zeros((4, 5), np.int64)


@pytest.mark.parametrize("row, error, match", [
    # was: a normalised network input or NaN silently drawn black; a channels-first array drawn as garbage
    ([torch.full((3, 4, 5), -1.5), LABEL], ValueError, r"row 0 image has negative values"),
    ([torch.full((3, 4, 5), float("nan")), LABEL], ValueError, r"row 0 image contains NaN"),
    ([np.zeros((3, 4, 5), np.uint8), LABEL], ValueError, r"row 0 image must be .*channels first"),
    ([IMAGE.astype(np.float32), LABEL], TypeError, r"row 0 image must be a uint8 RGB array"),
    # was: PIL's "Cannot handle this data type: (1, 1, 4, 5), |u1"
    ([torch.zeros(1, 3, 4, 5), LABEL], ValueError, r"row 0 image must be a raw RGB Tensor\[3, H, W\]"),
    ([IMAGE, np.zeros((1, 4, 5), np.int64)], ValueError, r"row 0, entry 1 \('label'\): a label map must be \[H, W\]"),
])
def test_make_panel_refuses_images_it_would_draw_wrongly(row, error, match):
    with pytest.raises(error, match=match):
        make_panel([row], titles=["image", "label"], colours=palette(3))


def test_make_panel_draws_a_raw_tensor_as_before():
    raw = torch.arange(3 * 4 * 5, dtype=torch.float32).reshape(3, 4, 5) * 4  # 0..236, RGB 0-255
    panel = np.asarray(make_panel([[raw, LABEL]], titles=["image", "label"], colours=palette(3), gap=0))
    np.testing.assert_array_equal(panel[14:18, :5], raw.permute(1, 2, 0).numpy().astype(np.uint8))


@pytest.mark.parametrize("rows, titles, gap, error, match", [
    ([[]], [], 4, ValueError, r"titles must name at least one column"),  # was: IndexError
    ([[IMAGE, LABEL], [IMAGE]], ["image", "label"], 4, ValueError, r"every row needs 2 entries .* row 1 has 1"),
    ([[IMAGE, LABEL]], ["image", "label"], -5, ValueError, r"gap must be >= 0 .*got -5"),  # was: PIL's error
    ([[IMAGE, LABEL]], ["image", "label"], 2.5, TypeError, r"gap must be an int, got float 2.5"),
])
def test_make_panel_names_bad_arguments(rows, titles, gap, error, match):
    with pytest.raises(error, match=match):
        make_panel(rows, titles=titles, colours=palette(3), gap=gap)


def test_save_panel_writes_a_png_whole_or_not_at_all(tmp_path, monkeypatch):
    rows = [[IMAGE, LABEL]]
    path = save_panel(tmp_path / "panels" / "p.png", rows, titles=["image", "label"], num_classes=3)
    with Image.open(path) as im:
        assert im.format == "PNG"
    before = path.read_bytes()

    def interrupted(self, fp, *args, **kwargs):  # was: Image.save(path) straight onto the name, truncated
        fp.write(b"\x89PNG half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_panel(path, rows, titles=["image", "label"], num_classes=3)
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == ["p.png"]


@pytest.mark.parametrize("name, match", [
    ("panel", r"must end in \.png, got '.*panel'"),  # was: PIL's "unknown file extension: "
    ("panel.jpg", r"must end in \.png"),  # was: a JPEG, where the docstring promises a PNG
    ("dir.png", r"panel path '.*dir\.png' is a directory"),  # was: IsADirectoryError
    ("file/p.png", r"'.*file' is not a directory"),  # was: FileExistsError from mkdir
])
def test_save_panel_names_a_path_it_cannot_write(tmp_path, name, match):
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "file").write_text("a file")
    with pytest.raises(ValueError, match=match):
        save_panel(tmp_path / name, [[IMAGE, LABEL]], titles=["image", "label"], num_classes=3)
    assert (tmp_path / "file").read_text() == "a file" and sorted(p.name for p in tmp_path.iterdir()) == [
        "dir.png", "file"]
