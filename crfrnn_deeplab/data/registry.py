"""Dataset registry: which datasets exist and how to build their splits, in one place (like the model
registry, :mod:`crfrnn_deeplab.models.registry`).

A builder is a function ``builder(*, eval_transform, **options) -> DatasetSplits`` registered under a name with
:func:`register_dataset`; its keyword options (``root``, ``seed``, ...) are plain values, never a config. The
registry records what callers need to know before building: the builder's options (so ``"root" in
spec.options`` says that the dataset is read from disk) and, where it is fixed, the class list. A builder gets
``root`` as a ``Path``: :func:`build_datasets` takes a ``str`` or ``os.PathLike`` and converts it, once for all.

Example::

    splits = build_datasets("voc12_aug", root=Path("/data/voc"), eval_transform=EvalTransform(convention))
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crfrnn_deeplab.data.base import SegmentationDataset, Transform
from crfrnn_deeplab.data.io import as_path, scan_image_label_pairs
from crfrnn_deeplab.data.cityscapes import CITYSCAPES_CLASSES, CityscapesSegmentation
from crfrnn_deeplab.data.coco_stuff import COCO_STUFF_CLASSES, COCOStuffSegmentation
from crfrnn_deeplab.data.folder import FolderSegmentation
from crfrnn_deeplab.data.synthetic import SYNTHETIC_CLASSES, SyntheticSegmentation
from crfrnn_deeplab.data.voc import VOC_CLASSES, VOCAugSegmentation, VOCSegmentation

__all__ = ["DatasetSplits", "DatasetSpec", "register_dataset", "list_datasets", "dataset_spec", "build_datasets",
           "scan_files"]


@dataclass(frozen=True)
class DatasetSplits:
    """The datasets of a training run.

    Attributes:
        train: raw training samples (no transform: training applies its own seeded augmentation).
        val: validation samples through the ``eval_transform`` given to the builder.
        held_out: images apart from ``val`` for tuning post-processing (e.g. the CRF grid search), through
            ``eval_transform``; None where the dataset has no such split (callers then take a subset of ``val``).
    """

    train: SegmentationDataset
    val: SegmentationDataset
    held_out: SegmentationDataset | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """What the registry knows about a dataset.

    Attributes:
        name: the registered name.
        builder: ``builder(*, eval_transform, **options) -> DatasetSplits``.
        class_names: the dataset's classes where they are fixed, None where an option gives them (``folder``).
    """

    name: str
    builder: Callable[..., DatasetSplits]
    class_names: tuple[str, ...] | None = None

    @property
    def options(self) -> tuple[str, ...]:
        """The builder's keyword options, ``eval_transform`` excluded (``"root"`` among them: read from disk)."""
        return tuple(n for n in inspect.signature(self.builder).parameters if n != "eval_transform")


_DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(name: str, *, class_names: Sequence[str] | None = None) -> Callable:
    """Registers a splits builder under ``name`` (decorator).

    Raises:
        ValueError: a dataset of that name is already registered.
        TypeError: the builder takes no ``eval_transform`` keyword argument.
    """

    def register(builder: Callable[..., DatasetSplits]) -> Callable[..., DatasetSplits]:
        if name in _DATASETS:
            raise ValueError(f"a dataset named {name!r} is already registered (by {_DATASETS[name].builder.__module__})")
        if "eval_transform" not in inspect.signature(builder).parameters:
            raise TypeError(f"dataset builder {name!r} must take an eval_transform keyword argument")
        names = None if class_names is None else tuple(class_names)
        _DATASETS[name] = DatasetSpec(name=name, builder=builder, class_names=names)
        return builder

    return register


def list_datasets() -> list[str]:
    """Names of the registered datasets, sorted."""
    return sorted(_DATASETS)


def dataset_spec(name: str) -> DatasetSpec:
    """The :class:`DatasetSpec` of a registered dataset.

    Raises:
        ValueError: unknown ``name`` (the message lists the known ones).
    """
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {list_datasets()}")
    return _DATASETS[name]


def build_datasets(name: str, *, eval_transform: Transform | None = None, **options: Any) -> DatasetSplits:
    """Builds a registered dataset's splits.

    Args:
        name: a name from :func:`list_datasets`.
        eval_transform: applied to the validation (and held-out) samples.
        **options: the builder's keyword options (:attr:`DatasetSpec.options`), e.g. ``root`` (a ``str`` or
            ``os.PathLike``; the builder gets it as a ``Path``).

    Raises:
        ValueError: unknown ``name``, or an empty ``root``.
        TypeError: an option the builder does not take, a missing one, or a ``root`` that is neither a ``str``
            nor an ``os.PathLike``.
    """
    spec = dataset_spec(name)
    unknown = sorted(set(options) - set(spec.options))
    missing = [
        n for n, p in inspect.signature(spec.builder).parameters.items()
        if n != "eval_transform" and p.default is inspect.Parameter.empty and n not in options
    ]
    if unknown or missing:
        raise TypeError(f"dataset {name!r} takes the options {list(spec.options)}; unknown: {unknown}, missing: {missing}")
    if "root" in options:
        options["root"] = as_path(options["root"], "root")
    return spec.builder(eval_transform=eval_transform, **options)


def scan_files(dataset: SegmentationDataset) -> int:
    """A header-only check of a file-backed dataset's images and labels (:func:`~.io.scan_image_label_pairs`);
    returns the number of pairs checked (0 for a generated dataset such as ``synthetic``).

    Raises:
        FileNotFoundError, DatasetError: the first missing, unreadable or mismatched file (named).
    """
    files = dataset.files()
    if files is None:
        return 0
    images, labels = files
    scan_image_label_pairs(images, labels)
    return len(images)


# ------------------------------------------------------------------------------------------------------------
# The datasets of the package


@register_dataset("synthetic", class_names=SYNTHETIC_CLASSES)
def synthetic(
    *, seed: int, size: int, train_images: int, val_images: int, held_out_images: int,
    eval_transform: Transform | None = None,
) -> DatasetSplits:
    """The embedded synthetic dataset (no download): its held-out images come from another seed, so they are
    apart from the validation images."""
    return DatasetSplits(
        train=SyntheticSegmentation(split="train", num_images=train_images, seed=seed, size=size),
        val=SyntheticSegmentation(split="val", num_images=val_images, seed=seed, size=size, transform=eval_transform),
        held_out=SyntheticSegmentation(split="val", num_images=held_out_images, seed=seed + 1, size=size,
                                       transform=eval_transform),
    )


@register_dataset("voc12_aug", class_names=VOC_CLASSES)
def voc12_aug(*, root: Path, eval_transform: Transform | None = None) -> DatasetSplits:
    """PASCAL VOC 2012 ``train_aug`` (VOC train + SBD, minus VOC val) for training, VOC ``val`` for
    validation; ``root`` holds ``VOC2012/`` and ``SBD/``."""
    return DatasetSplits(train=VOCAugSegmentation(root / "VOC2012", root / "SBD"),
                         val=VOCSegmentation(root / "VOC2012", split="val", transform=eval_transform))


@register_dataset("voc12", class_names=VOC_CLASSES)
def voc12(*, root: Path, eval_transform: Transform | None = None) -> DatasetSplits:
    """PASCAL VOC 2012 alone (``root``: ``VOCdevkit/VOC2012``): ``train`` and ``val``."""
    return DatasetSplits(train=VOCSegmentation(root, split="train"),
                         val=VOCSegmentation(root, split="val", transform=eval_transform))


@register_dataset("coco_stuff", class_names=COCO_STUFF_CLASSES)
def coco_stuff(*, root: Path, eval_transform: Transform | None = None) -> DatasetSplits:
    """COCO-Stuff 164k: ``train2017`` and ``val2017``."""
    return DatasetSplits(train=COCOStuffSegmentation(root, split="train"),
                         val=COCOStuffSegmentation(root, split="val", transform=eval_transform))


@register_dataset("cityscapes", class_names=CITYSCAPES_CLASSES)
def cityscapes(*, root: Path, eval_transform: Transform | None = None) -> DatasetSplits:
    """Cityscapes fine annotations (19 train ids): ``train`` and ``val``."""
    return DatasetSplits(train=CityscapesSegmentation(root, split="train"),
                         val=CityscapesSegmentation(root, split="val", transform=eval_transform))


@register_dataset("folder")
def folder(
    *, root: Path, class_names: Sequence[str], image_dir: str = "images", mask_dir: str = "annotations",
    train_split: str = "training", val_split: str = "validation", mask_suffix: str = ".png",
    reduce_zero_label: bool = False, eval_transform: Transform | None = None,
) -> DatasetSplits:
    """An image/mask folder tree (ADE20K-style): ``<root>/<image_dir>/<split>/<id>.jpg`` and
    ``<root>/<mask_dir>/<split>/<id><mask_suffix>``."""
    common = dict(class_names=class_names, mask_suffix=mask_suffix, reduce_zero_label=reduce_zero_label)
    return DatasetSplits(
        train=FolderSegmentation(root / image_dir / train_split, root / mask_dir / train_split, **common),
        val=FolderSegmentation(root / image_dir / val_split, root / mask_dir / val_split, transform=eval_transform,
                               **common),
    )
