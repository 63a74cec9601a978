"""A generic dataset: a directory of images and a directory of same-named PNG masks of class indices.

Layout::

    <image_dir>/<id>.jpg (or .jpeg / .png / ...)
    <mask_dir>/<id>.png          8-bit (or 16-bit) greyscale or palette PNG, value = class index
    [list_file]                  optional: one <id> per line; without it every mask in mask_dir is a sample

Image extensions and the mask suffix match in any case (``.JPG``, ``.PNG``); ids are case-sensitive. An id with
two images (``x.jpg`` and ``x.png``) or two masks (``x.png`` and ``x.PNG``) is an error naming both, not a
silent choice. Hidden files (``.DS_Store``, macOS's ``._<id>.png`` copies) are neither images nor masks.

This also reads ADE20K-style folders (``reduce_zero_label=True``: mask value 0 = "other" is ignored and
values 1..150 become classes 0..149) and pre-converted sets such as VOC ``SegmentationClassAug``.
"""

from __future__ import annotations

import logging
import numbers
import os
from collections import Counter
from collections.abc import Sequence

import numpy as np

from crfrnn_deeplab.data.io import (
    DatasetError,
    PathLike,
    check_one_file_each,
    check_same_size,
    list_dir,
    read_id_list,
    read_image,
    read_index_png,
    require_dir,
    require_file,
)
from crfrnn_deeplab.data.base import IGNORE_INDEX, SegmentationDataset, Transform

__all__ = ["FolderSegmentation"]

logger = logging.getLogger(__name__)

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

_LAYOUT = """  <image_dir>/<id>.<jpg|jpeg|png|...>
  <mask_dir>/<id><mask_suffix>   (class-index PNG; mask_suffix defaults to '.png')
  [list_file: one <id> per line]"""


class FolderSegmentation(SegmentationDataset):
    """Images and class-index masks in two directories, paired by file name.

    Mask values are mapped to the package convention (``0..num_classes-1``, 255 = ignore): ``ignore_value``
    becomes 255; with ``reduce_zero_label``, 0 becomes 255 and every other value ``v`` becomes ``v - 1``.
    Any other value outside the class range is an error naming the file. With two classes, a mask of only 0 and
    255 (the ignore value) is logged as a warning, once: it is how a binary mask whose foreground is 255 reads.

    Args:
        image_dir: directory of images.
        mask_dir: directory of masks.
        class_names: one distinct name per class, in index order (at most 255 classes).
        list_file: optional file of sample ids (file names without extension), one per line (UTF-8; a byte-order
            mark is skipped).
        mask_suffix: what follows the id in a mask's file name (e.g. ``"_mask.png"``), matched in any case;
            not empty.
        ignore_value: the mask value meaning "ignore" (mapped to 255), a non-negative int.
        reduce_zero_label: treat mask value 0 as ignore and shift the other values down by one.
        transform: applied to each raw sample dict (see :class:`SegmentationDataset`).

    Raises:
        TypeError: ``class_names`` is not a sequence of strings, ``mask_suffix`` not a string, or
            ``ignore_value`` not an int.
        ValueError: ``class_names`` is empty, too long or has duplicates, ``mask_suffix`` is empty, or
            ``ignore_value`` is negative or collides with a class.
        FileNotFoundError: a directory or the list file is missing, or an id has no image or no mask.
        DatasetError: no samples, an id with two images or two masks, or a list file that is not UTF-8 text.
    """

    def __init__(
        self,
        image_dir: PathLike,
        mask_dir: PathLike,
        *,
        class_names: Sequence[str],
        list_file: PathLike | None = None,
        mask_suffix: str = ".png",
        ignore_value: int = IGNORE_INDEX,
        reduce_zero_label: bool = False,
        transform: Transform | None = None,
    ) -> None:
        super().__init__(transform=transform)
        if isinstance(class_names, str) or not all(isinstance(c, str) for c in class_names):
            raise TypeError(f"class_names must be a sequence of strings, got {class_names!r}")
        if not 1 <= len(class_names) <= 255:
            raise ValueError(f"class_names must name 1..255 classes (255 is the ignore label), got {len(class_names)}")
        duplicates = sorted(name for name, count in Counter(class_names).items() if count > 1)
        if duplicates:
            raise ValueError(f"class_names must be distinct, got {duplicates} more than once in {list(class_names)}")
        self.class_names = tuple(class_names)
        if not isinstance(mask_suffix, str):
            raise TypeError(f"mask_suffix must be a string such as '.png', got {type(mask_suffix).__name__}")
        if not mask_suffix:
            raise ValueError("mask_suffix must not be empty: it is what follows the id in a mask's file name "
                             "(e.g. '.png' for <id>.png, '_mask.png' for <id>_mask.png)")
        if isinstance(ignore_value, bool) or not isinstance(ignore_value, numbers.Integral):
            raise TypeError(f"ignore_value must be an int (a mask value), got {ignore_value!r}")
        if ignore_value < 0:
            raise ValueError(f"ignore_value must be non-negative, got {ignore_value}")
        first_class = 1 if reduce_zero_label else 0
        if first_class <= ignore_value < first_class + self.num_classes:
            raise ValueError(
                f"ignore_value {ignore_value} is a class index (classes are mask values {first_class}.."
                f"{first_class + self.num_classes - 1}); choose a value outside that range"
            )
        self.ignore_value, self.reduce_zero_label = int(ignore_value), reduce_zero_label
        self._warned_binary = False

        image_dir = require_dir(image_dir, "image directory", _LAYOUT)
        mask_dir = require_dir(mask_dir, "mask directory", _LAYOUT)
        self.image_dir, self.mask_dir = image_dir, mask_dir
        masks_by_id: dict[str, list[str]] = {}
        for name in list_dir(mask_dir):
            if len(name) > len(mask_suffix) and name.lower().endswith(mask_suffix.lower()):
                masks_by_id.setdefault(name[: -len(mask_suffix)], []).append(name)
        if list_file is not None:
            list_file = require_file(list_file, "list file", _LAYOUT)
            self.ids = read_id_list(list_file)
            where = str(list_file)
        else:
            self.ids = sorted(masks_by_id)
            where = f"{mask_dir}/*{mask_suffix}"
        self._check_not_empty(where)

        # With images and masks in one directory, a mask <id>.png is not also an image of <id>.
        same_dir = os.path.samefile(image_dir, mask_dir)
        mask_files = {n for names in masks_by_id.values() for n in names} if same_dir else set()
        images_by_stem: dict[str, list[str]] = {}
        for name in list_dir(image_dir):
            stem, ext = os.path.splitext(name)
            if ext.lower() in _IMAGE_EXTENSIONS and name not in mask_files:
                images_by_stem.setdefault(stem, []).append(name)
        no_image = [i for i in self.ids if i not in images_by_stem]
        no_mask = [i for i in self.ids if i not in masks_by_id]
        no_what = ((no_image, f"image in {image_dir}"), (no_mask, f"mask <id>{mask_suffix} in {mask_dir}"))
        for missing, what in no_what:
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} of {len(self.ids)} ids from {where} have no {what}: {', '.join(missing[:5])}"
                    + (" ..." if len(missing) > 5 else "")
                )
        check_one_file_each(self.ids, images_by_stem, "image", image_dir)
        check_one_file_each(self.ids, masks_by_id, "mask", mask_dir)
        self._images = [str(image_dir / images_by_stem[i][0]) for i in self.ids]
        self._labels = [str(mask_dir / masks_by_id[i][0]) for i in self.ids]

    def _map_mask(self, mask: np.ndarray, path: str) -> np.ndarray:
        """Validate raw mask values and map them to ``0..C-1`` / 255 (one table lookup for 8-bit masks)."""
        first = 1 if self.reduce_zero_label else 0
        ignored = {self.ignore_value} | ({0} if self.reduce_zero_label else set())
        if mask.dtype == np.uint8:
            values = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
        else:
            values = np.unique(mask)
        if values.size == 0:
            return mask.astype(np.uint8)
        if self.num_classes == 2 and ignored == {255} and values.tolist() == [0, 255] and not self._warned_binary:
            # a binary mask saved as 0 / 255 (as image editors and OpenCV code write them) reads as background and
            # ignore: not an error (an image without foreground may have an ignore region), but said once
            self._warned_binary = True
            logger.warning(
                "label file %r holds only the values 0 and 255, and 255 is the ignore value: if it is a binary mask "
                "whose foreground is 255, every foreground pixel is ignored and the model learns background alone; "
                "save the foreground as 1 (mask // 255). (Said once for this dataset.)", path,
            )
        bad = [int(v) for v in values if not (first <= v < first + self.num_classes or v in ignored)]
        if bad:
            shown = ", ".join(str(v) for v in bad[:10]) + (", ..." if len(bad) > 10 else "")
            raise DatasetError(
                f"label file {path!r} holds values [{shown}] outside the class range {first}.."
                f"{first + self.num_classes - 1} that are not the ignore value {sorted(ignored)}"
            )
        if first == 0 and self.ignore_value == IGNORE_INDEX and mask.dtype == np.uint8:
            return mask
        lut = np.full(int(values.max()) + 1, IGNORE_INDEX, dtype=np.uint8)
        lut[first : first + self.num_classes] = np.arange(self.num_classes, dtype=np.uint8)
        for v in ignored:
            if v < len(lut):
                lut[v] = IGNORE_INDEX
        return lut[mask]

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, label_path = self._images[index], self._labels[index]
        image = read_image(image_path)
        mask = read_index_png(label_path)
        check_same_size(image, mask, image_path, label_path)
        return image, self._map_mask(mask, label_path)
