"""The dataset registry: every dataset registered once, its options and classes recorded, its splits built from
plain arguments."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crfrnn_deeplab.data import (
    SYNTHETIC_CLASSES,
    VOC_CLASSES,
    DatasetSplits,
    FolderSegmentation,
    SyntheticSegmentation,
    build_datasets,
    dataset_spec,
    list_datasets,
    register_dataset,
)

SHIPPED = ["cityscapes", "coco_stuff", "folder", "synthetic", "voc12", "voc12_aug"]


def test_every_dataset_is_registered_once():
    assert list_datasets() == SHIPPED


def test_specs_record_options_and_classes():
    assert dataset_spec("synthetic").options == ("seed", "size", "train_images", "val_images", "held_out_images")
    assert dataset_spec("synthetic").class_names == SYNTHETIC_CLASSES
    for name in ("voc12", "voc12_aug", "coco_stuff", "cityscapes"):
        assert dataset_spec(name).options == ("root",), name
    assert dataset_spec("voc12_aug").class_names == VOC_CLASSES
    assert len(dataset_spec("cityscapes").class_names) == 19 and len(dataset_spec("coco_stuff").class_names) == 182
    folder = dataset_spec("folder")
    assert folder.class_names is None and {"root", "class_names", "image_dir", "reduce_zero_label"} <= set(folder.options)


def test_synthetic_splits_are_deterministic_and_held_out_apart_from_val():
    def transform(sample):
        return sample["id"]

    splits = build_datasets("synthetic", seed=3, size=33, train_images=4, val_images=2, held_out_images=2,
                            eval_transform=transform)
    assert isinstance(splits, DatasetSplits) and (len(splits.train), len(splits.val), len(splits.held_out)) == (4, 2, 2)
    assert isinstance(splits.train[0], dict)  # training samples are raw: training augments them itself
    assert isinstance(splits.val[0], str)  # validation and held-out samples go through eval_transform
    again = SyntheticSegmentation(split="val", num_images=2, seed=3, size=33)
    np.testing.assert_array_equal(splits.val.load(1)[0], again.load(1)[0])
    assert not np.array_equal(splits.held_out.load(0)[0], splits.val.load(0)[0])  # another seed


@pytest.mark.parametrize("as_root", [Path, str], ids=["path", "str"])
def test_folder_builds_both_splits_from_its_layout(tmp_path, as_root):
    for split in ("training", "validation"):
        for folder in ("images", "annotations"):
            (tmp_path / folder / split).mkdir(parents=True)
        Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(tmp_path / "images" / split / "a.jpg")
        Image.fromarray(np.eye(8, dtype=np.uint8)).save(tmp_path / "annotations" / split / "a.png")
    splits = build_datasets("folder", root=as_root(tmp_path), class_names=["bg", "fg"])
    assert isinstance(splits.train, FolderSegmentation) and splits.train.class_names == ("bg", "fg")
    assert splits.train.image_dir == tmp_path / "images" / "training"
    assert splits.held_out is None and len(splits.val) == 1  # callers take held-out images from val


def test_errors_name_the_dataset_and_options(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'pascal'; known datasets: \['cityscapes'"):
        build_datasets("pascal")
    with pytest.raises(TypeError, match=r"dataset 'voc12' takes the options \['root'\]; unknown: \['size'\], "
                                        r"missing: \[\]"):
        build_datasets("voc12", root=tmp_path, size=3)
    with pytest.raises(TypeError, match=r"missing: \['root'\]"):
        build_datasets("voc12")
    with pytest.raises(ValueError, match="a dataset named 'voc12' is already registered"):
        register_dataset("voc12")(lambda *, eval_transform=None: None)
    with pytest.raises(TypeError, match="must take an eval_transform keyword argument"):
        register_dataset("no_transform")(lambda *, root: None)
    assert "no_transform" not in list_datasets()


def test_every_dataset_read_from_disk_takes_a_str_or_a_path_root(tmp_path):
    # voc12_aug and folder joined a str root with `/` (a bare "unsupported operand type(s)"); voc12 took it
    readers = [name for name in list_datasets() if "root" in dataset_spec(name).options]
    assert {"voc12", "voc12_aug", "coco_stuff", "cityscapes", "folder"} <= set(readers)
    for name in readers:
        extra = {"class_names": ["a"]} if "class_names" in dataset_spec(name).options else {}
        for root in (str(tmp_path), tmp_path):  # the empty directory: the builder gets as far as its layout
            with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path)) + r".* does not exist; expected"):
                build_datasets(name, root=root, **extra)


@pytest.mark.parametrize("root, error, match", [
    (3, TypeError, r"root must be a str or os\.PathLike, got int 3"),
    (None, TypeError, r"root must be a str or os\.PathLike, got NoneType None"),
    (b"/data/voc", TypeError, r"root must be a str or os\.PathLike, got bytes b'/data/voc'"),
    ("", ValueError, r"root must not be empty \(it would mean the current directory\)"),
])
@pytest.mark.parametrize("name", ["voc12", "voc12_aug", "folder"])
def test_a_root_that_is_not_a_path_is_named(name, root, error, match):
    extra = {"class_names": ["a"]} if name == "folder" else {}
    with pytest.raises(error, match=match):
        build_datasets(name, root=root, **extra)
