"""The contract every segmentation dataset in this package follows.

A dataset is a ``torch.utils.data.Dataset`` of samples. Without a transform, ``dataset[i]`` is the raw sample::

    {"image": uint8 ndarray [H, W, 3] (RGB), "label": uint8 ndarray [H, W], "id": str}

with label values in ``0..num_classes-1`` or :attr:`SegmentationDataset.ignore_index` (255); a 16-bit label PNG
that a dataset reads as it is (VOC, COCO-Stuff, Cityscapes ``labelTrainIds``) gives an ``int64`` label. With a
``transform`` (a callable taking that dict, e.g. :class:`crfrnn_deeplab.data.transforms.TrainTransform`), the
transform's output is returned instead.

Subclasses list their samples at construction (so that a missing root, split file or image fails at once)
and decode one sample per :meth:`SegmentationDataset.load` call, checking the image/label sizes and the label
values as they go. They keep only paths and plain Python values, so they pickle into ``DataLoader`` workers
and work with any sampler (``DistributedSampler`` included).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from crfrnn_deeplab.data.io import DatasetError, as_index

__all__ = ["SegmentationDataset", "IGNORE_INDEX"]

logger = logging.getLogger(__name__)

#: The label value every dataset in this package uses for "no label here" (loss and metrics skip it).
IGNORE_INDEX = 255

Transform = Callable[[dict[str, Any]], Any]


class SegmentationDataset(Dataset):
    """Base class: ids, class names, the ignore index, transform application and validation.

    Subclasses set :attr:`ids` and :attr:`class_names` in ``__init__`` and implement :meth:`load`.

    Attributes:
        ids: one string id per sample, in index order.
        class_names: the name of each class, in label-index order.
        ignore_index: the label value meaning "ignore" (255).
        transform: applied to the raw sample dict by ``__getitem__``; ``None`` returns the raw sample.
    """

    ignore_index: int = IGNORE_INDEX

    def __init__(self, *, transform: Transform | None = None) -> None:
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable or None, got {type(transform).__name__}")
        self.transform = transform
        self.ids: list[str] = []
        self.class_names: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        """Number of classes (the ignore value is not one of them)."""
        return len(self.class_names)

    def _check_not_empty(self, where: str) -> None:
        if not self.ids:
            raise DatasetError(f"{type(self).__name__}: no samples found in {where}; the dataset would be empty")
        logger.debug("%s: %d samples from %s", type(self).__name__, len(self.ids), where)

    def __len__(self) -> int:
        return len(self.ids)

    def files(self) -> tuple[list[str], list[str]] | None:
        """The image and label file of every sample (parallel lists), or None for a dataset that reads no files
        (e.g. the generated synthetic set). File-backed datasets keep them in ``_images`` / ``_labels``."""
        images, labels = getattr(self, "_images", None), getattr(self, "_labels", None)
        return None if images is None or labels is None else (list(images), list(labels))

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Decode sample ``index`` (``0 <= index < len(self)``).

        Returns:
            ``(image, label)``: ``uint8 [H, W, 3]`` RGB and ``uint8 [H, W]`` (or ``int64``) label map, already
            checked for matching size and valid values.
        """
        raise NotImplementedError

    def __getitem__(self, index: int) -> Any:
        index = as_index(index, f"{type(self).__name__} index")
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {n}")
        index %= n
        image, label = self.load(index)
        sample = {"image": image, "label": label, "id": self.ids[index]}
        return self.transform(sample) if self.transform is not None else sample

    def verify(self, indices: Sequence[int] | None = None) -> None:
        """Decode samples (all by default) and raise on the first bad one.

        Construction only checks that files exist; decoding every image up front would make opening a large
        dataset slow. Call this once on a new copy of a dataset to find corrupt files, size mismatches and
        out-of-range labels before a long run.

        Raises:
            DatasetError: the first corrupt file, size mismatch or out-of-range label found.
        """
        for i in range(len(self)) if indices is None else indices:
            self.load(i)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_samples={len(self)}, num_classes={self.num_classes})"
