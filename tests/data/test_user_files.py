"""What a user's own files do: label files saved in a way that changes their values, list files with repeated
ids, files an operating system leaves behind, and images whose EXIF tag rotates them. Each case once read wrong
labels or took a file for a sample without saying so, or failed with a message that did not say why."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crfrnn_deeplab.data import (
    CityscapesSegmentation,
    COCOStuffSegmentation,
    DatasetError,
    FolderSegmentation,
    VOCSegmentation,
    voc_colormap,
)
from crfrnn_deeplab.data.io import read_id_list, read_index_png, scan_image_label_pairs
from crfrnn_deeplab.data.registry import scan_files

# macOS writes one of these beside every file it copies to a foreign volume (an "AppleDouble" file)
_APPLE_DOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00" + b"Mac OS X        " + bytes(40)


def _image(path: Path, h: int = 8, w: int = 8, value: int = 90) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)
    return path


def _grey(path: Path, values: np.ndarray, **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values).save(path, **save)
    return path


def _blocks(h: int = 21, w: int = 21, num_classes: int = 21, block: int = 7) -> np.ndarray:
    grid = np.random.default_rng(0).integers(0, num_classes, size=(-(-h // block), -(-w // block)))
    return np.kron(grid, np.ones((block, block), dtype=np.int64))[:h, :w].astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------
# label files
# --------------------------------------------------------------------------------------------------------------


def test_a_jpeg_label_is_refused_by_the_loader_and_the_scan(tmp_path):
    # JPEG's compression changes values near every edge: 0..20 blocks came back with 2 of 3 pixels changed, most
    # of them to other classes in range, which no value check can see
    label = _blocks()
    _grey(tmp_path / "msk" / "x.jpg", label, quality=95)
    image = _image(tmp_path / "img" / "x.png", *label.shape)
    with pytest.raises(DatasetError, match=r"label image '.*x\.jpg' is a JPEG file: its lossy compression"):
        read_index_png(tmp_path / "msk" / "x.jpg")
    with pytest.raises(DatasetError, match=r"label '.*x\.jpg' is a JPEG file"):
        scan_image_label_pairs([image], [tmp_path / "msk" / "x.jpg"])
    ds = FolderSegmentation(tmp_path / "img", tmp_path / "msk", class_names=[str(k) for k in range(21)],
                            mask_suffix=".jpg")
    with pytest.raises(DatasetError, match="is a JPEG file"):
        ds[0]


@pytest.mark.parametrize("bits", [2, 4])
def test_a_2_or_4_bit_greyscale_label_reads_its_stored_values(tmp_path, bits):
    # PIL scales 2- and 4-bit grey samples to 0..255 (3 -> 255 at 2 bits, 15 -> 255 at 4): class 3 became the
    # ignore label, classes 1 and 2 became 85 and 170 (or 17, 34, ...)
    values = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], np.uint8) * (1 if bits == 2 else 5)
    path = _grey(tmp_path / "msk" / "x.png", values, bits=bits)
    with Image.open(path) as im:
        assert im.mode == "L" and im.tile[0].args == f"L;{bits}", "the fixture must be a low-bit-depth PNG"
    read = read_index_png(path)
    assert read.dtype == np.uint8
    np.testing.assert_array_equal(read, values)
    _image(tmp_path / "img" / "x.jpg", 2, 4)
    ds = FolderSegmentation(tmp_path / "img", tmp_path / "msk", class_names=[str(k) for k in range(16)])
    np.testing.assert_array_equal(ds[0]["label"], values)


def test_a_voc_label_whose_palette_was_renumbered_is_refused(tmp_path):
    # a VOC colour mask saved as a palette PNG by quantising (Image.quantize, convert("P", palette=ADAPTIVE))
    # keeps the VOC colours at other indices: person (15) became 1 = aeroplane, the border 255 became 3 = bird
    root = tmp_path / "VOC2012"
    label = np.zeros((8, 8), np.uint8)
    label[2:5, 2:5], label[0], label[6:, 6:] = 15, 255, 3
    _image(root / "JPEGImages" / "x.jpg")
    (root / "SegmentationClass").mkdir(parents=True)
    Image.fromarray(voc_colormap()[label]).quantize(colors=256).save(root / "SegmentationClass" / "x.png")
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("x\n")
    assert set(np.unique(read_index_png(root / "SegmentationClass" / "x.png")).tolist()) <= set(range(21))
    ds = VOCSegmentation(root, split="train")
    with pytest.raises(DatasetError, match=(r"label image '.*x\.png' is a palette image whose index \d+ has the VOC "
                                            r"colour of class (15|3|255) \(\d+, \d+, \d+\): its indices are not")):
        ds[0]


def test_voc_labels_with_the_voc_palette_or_a_grey_one_read_as_indices(tmp_path):
    label = np.zeros((8, 8), np.uint8)
    label[2:5, 2:5], label[0], label[6:, 6:] = 15, 255, 3
    root = tmp_path / "VOC2012"
    _image(root / "JPEGImages" / "x.jpg")
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("x\n")
    grey = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    for palette in (voc_colormap(), grey):
        im = Image.frombytes("P", (8, 8), label.tobytes())
        im.putpalette(palette.ravel().tolist())
        (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        im.save(root / "SegmentationClass" / "x.png")
        np.testing.assert_array_equal(VOCSegmentation(root, split="train")[0]["label"], label)


def test_a_size_mismatch_from_an_exif_rotation_says_so(tmp_path):
    # a phone photo stored 6x10 with "rotate 90°" in EXIF; the mask was drawn on the 10x6 view a viewer shows
    exif = Image.Exif()
    exif[0x0112] = 6
    image = tmp_path / "img" / "x.jpg"
    image.parent.mkdir()
    Image.fromarray(np.full((6, 10, 3), 90, np.uint8)).save(image, exif=exif)
    label = _grey(tmp_path / "msk" / "x.png", np.zeros((10, 6), np.uint8))
    hint = r"size mismatch: .* is 6x10 \(HxW\) .* is 10x6; the image has EXIF orientation 6 .*exif_transpose"
    with pytest.raises(DatasetError, match=hint):
        scan_image_label_pairs([image], [label])
    with pytest.raises(DatasetError, match=hint):
        FolderSegmentation(tmp_path / "img", tmp_path / "msk", class_names=["a", "b"])[0]
    # without the tag, the message stays as it was
    Image.fromarray(np.full((6, 10, 3), 90, np.uint8)).save(image)
    with pytest.raises(DatasetError, match=r"is 10x6$"):
        FolderSegmentation(tmp_path / "img", tmp_path / "msk", class_names=["a", "b"])[0]


# --------------------------------------------------------------------------------------------------------------
# list files
# --------------------------------------------------------------------------------------------------------------


def test_an_id_listed_twice_is_refused(tmp_path):
    # it was read twice: trained on twice as often, and counted twice in a validation split's scores
    path = tmp_path / "train.txt"
    path.write_text("a\r\nb\r\n\r\n a \r\nc\r\nb\r\n")
    with pytest.raises(DatasetError, match=r"train\.txt' lists 2 ids more than once: 'a' \(lines 1 and 4\), 'b' "
                                           r"\(lines 2 and 6\)"):
        read_id_list(path)
    path.write_text("a\n\n  b  \r\nc\n")
    assert read_id_list(path) == ["a", "b", "c"]


# --------------------------------------------------------------------------------------------------------------
# files the operating system leaves behind
# --------------------------------------------------------------------------------------------------------------


def test_hidden_files_are_not_samples(tmp_path):
    # an AppleDouble "._x.png" beside each mask was a sample "._x" (its image "._x.jpg" beside it): the split grew
    # by one unreadable sample per file, found only when it was decoded
    for i in ("x", "y"):
        _image(tmp_path / "img" / f"{i}.jpg")
        _grey(tmp_path / "msk" / f"{i}.png", np.zeros((8, 8), np.uint8))
        (tmp_path / "img" / f"._{i}.jpg").write_bytes(_APPLE_DOUBLE)
        (tmp_path / "msk" / f"._{i}.png").write_bytes(_APPLE_DOUBLE)
    (tmp_path / "msk" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    ds = FolderSegmentation(tmp_path / "img", tmp_path / "msk", class_names=["a", "b"])
    assert ds.ids == ["x", "y"] and scan_files(ds) == 2

    for split in ("images/val2017", "annotations/val2017"):
        (tmp_path / "coco" / split).mkdir(parents=True)
    _image(tmp_path / "coco" / "images" / "val2017" / "1.jpg")
    _grey(tmp_path / "coco" / "annotations" / "val2017" / "1.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "coco" / "images" / "val2017" / "._1.jpg").write_bytes(_APPLE_DOUBLE)
    (tmp_path / "coco" / "annotations" / "val2017" / "._1.png").write_bytes(_APPLE_DOUBLE)
    assert COCOStuffSegmentation(tmp_path / "coco", split="val").ids == ["1"]

    city = tmp_path / "cs"
    _image(city / "leftImg8bit" / "val" / "aachen" / "aachen_0_0_leftImg8bit.png")
    _grey(city / "gtFine" / "val" / "aachen" / "aachen_0_0_gtFine_labelIds.png", np.full((8, 8), 7, np.uint8))
    (city / "leftImg8bit" / "val" / "aachen" / "._aachen_0_0_leftImg8bit.png").write_bytes(_APPLE_DOUBLE)
    (city / "gtFine" / "val" / "aachen" / "._aachen_0_0_gtFine_labelIds.png").write_bytes(_APPLE_DOUBLE)
    _image(city / "leftImg8bit" / "val" / ".ipynb_checkpoints" / "aachen_0_0_leftImg8bit.png")
    ds = CityscapesSegmentation(city, split="val")
    assert ds.ids == ["aachen_0_0"] and scan_files(ds) == 1


# --------------------------------------------------------------------------------------------------------------
# COCO-Stuff folders written by hand or by other toolkits
# --------------------------------------------------------------------------------------------------------------


def _coco(root: Path, ids: dict[str, str]) -> None:
    for i, label_name in ids.items():
        _image(root / "images" / "val2017" / f"{i}.jpg")
        _grey(root / "annotations" / "val2017" / label_name, np.full((8, 8), 3, np.uint8))


def test_a_coco_stuff_annotation_with_an_upper_case_suffix_is_a_sample(tmp_path):
    # "2.PNG" was silently left out of the split
    _coco(tmp_path, {"1": "1.png", "2": "2.PNG"})
    ds = COCOStuffSegmentation(tmp_path, split="val")
    assert ds.ids == ["1", "2"] and ds._labels[1].endswith("2.PNG")
    np.testing.assert_array_equal(ds[1]["label"], np.full((8, 8), 3))
    _grey(tmp_path / "annotations" / "val2017" / "2.png", np.zeros((8, 8), np.uint8))
    if len(list((tmp_path / "annotations" / "val2017").iterdir())) == 3:  # a case-sensitive file system
        with pytest.raises(DatasetError, match=r"which annotation to read is ambiguous .*'2': 2.PNG and 2.png"):
            COCOStuffSegmentation(tmp_path, split="val")


def test_coco_stuff_train_id_maps_beside_the_annotations_are_named(tmp_path):
    # other toolkits write <id>_labelTrainIds.png next to <id>.png; the error only listed the missing images
    _coco(tmp_path, {"1": "1.png"})
    _grey(tmp_path / "annotations" / "val2017" / "1_labelTrainIds.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(FileNotFoundError, match=r"(?s)1_labelTrainIds\.jpg.*1 of the annotations in it are "
                                                r"\*_labelTrainIds\.png files written by another toolkit"):
        COCOStuffSegmentation(tmp_path, split="val")


# --------------------------------------------------------------------------------------------------------------
# binary masks saved as 0 / 255
# --------------------------------------------------------------------------------------------------------------


def test_a_two_class_mask_of_only_0_and_255_is_warned_about(tmp_path, caplog):
    # a binary mask saved as 0 / 255 (how image editors and OpenCV code write them) has its foreground read as the
    # ignore label: a two-class model then learns background alone, without a word
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 2:6] = 255
    _image(tmp_path / "img" / "x.jpg")
    _grey(tmp_path / "msk" / "x.png", mask)
    ds = FolderSegmentation(tmp_path / "img", tmp_path / "msk", class_names=["background", "foreground"])
    with caplog.at_level(logging.WARNING, logger="crfrnn_deeplab.data.folder"):
        np.testing.assert_array_equal(ds[0]["label"], mask)
        ds[0]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, "once a dataset"
    assert "x.png' holds only the values 0 and 255" in warnings[0] and "ignore" in warnings[0]
    caplog.clear()
    mask[0, 0] = 1  # a real class-1 pixel: 255 is then an ignore region, as in VOC
    _grey(tmp_path / "msk" / "x.png", mask)
    with caplog.at_level(logging.WARNING, logger="crfrnn_deeplab.data.folder"):
        FolderSegmentation(tmp_path / "img", tmp_path / "msk", class_names=["background", "foreground"])[0]
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
