"""PASCAL VOC 2012 segmentation, the SBD augmented set, and their union ``train_aug``.

Layouts (the archives' own, unchanged)::

    VOCdevkit/VOC2012/                      <- voc_root
        JPEGImages/<id>.jpg
        SegmentationClass/<id>.png          palette PNGs; pixel value = class index, 255 = object border
        ImageSets/Segmentation/{train,val,trainval}.txt

    benchmark_RELEASE/dataset/              <- sbd_root (Hariharan et al., "Semantic contours from inverse
        img/<id>.jpg                           detectors", ICCV 2011)
        cls/<id>.mat                        MATLAB struct GTcls with field Segmentation (uint8, 0..20)
        train.txt, val.txt

``train_aug`` (10,582 images with the full archives) is VOC train ∪ SBD train ∪ SBD val, minus VOC val, as in
DeepLab; each label comes from the VOC PNG when there is one (it has the 255 border band) and otherwise from
the SBD ``.mat``; each image from ``JPEGImages`` when present, otherwise from SBD ``img``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from crfrnn_deeplab.data.io import (
    PathLike,
    check_files_exist,
    check_label_values,
    check_same_size,
    read_id_list,
    read_image,
    read_index_png,
    read_sbd_mat,
    require_dir,
    require_file,
)
from crfrnn_deeplab.data.base import SegmentationDataset, Transform

__all__ = [
    "VOC_CLASSES",
    "voc_colormap",
    "train_aug_ids",
    "VOCSegmentation",
    "SBDSegmentation",
    "VOCAugSegmentation",
]

#: The 21 PASCAL VOC classes in label order (0 = background).
VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

_VOC_LAYOUT = """  <voc_root>/JPEGImages/<id>.jpg
  <voc_root>/SegmentationClass/<id>.png   (palette PNGs)
  <voc_root>/ImageSets/Segmentation/{train,val,trainval}.txt
(voc_root is VOCdevkit/VOC2012 of the VOCtrainval_11-May-2012 archive)"""

_SBD_LAYOUT = """  <sbd_root>/img/<id>.jpg
  <sbd_root>/cls/<id>.mat   (MATLAB struct GTcls with field Segmentation)
  <sbd_root>/{train,val}.txt
(sbd_root is benchmark_RELEASE/dataset of the SBD archive)"""


def voc_colormap(n: int = 256) -> np.ndarray:
    """The PASCAL VOC palette: colour of label ``i`` from the bits of ``i`` spread over R, G, B.

    Args:
        n: number of entries.

    Returns:
        ``uint8 [n, 3]`` RGB colours; entry 0 is black, 1 is (128, 0, 0), 255 is (224, 224, 192).
    """
    idx = np.arange(n)
    cmap = np.zeros((n, 3), dtype=np.int64)
    for shift in range(8):  # bit 3k+c of the index goes to bit 7-k of channel c
        for c in range(3):
            cmap[:, c] |= ((idx >> (3 * shift + c)) & 1) << (7 - shift)
    return cmap.astype(np.uint8)


# The colours of SegmentationClass/*.png, to tell a renumbered palette (a quantised colour mask) from VOC's own.
_VOC_PALETTE = voc_colormap()


def train_aug_ids(
    voc_train: Iterable[str], voc_val: Iterable[str], sbd_train: Iterable[str], sbd_val: Iterable[str]
) -> list[str]:
    """The ``train_aug`` split: (VOC train ∪ SBD train ∪ SBD val) \\ VOC val, sorted.

    Removing VOC val keeps the VOC 2012 validation images out of training even where SBD labelled them.

    Returns:
        The ids, sorted and without duplicates.
    """
    return sorted((set(voc_train) | set(sbd_train) | set(sbd_val)) - set(voc_val))


def _voc_root(root: PathLike) -> Path:
    root = require_dir(root, "VOC root", _VOC_LAYOUT)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        require_dir(root / sub, f"VOC directory {sub!r}", _VOC_LAYOUT)
    return root


def _sbd_root(root: PathLike) -> Path:
    root = require_dir(root, "SBD root", _SBD_LAYOUT)
    for sub in ("img", "cls"):
        require_dir(root / sub, f"SBD directory {sub!r}", _SBD_LAYOUT)
    return root


def _load_pair(image_path: str, label_path: str, num_classes: int, ignore_index: int) -> tuple[np.ndarray, ...]:
    image = read_image(image_path)
    if label_path.endswith(".mat"):
        label = read_sbd_mat(label_path)
    else:
        label = read_index_png(label_path, palette=_VOC_PALETTE, palette_name="VOC")
    check_same_size(image, label, image_path, label_path)
    check_label_values(label, num_classes, ignore_index, label_path)
    return image, label


class _PairListDataset(SegmentationDataset):
    """A dataset given by parallel lists of image and label paths (``.png`` or SBD ``.mat`` labels)."""

    def __init__(self, *, transform: Transform | None) -> None:
        super().__init__(transform=transform)
        self.class_names = VOC_CLASSES
        self._images: list[str] = []
        self._labels: list[str] = []

    def _use_list(self, list_file: Path, image_dir: Path, label_dir: Path, label_suffix: str) -> None:
        """Reads the ids of ``list_file``: images ``image_dir/<id>.jpg``, labels ``label_dir/<id><suffix>``."""
        self.ids = read_id_list(list_file)
        image_paths = [image_dir / f"{i}.jpg" for i in self.ids]
        label_paths = [label_dir / f"{i}{label_suffix}" for i in self.ids]
        check_files_exist(image_paths, f"images listed in {str(list_file)!r}")
        check_files_exist(label_paths, f"labels listed in {str(list_file)!r}")
        self._images, self._labels = [str(p) for p in image_paths], [str(p) for p in label_paths]
        self._check_not_empty(str(list_file))

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return _load_pair(self._images[index], self._labels[index], self.num_classes, self.ignore_index)


class VOCSegmentation(_PairListDataset):
    """PASCAL VOC 2012 semantic segmentation (21 classes, border label 255 = ignore).

    Labels are the palette *indices* of ``SegmentationClass/*.png``, not their colours.

    Args:
        root: ``VOCdevkit/VOC2012``.
        split: a list in ``ImageSets/Segmentation``: ``"train"`` (1,464), ``"val"`` (1,449) or ``"trainval"``.
        transform: applied to each raw sample dict (see :class:`SegmentationDataset`).

    Raises:
        FileNotFoundError: a directory, the split file, or an image/label it lists is missing.
        DatasetError: the split file is empty or malformed.
    """

    def __init__(self, root: PathLike, *, split: str = "train", transform: Transform | None = None) -> None:
        super().__init__(transform=transform)
        root = _voc_root(root)
        list_path = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        list_file = require_file(list_path, f"VOC {split!r} split file", _VOC_LAYOUT)
        self.root, self.split = root, split
        self._use_list(list_file, root / "JPEGImages", root / "SegmentationClass", ".png")


class SBDSegmentation(_PairListDataset):
    """The Semantic Boundaries Dataset's class segmentations (VOC's 21 classes, no ignore band).

    Args:
        root: ``benchmark_RELEASE/dataset``.
        split: ``"train"`` (8,498) or ``"val"`` (2,857), i.e. ``<root>/<split>.txt``.
        transform: applied to each raw sample dict.

    Raises:
        FileNotFoundError: a directory, the split file, or an image/label it lists is missing.
        DatasetError: the split file is empty or malformed.
    """

    def __init__(self, root: PathLike, *, split: str = "train", transform: Transform | None = None) -> None:
        super().__init__(transform=transform)
        root = _sbd_root(root)
        list_file = require_file(root / f"{split}.txt", f"SBD {split!r} split file", _SBD_LAYOUT)
        self.root, self.split = root, split
        self._use_list(list_file, root / "img", root / "cls", ".mat")


class VOCAugSegmentation(_PairListDataset):
    """``train_aug``: VOC 2012 train ∪ SBD train ∪ SBD val minus VOC 2012 val (see :func:`train_aug_ids`).

    Labels come from ``SegmentationClass/<id>.png`` when it exists, else from SBD ``cls/<id>.mat``; images
    from ``JPEGImages/<id>.jpg`` when it exists, else from SBD ``img/<id>.jpg``.

    Args:
        voc_root: ``VOCdevkit/VOC2012``.
        sbd_root: ``benchmark_RELEASE/dataset``.
        transform: applied to each raw sample dict.

    Raises:
        FileNotFoundError: a directory or split file is missing, or an id has no image or no label anywhere.
        DatasetError: the union is empty.
    """

    def __init__(self, voc_root: PathLike, sbd_root: PathLike, *, transform: Transform | None = None) -> None:
        super().__init__(transform=transform)
        voc, sbd = _voc_root(voc_root), _sbd_root(sbd_root)
        sets = voc / "ImageSets" / "Segmentation"
        lists = {
            "voc_train": require_file(sets / "train.txt", "VOC 'train' split file", _VOC_LAYOUT),
            "voc_val": require_file(sets / "val.txt", "VOC 'val' split file", _VOC_LAYOUT),
            "sbd_train": require_file(sbd / "train.txt", "SBD 'train' split file", _SBD_LAYOUT),
            "sbd_val": require_file(sbd / "val.txt", "SBD 'val' split file", _SBD_LAYOUT),
        }
        self.voc_root, self.sbd_root, self.split = voc, sbd, "train_aug"
        self.ids = train_aug_ids(**{k: read_id_list(p) for k, p in lists.items()})
        self._check_not_empty("the union of " + ", ".join(str(p) for p in lists.values()))

        dirs = (voc / "JPEGImages", voc / "SegmentationClass", sbd / "img", sbd / "cls")
        listing = {d: set(os.listdir(d)) for d in dirs}
        no_image, no_label = [], []
        for i in self.ids:
            if f"{i}.jpg" in listing[voc / "JPEGImages"]:
                self._images.append(str(voc / "JPEGImages" / f"{i}.jpg"))
            elif f"{i}.jpg" in listing[sbd / "img"]:
                self._images.append(str(sbd / "img" / f"{i}.jpg"))
            else:
                no_image.append(i)
            if f"{i}.png" in listing[voc / "SegmentationClass"]:
                self._labels.append(str(voc / "SegmentationClass" / f"{i}.png"))
            elif f"{i}.mat" in listing[sbd / "cls"]:
                self._labels.append(str(sbd / "cls" / f"{i}.mat"))
            else:
                no_label.append(i)
        image_where = f"image (looked for <id>.jpg in {voc / 'JPEGImages'} and {sbd / 'img'})"
        label_where = f"label (looked for <id>.png in {voc / 'SegmentationClass'} and <id>.mat in {sbd / 'cls'})"
        for missing, what in ((no_image, image_where), (no_label, label_where)):
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} train_aug ids have no {what}: {', '.join(missing[:5])}"
                    + (" ..." if len(missing) > 5 else "")
                )
        assert len(self._images) == len(self._labels) == len(self.ids)
        # The label source per sample, for inspection: "voc" or "sbd".
        self.label_sources = ["sbd" if p.endswith(".mat") else "voc" for p in self._labels]

    def __repr__(self) -> str:
        n_sbd = sum(s == "sbd" for s in self.label_sources)
        return f"VOCAugSegmentation(num_samples={len(self)}, voc_labels={len(self) - n_sbd}, sbd_labels={n_sbd})"

