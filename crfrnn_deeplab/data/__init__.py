"""Segmentation datasets and the readers behind them.

PASCAL VOC 2012 (+ SBD and their union ``train_aug``), COCO-Stuff 164k, Cityscapes, image/mask folders
(ADE20K-style included), and an embedded synthetic dataset that needs no download. Every dataset yields
``{"image": uint8 [H, W, 3] RGB, "label": uint8 [H, W] (255 = ignore), "id": str}`` (an ``int64`` label from a
16-bit PNG read as it is, see :mod:`.base`), or its ``transform``'s output (see
:mod:`crfrnn_deeplab.data.transforms`), and exposes ``num_classes``, ``class_names`` and ``ignore_index``.
"""

from crfrnn_deeplab.data.io import DatasetError
from crfrnn_deeplab.data.base import IGNORE_INDEX, SegmentationDataset
from crfrnn_deeplab.data.cityscapes import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_LABEL_TO_TRAIN_ID,
    CityscapesSegmentation,
    cityscapes_label_ids_to_train_ids,
)
from crfrnn_deeplab.data.coco_stuff import COCO_STUFF_CLASSES, COCOStuffSegmentation
from crfrnn_deeplab.data.folder import FolderSegmentation
from crfrnn_deeplab.data.registry import DatasetSpec, DatasetSplits, build_datasets, dataset_spec, list_datasets
from crfrnn_deeplab.data.registry import register_dataset
from crfrnn_deeplab.data.transforms import EvalTransform, TrainTransform
from crfrnn_deeplab.data.synthetic import SYNTHETIC_CLASSES, SyntheticSegmentation, render_synthetic
from crfrnn_deeplab.data.voc import (
    VOC_CLASSES,
    SBDSegmentation,
    VOCAugSegmentation,
    VOCSegmentation,
    train_aug_ids,
    voc_colormap,
)

__all__ = [
    "EvalTransform",
    "TrainTransform",
    "DatasetError",
    "IGNORE_INDEX",
    "SegmentationDataset",
    "VOC_CLASSES",
    "voc_colormap",
    "train_aug_ids",
    "VOCSegmentation",
    "SBDSegmentation",
    "VOCAugSegmentation",
    "COCO_STUFF_CLASSES",
    "COCOStuffSegmentation",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_LABEL_TO_TRAIN_ID",
    "cityscapes_label_ids_to_train_ids",
    "CityscapesSegmentation",
    "FolderSegmentation",
    "SYNTHETIC_CLASSES",
    "SyntheticSegmentation",
    "render_synthetic",
    "DatasetSpec",
    "DatasetSplits",
    "build_datasets",
    "dataset_spec",
    "list_datasets",
    "register_dataset",
]
