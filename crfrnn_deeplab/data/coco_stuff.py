"""COCO-Stuff 164k (Caesar, Uijlings & Ferrari, CVPR 2018): 182 thing + stuff class ids, 255 = unlabelled.

Assumed layout (the ``train2017.zip`` / ``val2017.zip`` images and ``stuffthingmaps_trainval2017.zip``
unpacked side by side)::

    <root>/images/train2017/<id>.jpg        <root>/annotations/train2017/<id>.png
    <root>/images/val2017/<id>.jpg          <root>/annotations/val2017/<id>.png

The annotation PNGs are 8-bit greyscale with value ``v`` = COCO category id - 1: 0..90 are the 91 thing ids
(11 of which, e.g. ``street sign``, are never annotated), 91..181 the 91 stuff classes, 255 unlabelled. They
are used unchanged as the 182 classes here (DeepLab v2's COCO-Stuff setup). The samples of a split are the
annotation PNGs found in its directory (``.png`` in any case; hidden files such as macOS's ``._<id>.png`` are not
samples); each must have its image ``<id>.jpg``. For the 171-class "used ids only" variant
written by other toolkits (``*_labelTrainIds.png``), use :class:`~crfrnn_deeplab.data.FolderSegmentation`.
"""

from __future__ import annotations

import numpy as np

from crfrnn_deeplab.data.io import (
    PathLike,
    check_files_exist,
    check_label_values,
    check_one_file_each,
    check_same_size,
    list_dir,
    read_image,
    read_index_png,
    require_dir,
)
from crfrnn_deeplab.data.base import SegmentationDataset, Transform

__all__ = ["COCO_STUFF_CLASSES", "COCOStuffSegmentation"]

#: The 182 COCO-Stuff class names; index ``v`` is the annotation value ``v`` (COCO category id ``v + 1``).
COCO_STUFF_CLASSES: tuple[str, ...] = (
    # things, COCO ids 1..91 (the unannotated ids keep their names so that indices line up)
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "street sign", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", "hat", "backpack", "umbrella", "shoe", "eye glasses",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
    "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "plate", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza",
    "donut", "cake", "chair", "couch", "potted plant", "bed", "mirror", "dining table", "window", "desk",
    "toilet", "door", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "blender", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush", "hair brush",
    # stuff, COCO ids 92..182
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain",
    "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile",
    "floor-wood", "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other",
    "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin",
    "net", "paper", "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing",
    "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other",
    "skyscraper", "snow", "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent",
    "textile-other", "towel", "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel",
    "wall-stone", "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)  # fmt: skip

_LAYOUT = """  <root>/images/{train2017,val2017}/<id>.jpg
  <root>/annotations/{train2017,val2017}/<id>.png   (8-bit, values 0..181 = class, 255 = unlabelled)"""

_SPLITS = ("train", "val")


class COCOStuffSegmentation(SegmentationDataset):
    """COCO-Stuff 164k semantic segmentation with the 182 class ids of the annotation PNGs.

    Args:
        root: the directory holding ``images/`` and ``annotations/``.
        split: ``"train"`` (118k images) or ``"val"`` (5k), i.e. the ``train2017`` / ``val2017`` folders.
        transform: applied to each raw sample dict (see :class:`SegmentationDataset`).

    Raises:
        ValueError: unknown split.
        FileNotFoundError: a directory is missing, or an annotation has no image.
        DatasetError: the split holds no annotations.
    """

    def __init__(self, root: PathLike, *, split: str = "train", transform: Transform | None = None) -> None:
        super().__init__(transform=transform)
        if split not in _SPLITS:
            raise ValueError(f"COCO-Stuff split must be one of {_SPLITS}, got {split!r}")
        root = require_dir(root, "COCO-Stuff root", _LAYOUT)
        image_dir = require_dir(root / "images" / f"{split}2017", "COCO-Stuff image directory", _LAYOUT)
        label_dir = require_dir(root / "annotations" / f"{split}2017", "COCO-Stuff annotation directory", _LAYOUT)
        self.root, self.split = root, split
        self.class_names = COCO_STUFF_CLASSES
        # the suffix in any case (x.PNG), as FolderSegmentation matches it; hidden files (._x.png) are not samples
        labels_by_id: dict[str, list[str]] = {}
        for name in list_dir(label_dir):
            if len(name) > 4 and name.lower().endswith(".png"):
                labels_by_id.setdefault(name[:-4], []).append(name)
        self.ids = sorted(labels_by_id)
        self._check_not_empty(f"{label_dir} (*.png)")
        check_one_file_each(self.ids, labels_by_id, "annotation", label_dir)
        images = [image_dir / f"{i}.jpg" for i in self.ids]
        try:
            check_files_exist(images, f"images for the annotations in {str(label_dir)!r}")
        except FileNotFoundError as e:
            # other toolkits' conversions write <id>_labelTrainIds.png (171 classes) beside <id>.png
            foreign = sum(i.endswith("_labelTrainIds") for i in self.ids)
            if not foreign:
                raise
            raise FileNotFoundError(
                f"{e}\n{foreign} of the annotations in it are *_labelTrainIds.png files written by another toolkit "
                "(its 171-class maps), not COCO-Stuff's own: move them out of that directory (or read them with "
                "FolderSegmentation, mask_suffix='_labelTrainIds.png')"
            ) from None
        self._images = [str(p) for p in images]
        self._labels = [str(label_dir / labels_by_id[i][0]) for i in self.ids]

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image = read_image(self._images[index])
        label = read_index_png(self._labels[index])
        check_same_size(image, label, self._images[index], self._labels[index])
        check_label_values(label, self.num_classes, self.ignore_index, self._labels[index])
        return image, label
