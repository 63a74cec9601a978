"""Dataset readers against tiny on-disk copies of each real layout, written under ``tmp_path``."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from crfrnn_deeplab.data import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_LABEL_TO_TRAIN_ID,
    COCO_STUFF_CLASSES,
    VOC_CLASSES,
    CityscapesSegmentation,
    COCOStuffSegmentation,
    DatasetError,
    FolderSegmentation,
    SBDSegmentation,
    VOCAugSegmentation,
    VOCSegmentation,
    cityscapes_label_ids_to_train_ids,
    train_aug_ids,
    voc_colormap,
)
from crfrnn_deeplab.models.conventions import TORCHVISION_CONVENTION
from crfrnn_deeplab.data.transforms import TrainTransform

# --------------------------------------------------------------------------------------------------------------
# fixture writers
# --------------------------------------------------------------------------------------------------------------


def _smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth RGB image (JPEG keeps it within a few grey levels)."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.uniform(40, 200, size=3)
    img = base + 30 * np.sin(yy[..., None] / 9.0 + rng.uniform(0, 6, 3)) + 30 * np.cos(xx[..., None] / 13.0)
    return np.clip(img, 0, 255).astype(np.uint8)


def _class_blocks(rng: np.random.Generator, h: int, w: int, num_classes: int, block: int = 6) -> np.ndarray:
    grid = rng.integers(0, num_classes, size=(-(-h // block), -(-w // block)))
    return np.kron(grid, np.ones((block, block), dtype=np.int64))[:h, :w].astype(np.uint8)


def _write_jpg(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=98)


def _write_png(path: Path, array: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Greyscale / RGB PNG of ``array``, or a palette PNG of indices ``array`` when ``palette`` is given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette is not None:
        im = Image.frombytes("P", array.shape[::-1], np.ascontiguousarray(array, dtype=np.uint8).tobytes())
        im.putpalette(palette.ravel().tolist())
    else:
        im = Image.fromarray(array)
    im.save(path)


def _voc_label(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Class blocks with a 255 band along the block edges, like VOC's object borders."""
    label = _class_blocks(rng, h, w, 21)
    border = np.zeros((h, w), dtype=bool)
    border[:, 1:] |= label[:, 1:] != label[:, :-1]
    border[1:] |= label[1:] != label[:-1]
    label[border] = 255
    return label


def _write_sbd_mat(path: Path, seg: np.ndarray) -> None:
    """A ``cls/*.mat`` in the real SBD layout: struct GTcls {Boundaries (cell of sparse), Segmentation, ...}."""
    boundaries = np.empty((20, 1), dtype=object)
    for k in range(20):
        boundaries[k, 0] = scipy.sparse.csc_matrix((seg == k + 1).astype(np.float64))
    present = np.unique(seg[(seg > 0) & (seg < 255)]).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"GTcls": {"Boundaries": boundaries, "Segmentation": seg, "CategoriesPresent": present}})


def make_voc(root: Path, rng: np.random.Generator, splits: dict[str, list[str]]) -> dict[str, tuple]:
    """VOCdevkit/VOC2012 layout; returns {id: (image, label)} of what was written."""
    written = {}
    all_ids = sorted({i for ids in splits.values() for i in ids})
    for k, i in enumerate(all_ids):
        h, w = 30 + 2 * k, 40 - k
        image, label = _smooth_image(rng, h, w), _voc_label(rng, h, w)
        _write_jpg(root / "JPEGImages" / f"{i}.jpg", image)
        _write_png(root / "SegmentationClass" / f"{i}.png", label, palette=voc_colormap())
        written[i] = (image, label)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return written


def make_sbd(root: Path, rng: np.random.Generator, splits: dict[str, list[str]]) -> dict[str, tuple]:
    written = {}
    for k, i in enumerate(sorted({i for ids in splits.values() for i in ids})):
        h, w = 28 + k, 33
        image, seg = _smooth_image(rng, h, w), _class_blocks(rng, h, w, 21)
        _write_jpg(root / "img" / f"{i}.jpg", image)
        _write_sbd_mat(root / "cls" / f"{i}.mat", seg)
        written[i] = (image, seg)
    for split, ids in splits.items():
        (root / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return written


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def voc(tmp_path, rng):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    splits = {"train": ["2007_000032", "2007_000039"], "val": ["2007_000033"]}
    splits["trainval"] = splits["train"] + splits["val"]
    return root, make_voc(root, rng, splits)


def _assert_close_image(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == np.uint8 and actual.shape == expected.shape
    assert np.abs(actual.astype(int) - expected).mean() < 3  # JPEG round trip


# --------------------------------------------------------------------------------------------------------------
# PASCAL VOC 2012
# --------------------------------------------------------------------------------------------------------------


def test_voc_colormap_known_entries():
    cmap = voc_colormap()
    assert cmap.shape == (256, 3) and cmap.dtype == np.uint8
    assert cmap[0].tolist() == [0, 0, 0]
    assert cmap[1].tolist() == [128, 0, 0]
    assert cmap[2].tolist() == [0, 128, 0]
    assert cmap[15].tolist() == [192, 128, 128]  # person
    assert cmap[255].tolist() == [224, 224, 192]  # the border colour


def test_voc_reads_palette_indices_exactly(voc):
    root, written = voc
    ds = VOCSegmentation(root, split="train")
    assert ds.ids == ["2007_000032", "2007_000039"]
    assert ds.num_classes == 21 and ds.class_names == VOC_CLASSES and ds.ignore_index == 255
    for i in range(len(ds)):
        sample = ds[i]
        image, label = written[sample["id"]]
        assert sample["label"].dtype == np.uint8
        np.testing.assert_array_equal(sample["label"], label)  # indices, 255 border kept
        _assert_close_image(sample["image"], image)
    # the fixture really is a palette PNG: its RGB rendering is the VOC colour of each index
    png = root / "SegmentationClass" / "2007_000032.png"
    with Image.open(png) as im:
        assert im.mode == "P"
        rgb = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(rgb, voc_colormap()[written["2007_000032"][1]])
    assert (written["2007_000032"][1] == 255).any()


def test_voc_splits(voc):
    root, _ = voc
    assert VOCSegmentation(root, split="val").ids == ["2007_000033"]
    assert len(VOCSegmentation(root, split="trainval")) == 3


def test_voc_missing_root_names_path_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)VOC root .*nowhere.* does not exist.*JPEGImages"):
        VOCSegmentation(tmp_path / "nowhere")


@pytest.mark.parametrize("root, error, match", [
    (3, TypeError, r"VOC root must be a str or os\.PathLike, got int 3"),
    ("", ValueError, r"VOC root must not be empty \(it would mean the current directory\)"),
])
def test_a_root_that_is_not_a_path_is_named(root, error, match):
    with pytest.raises(error, match=match):
        VOCSegmentation(root)
    with pytest.raises(error, match=match.replace("VOC", "COCO-Stuff")):
        COCOStuffSegmentation(root)


def test_voc_missing_split_file(voc):
    root, _ = voc
    with pytest.raises(FileNotFoundError, match=r"(?s)'test' split file .*test\.txt.*ImageSets/Segmentation"):
        VOCSegmentation(root, split="test")


def test_voc_missing_listed_image(voc):
    root, _ = voc
    (root / "JPEGImages" / "2007_000039.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"(?s)1 of 2 images .* missing.*2007_000039\.jpg"):
        VOCSegmentation(root, split="train")


def test_voc_empty_split(voc):
    root, _ = voc
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n\n")
    with pytest.raises(DatasetError, match="holds no image ids"):
        VOCSegmentation(root, split="train")


def test_voc_malformed_split_line(voc):
    root, _ = voc
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("a.jpg a.png\n")
    with pytest.raises(DatasetError, match="line 1: expected one image id per line"):
        VOCSegmentation(root, split="train")


def test_corrupt_image_names_file(voc):
    root, _ = voc
    bad = root / "JPEGImages" / "2007_000032.jpg"
    bad.write_bytes(b"this is not a jpeg")
    ds = VOCSegmentation(root, split="train")
    with pytest.raises(DatasetError, match=r"cannot decode image .*2007_000032\.jpg"):
        ds[0]
    with pytest.raises(DatasetError, match="2007_000032"):
        ds.verify()


def test_truncated_image_names_file(voc):
    root, _ = voc
    path = root / "JPEGImages" / "2007_000039.jpg"
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DatasetError, match=r"cannot decode image .*2007_000039\.jpg"):
        VOCSegmentation(root, split="train")[1]


def test_size_mismatch_names_files_and_sizes(voc):
    root, written = voc
    image = written["2007_000032"][0]
    _write_jpg(root / "JPEGImages" / "2007_000032.jpg", image[:-5])
    h, w = image.shape[:2]
    with pytest.raises(DatasetError, match=rf"size mismatch: image .*2007_000032\.jpg' is {h - 5}x{w} .* is {h}x{w}"):
        VOCSegmentation(root, split="train")[0]


def test_out_of_range_labels_name_file_and_values(voc):
    root, written = voc
    label = written["2007_000032"][1].copy()
    label[0, 0], label[1, 1] = 21, 77
    _write_png(root / "SegmentationClass" / "2007_000032.png", label, palette=voc_colormap())
    expected = r"2007_000032\.png' holds values \[21, 77\] outside the class range 0\.\.20"
    with pytest.raises(DatasetError, match=expected):
        VOCSegmentation(root, split="train")[0]


def test_rgb_label_png_is_rejected(voc):
    root, written = voc
    label = written["2007_000032"][1]
    Image.fromarray(voc_colormap()[label]).save(root / "SegmentationClass" / "2007_000032.png")
    with pytest.raises(DatasetError, match=r"has mode 'RGB'; expected a palette"):
        VOCSegmentation(root, split="train")[0]


def test_non_callable_transform(voc):
    with pytest.raises(TypeError, match="transform must be callable"):
        VOCSegmentation(voc[0], transform="flip")


def test_transform_is_applied(voc):
    ds = VOCSegmentation(voc[0], transform=lambda s: (s["id"], s["label"].shape))
    assert ds[0] == ("2007_000032", (30, 40))


# --------------------------------------------------------------------------------------------------------------
# SBD and train_aug
# --------------------------------------------------------------------------------------------------------------


def test_train_aug_ids_list_arithmetic():
    voc_train = ["a", "b", "c"]
    voc_val = ["d", "e"]
    sbd_train = ["c", "d", "f", "g"]  # d is VOC val: excluded even though SBD labels it
    sbd_val = ["e", "h", "a"]
    assert train_aug_ids(voc_train, voc_val, sbd_train, sbd_val) == ["a", "b", "c", "f", "g", "h"]
    assert train_aug_ids([], [], [], []) == []
    assert train_aug_ids(["x", "x"], [], ["x"], []) == ["x"]


def test_sbd_mat_in_real_layout_read_exactly(tmp_path, rng):
    root = tmp_path / "benchmark_RELEASE" / "dataset"
    written = make_sbd(root, rng, {"train": ["2008_000002", "2008_000003"], "val": ["2008_000004"]})
    # the fixture has the real structure: a 1x1 MATLAB struct with the three fields
    mat = scipy.io.loadmat(root / "cls" / "2008_000002.mat")
    assert set(mat["GTcls"].dtype.names) == {"Boundaries", "Segmentation", "CategoriesPresent"}
    ds = SBDSegmentation(root, split="train")
    assert ds.ids == ["2008_000002", "2008_000003"] and ds.num_classes == 21
    for i in range(len(ds)):
        sample = ds[i]
        np.testing.assert_array_equal(sample["label"], written[sample["id"]][1])
        assert sample["label"].dtype == np.uint8
        _assert_close_image(sample["image"], written[sample["id"]][0])
    assert SBDSegmentation(root, split="val").ids == ["2008_000004"]


def test_sbd_mat_without_gtcls(tmp_path, rng):
    root = tmp_path / "sbd"
    make_sbd(root, rng, {"train": ["x"]})
    scipy.io.savemat(root / "cls" / "x.mat", {"GTinst": {"Segmentation": np.zeros((3, 3), np.uint8)}})
    with pytest.raises(DatasetError, match=r"x\.mat' has no struct 'GTcls'"):
        SBDSegmentation(root, split="train")[0]


def test_voc_aug_union_and_label_sources(tmp_path, rng):
    voc_root, sbd_root = tmp_path / "VOC2012", tmp_path / "sbd"
    voc_written = make_voc(voc_root, rng, {"train": ["v1", "v2"], "val": ["v3", "v4"]})
    # s1/s2 only in SBD; v2 in both (VOC PNG wins); v3 is VOC val (dropped); v5 has a VOC image but only an SBD label
    sbd_written = make_sbd(sbd_root, rng, {"train": ["s1", "v2", "v3"], "val": ["s2", "v5"]})
    _write_jpg(voc_root / "JPEGImages" / "v5.jpg", sbd_written["v5"][0])
    ds = VOCAugSegmentation(voc_root, sbd_root)
    assert ds.ids == ["s1", "s2", "v1", "v2", "v5"]
    assert ds.label_sources == ["sbd", "sbd", "voc", "voc", "sbd"]
    assert "v3" not in ds.ids and "v4" not in ds.ids
    by_id = {ds.ids[i]: ds[i] for i in range(len(ds))}
    np.testing.assert_array_equal(by_id["v2"]["label"], voc_written["v2"][1])  # with the 255 border
    np.testing.assert_array_equal(by_id["s1"]["label"], sbd_written["s1"][1])
    np.testing.assert_array_equal(by_id["v5"]["label"], sbd_written["v5"][1])
    _assert_close_image(by_id["s2"]["image"], sbd_written["s2"][0])  # from SBD img/
    assert ds._images[ds.ids.index("v5")].endswith(str(Path("JPEGImages") / "v5.jpg"))  # VOC image preferred


def test_voc_aug_id_without_label(tmp_path, rng):
    voc_root, sbd_root = tmp_path / "VOC2012", tmp_path / "sbd"
    make_voc(voc_root, rng, {"train": ["v1"], "val": ["v2"]})
    make_sbd(sbd_root, rng, {"train": ["s1"], "val": ["s2"]})
    (sbd_root / "cls" / "s1.mat").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 train_aug ids have no label .*: s1"):
        VOCAugSegmentation(voc_root, sbd_root)


def test_voc_aug_missing_sbd_root(tmp_path, rng):
    voc_root = tmp_path / "VOC2012"
    make_voc(voc_root, rng, {"train": ["v1"], "val": ["v2"]})
    with pytest.raises(FileNotFoundError, match=r"(?s)SBD root .*does not exist.*cls/<id>\.mat"):
        VOCAugSegmentation(voc_root, tmp_path / "missing")


# --------------------------------------------------------------------------------------------------------------
# COCO-Stuff 164k
# --------------------------------------------------------------------------------------------------------------


def make_coco_stuff(root: Path, rng: np.random.Generator, split: str, ids: list[str]) -> dict[str, tuple]:
    written = {}
    for i in ids:
        image = _smooth_image(rng, 24, 32)
        label = rng.choice(np.r_[np.arange(182), 255], size=(24, 32)).astype(np.uint8)
        label[0, :3] = [0, 181, 255]
        _write_jpg(root / "images" / f"{split}2017" / f"{i}.jpg", image)
        _write_png(root / "annotations" / f"{split}2017" / f"{i}.png", label)
        written[i] = (image, label)
    return written


def test_coco_stuff_reads_182_class_ids(tmp_path, rng):
    assert len(COCO_STUFF_CLASSES) == 182 == len(set(COCO_STUFF_CLASSES))
    assert COCO_STUFF_CLASSES[0] == "person" and COCO_STUFF_CLASSES[91] == "banner"
    assert COCO_STUFF_CLASSES[181] == "wood"
    written = make_coco_stuff(tmp_path, rng, "val", ["000000000139", "000000000285"])
    make_coco_stuff(tmp_path, rng, "train", ["000000000009"])
    ds = COCOStuffSegmentation(tmp_path, split="val")
    assert ds.ids == ["000000000139", "000000000285"] and ds.num_classes == 182
    for i in range(2):
        s = ds[i]
        np.testing.assert_array_equal(s["label"], written[s["id"]][1])
        _assert_close_image(s["image"], written[s["id"]][0])
    assert len(COCOStuffSegmentation(tmp_path, split="train")) == 1


def test_coco_stuff_errors(tmp_path, rng):
    with pytest.raises(ValueError, match="split must be one of"):
        COCOStuffSegmentation(tmp_path, split="test")
    with pytest.raises(FileNotFoundError, match=r"(?s)COCO-Stuff image directory .*val2017.*annotations"):
        COCOStuffSegmentation(tmp_path, split="val")
    (tmp_path / "images" / "val2017").mkdir(parents=True)
    (tmp_path / "annotations" / "val2017").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no samples found"):
        COCOStuffSegmentation(tmp_path, split="val")
    written = make_coco_stuff(tmp_path, rng, "val", ["1", "2"])
    label = written["1"][1].copy()
    label[3, 3] = 182
    _write_png(tmp_path / "annotations" / "val2017" / "1.png", label)
    with pytest.raises(DatasetError, match=r"1\.png' holds values \[182\] outside the class range 0\.\.181"):
        COCOStuffSegmentation(tmp_path, split="val")[0]
    (tmp_path / "images" / "val2017" / "2.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"(?s)1 of 2 images .*2\.jpg"):
        COCOStuffSegmentation(tmp_path, split="val")


# --------------------------------------------------------------------------------------------------------------
# Cityscapes
# --------------------------------------------------------------------------------------------------------------


def make_cityscapes(root: Path, rng: np.random.Generator, split: str, names: dict[str, list[str]]) -> dict:
    written = {}
    ids = np.r_[np.arange(34), 255]
    for city, frames in names.items():
        for frame in frames:
            stem = f"{city}_{frame}"
            image = _smooth_image(rng, 16, 32)
            label_ids = rng.choice(ids, size=(16, 32)).astype(np.uint8)
            _write_png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", image)
            _write_png(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", label_ids)
            written[stem] = (image, label_ids)
    return written


def test_cityscapes_label_table():
    table = CITYSCAPES_LABEL_TO_TRAIN_ID
    assert len(table) == 34 and sorted(table) == list(range(34))
    train_ids = sorted(v for v in table.values() if v != 255)
    assert train_ids == list(range(19)) and len(CITYSCAPES_CLASSES) == 19
    # spot checks against the official cityscapesscripts table
    expected = {0: 255, 1: 255, 6: 255, 7: 0, 8: 1, 9: 255, 10: 255, 11: 2, 14: 255, 17: 5, 18: 255, 19: 6,
                23: 10, 24: 11, 26: 13, 29: 255, 30: 255, 31: 16, 33: 18}  # fmt: skip
    assert {k: table[k] for k in expected} == expected
    mapped = cityscapes_label_ids_to_train_ids(np.array([[7, 26, 33, 0], [255, 9, 24, 21]], dtype=np.uint8))
    np.testing.assert_array_equal(mapped, [[0, 13, 18, 255], [255, 255, 11, 8]])
    with pytest.raises(DatasetError, match=r"values \[34, 200\] that are not Cityscapes label ids"):
        cityscapes_label_ids_to_train_ids(np.array([34, 7, 200], dtype=np.uint8))


def test_cityscapes_reads_and_maps_to_train_ids(tmp_path, rng):
    written = make_cityscapes(tmp_path, rng, "val", {"frankfurt": ["000000_000294", "000000_000576"],
                                                      "lindau": ["000000_000019"]})  # fmt: skip
    ds = CityscapesSegmentation(tmp_path, split="val")
    assert ds.ids == ["frankfurt_000000_000294", "frankfurt_000000_000576", "lindau_000000_000019"]
    assert ds.num_classes == 19
    lut = np.full(256, 255, dtype=np.uint8)
    for k, v in CITYSCAPES_LABEL_TO_TRAIN_ID.items():
        lut[k] = v
    for i in range(len(ds)):
        s = ds[i]
        image, label_ids = written[s["id"]]
        np.testing.assert_array_equal(s["image"], image)  # PNG: lossless
        np.testing.assert_array_equal(s["label"], lut[label_ids])
        for label_id, train_id in ((7, 0), (26, 13), (0, 255), (9, 255), (255, 255)):
            assert np.all(s["label"][label_ids == label_id] == train_id)


def test_cityscapes_label_train_ids_and_errors(tmp_path, rng):
    written = make_cityscapes(tmp_path, rng, "train", {"aachen": ["000000_000019"]})
    stem = "aachen_000000_000019"
    train_ids = cityscapes_label_ids_to_train_ids(written[stem][1])
    _write_png(tmp_path / "gtFine" / "train" / "aachen" / f"{stem}_gtFine_labelTrainIds.png", train_ids)
    s = CityscapesSegmentation(tmp_path, split="train", label_type="labelTrainIds")[0]
    np.testing.assert_array_equal(s["label"], train_ids)

    bad = written[stem][1].copy()
    bad[0, 0] = 40
    _write_png(tmp_path / "gtFine" / "train" / "aachen" / f"{stem}_gtFine_labelIds.png", bad)
    with pytest.raises(DatasetError, match=r"labelIds\.png' holds values \[40\] that are not Cityscapes label ids"):
        CityscapesSegmentation(tmp_path, split="train")[0]
    with pytest.raises(ValueError, match="split must be one of"):
        CityscapesSegmentation(tmp_path, split="training")
    with pytest.raises(ValueError, match="label_type must be"):
        CityscapesSegmentation(tmp_path, split="train", label_type="color")
    with pytest.raises(FileNotFoundError, match=r"(?s)Cityscapes image directory .*val.*leftImg8bit"):
        CityscapesSegmentation(tmp_path, split="val")
    (tmp_path / "gtFine" / "train" / "aachen" / f"{stem}_gtFine_labelIds.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"(?s)1 of 1 labels .*_gtFine_labelIds\.png"):
        CityscapesSegmentation(tmp_path, split="train")


# --------------------------------------------------------------------------------------------------------------
# generic folder
# --------------------------------------------------------------------------------------------------------------


def test_folder_pairs_by_name_and_list_file(tmp_path, rng):
    written = {}
    for i, ext in (("a", ".jpg"), ("b", ".png"), ("c", ".jpg")):
        image, mask = _smooth_image(rng, 20, 24), _class_blocks(rng, 20, 24, 3)
        mask[0, 0] = 255
        path = tmp_path / "images" / f"{i}{ext}"
        _write_jpg(path, image) if ext == ".jpg" else _write_png(path, image)
        _write_png(tmp_path / "masks" / f"{i}.png", mask)
        written[i] = (image, mask)
    ds = FolderSegmentation(tmp_path / "images", tmp_path / "masks", class_names=["bg", "x", "y"])
    assert ds.ids == ["a", "b", "c"] and ds.num_classes == 3
    for i in range(3):
        np.testing.assert_array_equal(ds[i]["label"], written[ds.ids[i]][1])
    np.testing.assert_array_equal(ds[1]["image"], written["b"][0])
    (tmp_path / "list.txt").write_text("c\na\n")
    assert FolderSegmentation(tmp_path / "images", tmp_path / "masks", class_names=["bg", "x", "y"],
                              list_file=tmp_path / "list.txt").ids == ["c", "a"]  # fmt: skip


def test_folder_ignore_value_and_reduce_zero_label(tmp_path, rng):
    _write_jpg(tmp_path / "img" / "0.jpg", _smooth_image(rng, 4, 4))
    mask = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [0, 0, 1, 1], [2, 2, 3, 3]], dtype=np.uint8)
    _write_png(tmp_path / "msk" / "0.png", mask)
    ds = FolderSegmentation(tmp_path / "img", tmp_path / "msk", class_names=["a", "b", "c"], ignore_value=3)
    np.testing.assert_array_equal(ds[0]["label"], np.where(mask == 3, 255, mask))
    ade = FolderSegmentation(tmp_path / "img", tmp_path / "msk", class_names=["a", "b", "c"], reduce_zero_label=True)
    np.testing.assert_array_equal(ade[0]["label"], np.where(mask == 0, 255, mask - 1))
    small = FolderSegmentation(tmp_path / "img", tmp_path / "msk", class_names=["a", "b"])
    with pytest.raises(DatasetError, match=r"0\.png' holds values \[2, 3\] outside the class range 0\.\.1"):
        small[0]


def test_folder_16bit_masks(tmp_path, rng):
    _write_jpg(tmp_path / "img" / "0.jpg", _smooth_image(rng, 3, 3))
    mask = np.array([[0, 1, 2], [2, 1, 0], [1000, 1000, 0]], dtype=np.uint16)
    _write_png(tmp_path / "msk" / "0.png", mask)  # PIL writes a 16-bit greyscale PNG
    ds = FolderSegmentation(tmp_path / "img", tmp_path / "msk", class_names=["a", "b", "c"], ignore_value=1000)
    label = ds[0]["label"]
    assert label.dtype == np.uint8
    np.testing.assert_array_equal(label, np.where(mask == 1000, 255, mask))


def _label_file(path: Path, mode: str, values: np.ndarray) -> Path:
    """A label image of ``values`` that PIL opens in ``mode``; 16-bit big-endian and 32-bit ones as TIFF (PIL opens
    every 16-bit PNG as 'I;16' and writes no 32-bit PNG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":
        _write_png(path, values, palette=voc_colormap())
    else:
        dtype = {"1": bool, "L": np.uint8, "I;16": np.uint16, "I;16B": ">u2", "I": np.int32}[mode]
        Image.fromarray(values.astype(dtype)).save(path)
    with Image.open(path) as im:
        assert im.mode == mode, "the fixture must have the mode under test"
    return path


@pytest.mark.parametrize("mode, suffix", [
    ("P", ".png"), ("1", ".png"), ("L", ".png"), ("I;16", ".png"), ("I;16B", ".tif"), ("I", ".tif"),
])
def test_the_scan_accepts_every_label_the_loader_reads(tmp_path, rng, mode, suffix):
    # a big-endian 16-bit label (mode 'I;16B', e.g. a TIFF) loaded but failed the scan before training
    from crfrnn_deeplab.data.io import read_index_png, scan_image_label_pairs
    from crfrnn_deeplab.data.registry import scan_files

    wide = mode in ("I;16", "I;16B", "I")
    values = np.array([[0, 1, 1], [1, 0, 0], [1000, 1000, 0]]) if wide else np.array([[0, 1, 1], [1, 0, 0], [1, 1, 0]])
    image = tmp_path / "img" / "0.jpg"
    _write_jpg(image, _smooth_image(rng, 3, 3))
    label = _label_file(tmp_path / "msk" / f"0{suffix}", mode, values)
    read = read_index_png(label)
    assert read.dtype == (np.int64 if wide else np.uint8)
    np.testing.assert_array_equal(read, values)
    scan_image_label_pairs([image], [label])
    ds = FolderSegmentation(tmp_path / "img", tmp_path / "msk", class_names=["a", "b"], mask_suffix=suffix,
                            ignore_value=1000)
    assert scan_files(ds) == 1
    np.testing.assert_array_equal(ds[0]["label"], np.where(values == 1000, 255, values))


def test_folder_errors(tmp_path, rng):
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    with pytest.raises(TypeError, match="class_names must be a sequence of strings"):
        FolderSegmentation(tmp_path / "img", tmp_path / "msk", class_names="abc")
    with pytest.raises(ValueError, match="name 1..255 classes"):
        FolderSegmentation(tmp_path / "img", tmp_path / "msk", class_names=[])
    with pytest.raises(ValueError, match="ignore_value 1 is a class index"):
        FolderSegmentation(tmp_path / "img", tmp_path / "msk", class_names=["a", "b"], ignore_value=1)
    with pytest.raises(DatasetError, match="no samples found"):
        FolderSegmentation(tmp_path / "img", tmp_path / "msk", class_names=["a"])
    with pytest.raises(FileNotFoundError, match=r"(?s)mask directory .*nope.*does not exist"):
        FolderSegmentation(tmp_path / "img", tmp_path / "nope", class_names=["a"])
    _write_png(tmp_path / "msk" / "m.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(FileNotFoundError, match=r"1 of 1 ids from .*msk.* have no image in .*img.*: m"):
        FolderSegmentation(tmp_path / "img", tmp_path / "msk", class_names=["a"])
    with pytest.raises(FileNotFoundError, match=r"list file .*list\.txt.* does not exist"):
        FolderSegmentation(tmp_path / "img", tmp_path / "msk", class_names=["a"], list_file=tmp_path / "list.txt")


def _folder_sample(tmp_path: Path, rng: np.random.Generator, sample_id: str, image_ext: str = ".jpg",
                   mask_name: str | None = None) -> None:
    image, mask = _smooth_image(rng, 8, 8), _class_blocks(rng, 8, 8, 2)
    path = tmp_path / "img" / f"{sample_id}{image_ext}"
    _write_jpg(path, image) if image_ext.lower() in (".jpg", ".jpeg") else _write_png(path, image)
    _write_png(tmp_path / "msk" / (mask_name or f"{sample_id}.png"), mask)


def test_folder_two_images_of_one_id_are_ambiguous(tmp_path, rng):
    _folder_sample(tmp_path, rng, "x", ".png")
    _write_jpg(tmp_path / "img" / "x.jpg", _smooth_image(rng, 8, 8))  # the jpg was silently chosen
    _folder_sample(tmp_path, rng, "y")
    message = r"which image to read is ambiguous for 1 of 2 ids, each with more than one image in .*\('x': x.jpg and x.png\)"
    with pytest.raises(DatasetError, match=message):
        FolderSegmentation(tmp_path / "img", tmp_path / "msk", class_names=["a", "b"])


def test_folder_images_and_masks_in_one_directory(tmp_path, rng):
    image, mask = _smooth_image(rng, 8, 8), _class_blocks(rng, 8, 8, 2)
    _write_jpg(tmp_path / "both" / "x.jpg", image)
    _write_png(tmp_path / "both" / "x.png", mask)  # the mask, not a second image of x
    ds = FolderSegmentation(tmp_path / "both", tmp_path / "both", class_names=["a", "b"])
    assert ds.files() == ([str(tmp_path / "both" / "x.jpg")], [str(tmp_path / "both" / "x.png")])
    np.testing.assert_array_equal(ds[0]["label"], mask)


def test_folder_mask_suffix_matches_in_any_case(tmp_path, rng):
    _folder_sample(tmp_path, rng, "x", ".JPG", mask_name="x.PNG")
    _folder_sample(tmp_path, rng, "y", ".jpg", mask_name="y.png")
    ds = FolderSegmentation(tmp_path / "img", tmp_path / "msk", class_names=["a", "b"])
    assert ds.ids == ["x", "y"] and ds.files()[1][0].endswith("x.PNG")
    assert ds[0]["label"].shape == (8, 8)
    (tmp_path / "list.txt").write_text("x\n")
    assert FolderSegmentation(tmp_path / "img", tmp_path / "msk", class_names=["a", "b"],
                              list_file=tmp_path / "list.txt").ids == ["x"]  # fmt: skip
    _write_png(tmp_path / "msk" / "x.png", np.zeros((8, 8), np.uint8))
    if len(list((tmp_path / "msk").iterdir())) == 3:  # a case-sensitive file system: x.png and x.PNG both exist
        with pytest.raises(DatasetError, match=r"which mask to read is ambiguous .*'x': x.PNG and x.png"):
            FolderSegmentation(tmp_path / "img", tmp_path / "msk", class_names=["a", "b"])


def test_folder_list_file_with_bom_or_not_utf8(tmp_path, rng):
    _folder_sample(tmp_path, rng, "x")
    _folder_sample(tmp_path, rng, "y")
    (tmp_path / "bom.txt").write_bytes("\ufeffx\r\ny\r\n".encode("utf-8"))  # as Notepad saves it
    ds = FolderSegmentation(tmp_path / "img", tmp_path / "msk", class_names=["a", "b"], list_file=tmp_path / "bom.txt")
    assert ds.ids == ["x", "y"]
    (tmp_path / "latin1.txt").write_bytes("x\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"list file .*latin1\.txt.* is not UTF-8 text \(byte b'\\xe9' at offset 5"):
        FolderSegmentation(tmp_path / "img", tmp_path / "msk", class_names=["a"], list_file=tmp_path / "latin1.txt")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"mask_suffix": ""}, ValueError, r"mask_suffix must not be empty.*'_mask.png' for <id>_mask.png"),
        ({"mask_suffix": None}, TypeError, r"mask_suffix must be a string such as '.png', got NoneType"),
        ({"ignore_value": 2.5}, TypeError, r"ignore_value must be an int \(a mask value\), got 2.5"),
        ({"ignore_value": True}, TypeError, r"ignore_value must be an int"),
        ({"ignore_value": -1}, ValueError, r"ignore_value must be non-negative, got -1"),
        ({"class_names": ["a", "b", "a", "c", "c"]}, ValueError, r"class_names must be distinct, got \['a', 'c'\]"),
    ],
)
def test_folder_bad_options_fail_at_construction(tmp_path, rng, kwargs, error, match):
    _folder_sample(tmp_path, rng, "x")
    with pytest.raises(error, match=match):
        FolderSegmentation(tmp_path / "img", tmp_path / "msk", **{"class_names": ["a", "b"], **kwargs})


# --------------------------------------------------------------------------------------------------------------
# loading: pickling, workers, distributed sampling
# --------------------------------------------------------------------------------------------------------------


def test_datasets_pickle(voc, tmp_path, rng):
    ds = VOCSegmentation(voc[0], split="trainval", transform=TrainTransform(TORCHVISION_CONVENTION, crop_size=16))
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.ids == ds.ids and len(clone) == 3
    np.testing.assert_array_equal(clone.load(2)[1], ds.load(2)[1])


def test_dataloader_workers_with_distributed_sampler(voc):
    ds = VOCSegmentation(voc[0], split="trainval", transform=TrainTransform(TORCHVISION_CONVENTION, crop_size=24))
    seen = []
    for rank in (0, 1):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        loader = DataLoader(ds, batch_size=2, sampler=sampler, num_workers=2, persistent_workers=False)
        for batch in loader:
            assert batch["image"].shape[1:] == (3, 24, 24) and batch["label"].dtype == torch.int64
            assert batch["valid"].dtype == torch.bool and isinstance(batch["id"], list)
            seen += batch["id"]
    assert sorted(set(seen)) == sorted(ds.ids)  # the two ranks cover the dataset (one id padded twice)


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="needs named pipes")
def test_a_fifo_or_a_directory_where_an_image_should_be_is_named_not_waited_on(tmp_path):
    # opening a FIFO blocks until a writer comes: the scan before training hung on one
    import os
    from crfrnn_deeplab.data.io import read_image, read_index_png, scan_image_label_pairs

    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(good)
    fifo, folder = tmp_path / "pipe.png", tmp_path / "folder.png"
    os.mkfifo(fifo)
    folder.mkdir()
    for path, kind in ((fifo, "a FIFO"), (folder, "a directory")):
        for read in (read_image, read_index_png):
            with pytest.raises(DatasetError, match=f"is {kind}, not an image file"):
                read(path)
        with pytest.raises(DatasetError, match=f"is {kind}, not an image file"):
            scan_image_label_pairs([good], [path])
