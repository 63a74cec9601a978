"""Cityscapes (Cordts et al., CVPR 2016) fine annotations, mapped to the 19 evaluation classes.

Layout (``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip`` unpacked into one root)::

    <root>/leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    <root>/gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

The ``labelIds`` PNGs hold the 34 full label ids (0..33); :data:`CITYSCAPES_LABEL_TO_TRAIN_ID` maps them to the
19 train ids (0..18) and everything else to 255, as the official ``cityscapesscripts/helpers/labels.py``
table does. Value 255 in a ``labelIds`` PNG (where the ``license plate`` label, id -1, ends up) also maps
to 255; any other value above 33 is reported as a bad label.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from crfrnn_deeplab.data.io import (
    DatasetError,
    PathLike,
    check_files_exist,
    check_label_values,
    check_same_size,
    list_dir,
    read_image,
    read_index_png,
    require_dir,
)
from crfrnn_deeplab.data.base import IGNORE_INDEX, SegmentationDataset, Transform

__all__ = [
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_LABEL_TO_TRAIN_ID",
    "cityscapes_label_ids_to_train_ids",
    "CityscapesSegmentation",
]

#: The 19 Cityscapes evaluation classes, in train-id order.
CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip

#: Full label id (as stored in ``*_gtFine_labelIds.png``) -> train id; 255 = ignored in training/evaluation.
CITYSCAPES_LABEL_TO_TRAIN_ID: dict[int, int] = {
    0: 255,  # unlabeled
    1: 255,  # ego vehicle
    2: 255,  # rectification border
    3: 255,  # out of roi
    4: 255,  # static
    5: 255,  # dynamic
    6: 255,  # ground
    7: 0,  # road
    8: 1,  # sidewalk
    9: 255,  # parking
    10: 255,  # rail track
    11: 2,  # building
    12: 3,  # wall
    13: 4,  # fence
    14: 255,  # guard rail
    15: 255,  # bridge
    16: 255,  # tunnel
    17: 5,  # pole
    18: 255,  # polegroup
    19: 6,  # traffic light
    20: 7,  # traffic sign
    21: 8,  # vegetation
    22: 9,  # terrain
    23: 10,  # sky
    24: 11,  # person
    25: 12,  # rider
    26: 13,  # car
    27: 14,  # truck
    28: 15,  # bus
    29: 255,  # caravan
    30: 255,  # trailer
    31: 16,  # train
    32: 17,  # motorcycle
    33: 18,  # bicycle
}

_NUM_LABEL_IDS = 34
_BAD = 254  # marker in the lookup table for values that are not label ids (never a train id)


def _lookup_table() -> np.ndarray:
    lut = np.full(256, _BAD, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_LABEL_TO_TRAIN_ID.items():
        lut[label_id] = train_id
    lut[255] = IGNORE_INDEX  # license plate (id -1) as written into uint8 PNGs
    return lut


_LUT = _lookup_table()


def cityscapes_label_ids_to_train_ids(label_ids: np.ndarray, *, path: PathLike = "<array>") -> np.ndarray:
    """Map a ``labelIds`` map to train ids (0..18, 255 = ignore) with one table lookup.

    Args:
        label_ids: integer array of full label ids (0..33, or 255).
        path: the file the map came from, named in errors.

    Returns:
        ``uint8`` array of the same shape.

    Raises:
        DatasetError: the map holds values that are not Cityscapes label ids (names them).
    """
    if label_ids.dtype != np.uint8:
        if label_ids.size and (label_ids.min() < 0 or label_ids.max() > 255):
            bad = np.unique(label_ids[(label_ids < 0) | (label_ids > 255)])[:10].tolist()
            raise DatasetError(f"label file {str(path)!r} holds values {bad} that are not Cityscapes label ids 0..33")
        label_ids = label_ids.astype(np.uint8)
    out = _LUT[label_ids]
    if (out == _BAD).any():
        bad = np.unique(label_ids[out == _BAD])[:10].tolist()
        raise DatasetError(
            f"label file {str(path)!r} holds values {bad} that are not Cityscapes label ids 0..33 "
            "(is it a colour or instance map instead of *_gtFine_labelIds.png?)"
        )
    return out


_LAYOUT = """  <root>/leftImg8bit/{train,val,test}/<city>/<name>_leftImg8bit.png
  <root>/gtFine/{train,val,test}/<city>/<name>_gtFine_labelIds.png"""

_SPLITS = ("train", "val", "test")


class CityscapesSegmentation(SegmentationDataset):
    """Cityscapes fine annotations with the 19 train-id classes.

    Args:
        root: the directory holding ``leftImg8bit/`` and ``gtFine/``.
        split: ``"train"`` (2,975), ``"val"`` (500) or ``"test"`` (1,525; its labels are placeholders).
        label_type: ``"labelIds"`` (default; mapped to train ids on load) or ``"labelTrainIds"`` (PNGs already
            converted by ``cityscapesscripts``' ``createTrainIdLabelImgs``, read as they are).
        transform: applied to each raw sample dict (see :class:`SegmentationDataset`).

    Raises:
        ValueError: unknown split or label type.
        FileNotFoundError: a directory is missing, or an image has no label.
        DatasetError: the split holds no images.
    """

    def __init__(
        self,
        root: PathLike,
        *,
        split: str = "train",
        label_type: Literal["labelIds", "labelTrainIds"] = "labelIds",
        transform: Transform | None = None,
    ) -> None:
        super().__init__(transform=transform)
        if split not in _SPLITS:
            raise ValueError(f"Cityscapes split must be one of {_SPLITS}, got {split!r}")
        if label_type not in ("labelIds", "labelTrainIds"):
            raise ValueError(f"label_type must be 'labelIds' or 'labelTrainIds', got {label_type!r}")
        root = require_dir(root, "Cityscapes root", _LAYOUT)
        image_root = require_dir(root / "leftImg8bit" / split, "Cityscapes image directory", _LAYOUT)
        label_root = require_dir(root / "gtFine" / split, "Cityscapes label directory", _LAYOUT)
        self.root, self.split, self.label_type = root, split, label_type
        self.class_names = CITYSCAPES_CLASSES

        suffix = "_leftImg8bit.png"
        # hidden files and folders (macOS's ._<name> copies, .ipynb_checkpoints) are not samples
        images = sorted(
            city / name
            for city in image_root.iterdir() if city.is_dir() and not city.name.startswith(".")
            for name in list_dir(city) if name.endswith(suffix)
        )
        self.ids = [p.name[: -len(suffix)] for p in images]
        self._check_not_empty(f"{image_root}/<city>/*{suffix}")
        labels = [label_root / p.parent.name / f"{i}_gtFine_{label_type}.png" for p, i in zip(images, self.ids)]
        check_files_exist(labels, f"labels for the images in {str(image_root)!r}")
        self._images, self._labels = [str(p) for p in images], [str(p) for p in labels]

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, label_path = self._images[index], self._labels[index]
        image = read_image(image_path)
        label = read_index_png(label_path)
        check_same_size(image, label, image_path, label_path)
        if self.label_type == "labelIds":
            label = cityscapes_label_ids_to_train_ids(label, path=label_path)
        else:
            check_label_values(label, self.num_classes, self.ignore_index, label_path)
        return image, label
