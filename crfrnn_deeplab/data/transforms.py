"""Data pipelines: the DeepLab v2 training augmentation and the evaluation transform (albumentations).

Both take a raw sample from :mod:`crfrnn_deeplab.data` (``{"image": uint8 [H, W, 3] RGB, "label":
uint8 [H, W], "id": str}``) and return the model-ready sample::

    {
        "image": Tensor[3, H, W] float32   network input, ``convention.normalize(raw)``
        "raw":   Tensor[3, H, W] float32   RGB 0-255 after the same geometric transform (the CRF's input)
        "label": Tensor[H, W] int64        class indices, 255 = ignore (also on padding)
        "valid": Tensor[H, W] bool         False on padding added by the transform, True on the real image
        "id":    str
    }

``torch.utils.data.default_collate`` batches these (tensors stacked, ids into a list). Padding is filled with
the convention's mean colour in ``raw`` (so it normalises to ~0 in ``image``) and with the ignore label in
``label``; an ignore label inside the real image (e.g. VOC's object borders) stays ``valid=True``.

Training (Chen et al., DeepLab v2, TPAMI 2017): random scale in [0.5, 1.5] (image bilinear, label nearest),
pad to the crop size at the bottom/right, random crop (321 x 321 by default), horizontal flip with
probability 0.5.

Bounds (checked at construction, so that a typo fails at once instead of allocating gigabytes): ``crop_size`` and
``pad_to`` sides in 1..:data:`MAX_SIZE` (8192), ``pad_divisor`` in 1..:data:`MAX_PAD_DIVISOR` (1024), and
``scale_range`` within :data:`SCALE_LIMITS` (0.1-8, the limits of ``train.py``'s ``data.scale_range``). A small
image that a scale would shrink below one pixel is resized to one pixel on that side.

Randomness: each transform has its own albumentations generator (``seed`` fixes it). Inside a
``DataLoader`` worker it is re-seeded from the worker's seed (``torch.utils.data.get_worker_info().seed``,
which differs per worker and per epoch and follows ``torch.manual_seed``) and the distributed rank, because
albumentations 2.0 would otherwise give every worker the same stream of augmentations.
"""

from __future__ import annotations

import logging
import numbers
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.augmentations.geometric import functional as fgeometric
from torch.utils.data import get_worker_info

from crfrnn_deeplab.distributed import get_rank
from crfrnn_deeplab.images import MAX_SCALE
from crfrnn_deeplab.models.conventions import InputConvention

__all__ = ["TrainTransform", "EvalTransform", "MAX_SIZE", "MAX_PAD_DIVISOR", "SCALE_LIMITS"]

logger = logging.getLogger(__name__)

#: Largest side of a training crop or an evaluation ``pad_to`` size: an 8192² sample is already ~0.8 GB per float32
#: tensor (``image`` and ``raw`` each); a larger one is a typo, not a crop.
MAX_SIZE = 8192
#: Largest ``pad_divisor``: it pads by up to ``pad_divisor - 1`` pixels a side, and the strides and windows it is
#: meant for (8, 16, 32, 513, ...) are far below it.
MAX_PAD_DIVISOR = 1024
#: The allowed training scales (``scale_range``), the same as ``train.py``'s ``data.scale_range``: smaller ones
#: shrink images to nothing, larger ones (above every input scale's :data:`~crfrnn_deeplab.images.MAX_SCALE`) make
#: images that exhaust memory.
SCALE_LIMITS = (0.1, MAX_SCALE)


def _pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a (height, width) pair, got {value!r}")
    if isinstance(value, int):
        value = (value, value)
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise TypeError(f"{name} must be an int or a (height, width) pair of ints, got {value!r}")
    if min(value) < 1:
        raise ValueError(f"{name} must be positive, got {value!r}")
    if max(value) > MAX_SIZE:
        raise ValueError(f"{name} must be at most {MAX_SIZE} pixels a side, got {value!r}")
    return int(value[0]), int(value[1])


def _check_scale_range(scale_range: Any) -> tuple[float, float]:
    low, high = SCALE_LIMITS
    pair = isinstance(scale_range, (tuple, list, np.ndarray)) and len(scale_range) == 2
    if not pair or not all(isinstance(s, numbers.Real) and not isinstance(s, bool) for s in scale_range):
        raise TypeError(f"scale_range must be a (min, max) pair of numbers, got {scale_range!r}")
    lo, hi = (float(s) for s in scale_range)
    if not low <= lo <= hi <= high:  # also refuses NaN and inf
        raise ValueError(f"scale_range must be (min, max) with {low:g} <= min <= max <= {high:g}, got {scale_range!r}")
    return lo, hi


def _check_seed(seed: Any) -> int | None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    if seed is not None and seed < 0:
        raise ValueError(f"seed must be a non-negative int or None, got {seed}")
    return seed


class _RandomScale(A.RandomScale):
    """albumentations' ``RandomScale`` (side ``int(side * scale)``, the same draws), but never below one pixel:
    a small image at a small scale would otherwise become 0 pixels wide, which OpenCV refuses."""

    @staticmethod
    def _scale(img: np.ndarray, scale: float, interpolation: int) -> np.ndarray:
        height, width = img.shape[:2]
        return fgeometric.resize(img, (max(1, int(height * scale)), max(1, int(width * scale))), interpolation)

    def apply(self, img: np.ndarray, scale: float, **params: Any) -> np.ndarray:
        return self._scale(img, scale, self.interpolation)

    def apply_to_mask(self, mask: np.ndarray, scale: float, **params: Any) -> np.ndarray:
        return self._scale(mask, scale, self.mask_interpolation)


def _check_convention(convention: Any) -> InputConvention:
    if not isinstance(convention, InputConvention):
        raise TypeError(f"convention must be an InputConvention, got {type(convention).__name__}")
    return convention


def _check_ignore_index(ignore_index: int) -> int:
    # The padding marker mask starts at 0 and is padded with the ignore value, so 0 cannot be the ignore value.
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) or not 1 <= ignore_index <= 255:
        raise ValueError(f"ignore_index must be an int in 1..255, got {ignore_index!r}")
    return ignore_index


def _inputs(sample: dict[str, Any], need_label: bool) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Validate a raw sample; return its image, its label (uint8 or int32, for OpenCV) and its id."""
    if not isinstance(sample, dict) or "image" not in sample:
        raise TypeError(f"expected a sample dict with 'image' (and 'label', 'id'), got {type(sample).__name__}")
    image, label = sample["image"], sample.get("label")
    sample_id = str(sample.get("id", ""))
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise TypeError(f"sample {sample_id!r}: image must be a uint8 RGB array [H, W, 3], got {desc}")
    if image.size == 0:
        raise ValueError(f"sample {sample_id!r}: image is empty ({image.shape[0]}x{image.shape[1]} pixels)")
    if label is None:
        if need_label:
            raise ValueError(f"sample {sample_id!r} has no 'label'; the training transform needs one")
        return image, None, sample_id
    if not isinstance(label, np.ndarray) or label.ndim != 2 or not np.issubdtype(label.dtype, np.integer):
        desc = f"{label.dtype} {label.shape}" if isinstance(label, np.ndarray) else type(label).__name__
        raise TypeError(f"sample {sample_id!r}: label must be an integer array [H, W], got {desc}")
    if label.shape != image.shape[:2]:
        raise ValueError(f"sample {sample_id!r}: image is {image.shape[:2]} but label is {label.shape} (H, W)")
    if label.dtype != np.uint8:
        low, high = (int(label.min()), int(label.max())) if label.size else (0, 0)
        if low < 0 or high > np.iinfo(np.int32).max:
            raise ValueError(
                f"sample {sample_id!r}: label values must be class indices or the ignore value, in "
                f"0..{np.iinfo(np.int32).max}; got {label.dtype} values from {low} to {high}"
                + (" (a negative ignore value, e.g. -1, must be mapped to the transform's ignore_index first)"
                   if low < 0 else "")
            )
        label = label.astype(np.int32)  # OpenCV resizes/pads int32 but not int64
    return image, label, sample_id


def _to_sample(
    image: np.ndarray,
    label: np.ndarray | None,
    valid: np.ndarray,
    sample_id: str,
    convention: InputConvention,
    pad_rgb: np.ndarray,
) -> dict[str, Any]:
    """Numpy HWC arrays after augmentation -> the model-ready tensor sample (see the module docstring)."""
    # conversions in numpy: single-threaded and cheap, also in a main process with many torch threads
    raw = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)  # [3, H, W], a fresh copy
    valid = np.ascontiguousarray(valid, dtype=bool)
    if not valid.all():
        raw[:, ~valid] = pad_rgb[:, None]  # the exact (non-integer) mean, not its uint8 rounding
    raw_t = torch.from_numpy(raw)
    out: dict[str, Any] = {"image": convention.normalize(raw_t), "raw": raw_t}
    if label is not None:
        out["label"] = torch.from_numpy(label.astype(np.int64))
    out["valid"] = torch.from_numpy(valid)
    out["id"] = sample_id
    return out


class _Transform:
    """Shared parts: the convention, the padding colour, and the albumentations pipeline with worker seeding."""

    def __init__(self, convention: InputConvention, ignore_index: int, seed: int | None) -> None:
        self.convention = _check_convention(convention)
        self.ignore_index = _check_ignore_index(ignore_index)
        self.seed = _check_seed(seed)
        self._pad_rgb = np.array(convention.pixel_mean_rgb255, dtype=np.float32)
        # albumentations pads uint8 images with an integer colour; _to_sample then writes the exact mean.
        self._fill = tuple(int(round(v)) for v in convention.pixel_mean_rgb255)
        self._pipeline: A.Compose | None = None
        self._worker_key: tuple[int, int] | None = None

    def _pad(self, **size: Any) -> A.PadIfNeeded:
        return A.PadIfNeeded(
            position="top_left",  # the image keeps its top-left corner; padding goes to the bottom and right
            border_mode=cv2.BORDER_CONSTANT,
            fill=self._fill,
            fill_mask=self.ignore_index,
            **size,
        )

    def _compose(self, transforms: list[A.BasicTransform]) -> A.Compose:
        return A.Compose(transforms, additional_targets={"padding": "mask"}, seed=self.seed)

    def set_random_seed(self, seed: int | None) -> None:
        """Re-seed the augmentation generator (``None``: fresh entropy); workers still mix in their own seed."""
        self.seed = _check_seed(seed)
        self._worker_key = None
        if self._pipeline is not None:
            self._pipeline.set_random_seed(seed)

    def seed_sample(self, seed: int) -> None:
        """Fix the augmentation of the next sample exactly, in any process (the per-worker re-seeding is skipped
        until the next :meth:`set_random_seed`): what makes training resumable and independent of the number of
        workers when the seed is derived from the run's seed and the sample's position."""
        self.set_random_seed(seed)
        info = get_worker_info()
        self._worker_key = None if info is None else (info.id, info.seed)

    def _sync_worker_seed(self) -> None:
        info = get_worker_info()
        if info is None or self._pipeline is None:
            return
        key = (info.id, info.seed)
        if key != self._worker_key:
            rank = get_rank()
            entropy = [info.seed, rank] + ([self.seed] if self.seed is not None else [])
            self._pipeline.set_random_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))
            self._worker_key = key
            logger.debug("re-seeded augmentation in worker %d (seed %d, rank %d)", info.id, info.seed, rank)

    def _apply(self, image: np.ndarray, label: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Run the pipeline on image, label and a padding marker; return them with the valid mask."""
        if self._pipeline is None:
            return image, label, np.ones(image.shape[:2], dtype=bool)
        self._sync_worker_seed()
        marker = np.zeros(image.shape[:2], dtype=np.uint8)  # becomes ignore_index where padding is added
        data: dict[str, np.ndarray] = {"image": image, "padding": marker}
        if label is not None:
            data["mask"] = label
        out = self._pipeline(**data)
        return out["image"], out.get("mask"), out["padding"] == 0


class TrainTransform(_Transform):
    """DeepLab v2 training augmentation: random scale, pad with mean colour / ignore label, random crop, flip.

    Args:
        convention: the model's input convention (gives the normalisation and the padding colour).
        crop_size: output ``(height, width)``, or one int for a square (DeepLab v2: 321); 1..:data:`MAX_SIZE`.
        scale_range: ``(min, max)`` of the uniformly drawn scale factor, within :data:`SCALE_LIMITS` (0.1-8).
        hflip_prob: probability of a horizontal flip.
        ignore_index: label value of padded pixels (1..255).
        seed: seed of the augmentation generator, a non-negative int or None (in the main process; workers
            re-seed, see module docs).

    Call with a raw sample dict; returns the tensor sample described in the module docstring, of size
    ``crop_size``.
    """

    def __init__(
        self,
        convention: InputConvention,
        *,
        crop_size: int | tuple[int, int] = 321,
        scale_range: tuple[float, float] = (0.5, 1.5),
        hflip_prob: float = 0.5,
        ignore_index: int = 255,
        seed: int | None = None,
    ) -> None:
        super().__init__(convention, ignore_index, seed)
        self.crop_size = _pair(crop_size, "crop_size")
        lo, hi = _check_scale_range(scale_range)
        if isinstance(hflip_prob, bool) or not isinstance(hflip_prob, numbers.Real) or not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob!r}")
        self.scale_range, self.hflip_prob = (lo, hi), float(hflip_prob)
        ch, cw = self.crop_size
        self._pipeline = self._compose(
            [
                # scale factor 1 + U(lo - 1, hi - 1); albumentations resizes every mask with mask_interpolation.
                # INTER_NEAREST_EXACT samples at pixel centres like INTER_LINEAR does, so labels stay aligned.
                _RandomScale(
                    scale_limit=(lo - 1.0, hi - 1.0),
                    interpolation=cv2.INTER_LINEAR,
                    mask_interpolation=cv2.INTER_NEAREST_EXACT,
                    p=1.0,
                ),
                self._pad(min_height=ch, min_width=cw),
                A.RandomCrop(height=ch, width=cw),
                A.HorizontalFlip(p=self.hflip_prob),
            ]
        )

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        image, label, sample_id = _inputs(sample, need_label=True)
        image, label, valid = self._apply(image, label)
        return _to_sample(image, label, valid, sample_id, self.convention, self._pad_rgb)

    def __repr__(self) -> str:
        return (
            f"TrainTransform(crop_size={self.crop_size}, scale_range={self.scale_range}, "
            f"hflip_prob={self.hflip_prob}, ignore_index={self.ignore_index}, convention={self.convention})"
        )


class EvalTransform(_Transform):
    """Evaluation transform: no resizing; optional padding (bottom/right) to a size and/or a multiple.

    Args:
        convention: the model's input convention.
        pad_to: pad to at least this ``(height, width)`` (or square size), e.g. 513 as in DeepLab's evaluation;
            sides 1..:data:`MAX_SIZE`.
        pad_divisor: then pad height and width up to a multiple of this (e.g. 8 for the output stride);
            1..:data:`MAX_PAD_DIVISOR`.
        ignore_index: label value of padded pixels (1..255).

    Samples without a ``"label"`` (inference) come back without one.
    """

    def __init__(
        self,
        convention: InputConvention,
        *,
        pad_to: int | tuple[int, int] | None = None,
        pad_divisor: int | None = None,
        ignore_index: int = 255,
    ) -> None:
        super().__init__(convention, ignore_index, seed=None)
        self.pad_to = None if pad_to is None else _pair(pad_to, "pad_to")
        bad_divisor = isinstance(pad_divisor, bool) or not isinstance(pad_divisor, int) or pad_divisor < 1
        if pad_divisor is not None and bad_divisor:
            raise ValueError(f"pad_divisor must be a positive int or None, got {pad_divisor!r}")
        if pad_divisor is not None and pad_divisor > MAX_PAD_DIVISOR:
            raise ValueError(f"pad_divisor must be at most {MAX_PAD_DIVISOR}, got {pad_divisor}")
        self.pad_divisor = pad_divisor
        steps: list[A.BasicTransform] = []
        if self.pad_to is not None:
            steps.append(self._pad(min_height=self.pad_to[0], min_width=self.pad_to[1]))
        if pad_divisor is not None and pad_divisor > 1:
            steps.append(
                self._pad(
                    min_height=None, min_width=None, pad_height_divisor=pad_divisor, pad_width_divisor=pad_divisor
                )
            )
        self._pipeline = self._compose(steps) if steps else None

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        image, label, sample_id = _inputs(sample, need_label=False)
        image, label, valid = self._apply(image, label)
        return _to_sample(image, label, valid, sample_id, self.convention, self._pad_rgb)

    def __repr__(self) -> str:
        return (
            f"EvalTransform(pad_to={self.pad_to}, pad_divisor={self.pad_divisor}, "
            f"ignore_index={self.ignore_index}, convention={self.convention})"
        )
