"""Prediction on raw images: any image type in, label maps and class probabilities out.

:func:`predict` runs a :class:`~crfrnn_deeplab.models.deeplab.DeepLabV2`, an :class:`~crfrnn_deeplab.models.msc.MSC` or a
:class:`~crfrnn_deeplab.models.crfrnn.CRFRNN` model on numpy, PIL or tensor images of any sizes, with optional test-time
augmentation (input scales, horizontal flip), and returns one :class:`Prediction` per image. The models'
``predict`` methods delegate here.

How a batch is computed: images of equal size share the forward passes (network and CRF, at most
``batch_size`` at a time); images of different sizes are never padded into one batch, because the network's
receptive field reaches into the padding (and after the first BatchNorm the padded features are no longer zero
whatever colour is padded), so a prediction would depend on the other images of its batch. (DeepLab v2's Caffe
test pads to 513 x 513 with the mean colour and lives with this. The CRF alone would be exact: its
``valid_mask`` keeps padded pixels off the lattice.)

Test-time augmentation averages the network's **logits** over the passes (each scale, each flip) before the CRF:
logit space is where DeepLab v2 fuses its multi-scale score maps (MSC, Chen et al., TPAMI 2017, Sec. 4.1) and
what the CRF takes as unaries; the mean (not MSC's max) weighs every pass equally. An MSC model keeps its own
max fusion inside each pass.
"""

from __future__ import annotations

import logging
import numbers
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from crfrnn_deeplab.images import (
    check_device,
    check_rgb_array,
    check_rgb_image,
    check_scales,
    pil_to_rgb,
    resize,
    scaled_size,
)

__all__ = [
    "MAX_CRF_ITERATIONS",
    "ImageLike",
    "Prediction",
    "check_crf_iterations",
    "is_single_image",
    "predict",
    "resolve_device",
    "to_raw_batch",
]

logger = logging.getLogger(__name__)

#: Most mean-field iterations one prediction may ask for. CRF-RNN trains with 5 and tests with 10, and the
#: mean-field updates have converged long before 1000; a larger count is a typo that would look like a hang.
MAX_CRF_ITERATIONS = 1000

#: One image: ``uint8 [H, W, 3]`` RGB ndarray, a PIL image, or an RGB 0-255 tensor ``[3, H, W]`` (uint8 or float).
ImageLike = np.ndarray | Image.Image | Tensor


@dataclass
class Prediction:
    """The prediction for one image, on the CPU, at the image's size.

    Attributes:
        labels (Tensor[H, W] int64): class indices, the argmax of :attr:`probabilities`.
        probabilities (Tensor[C, H, W] float32): softmax of the final logits (the CRF's when it ran, else the
            network's).
        network_labels (Tensor[H, W] int64 or None): the network's own argmax, before the CRF; set only when the
            CRF ran (``None`` otherwise, where it would equal :attr:`labels`).
    """

    labels: Tensor
    probabilities: Tensor
    network_labels: Tensor | None = None


def is_single_image(images: object) -> bool:
    """Whether ``images`` is one image (ndarray, PIL image, 3-D tensor) rather than a list or a 4-D batch."""
    if isinstance(images, Tensor):
        return images.dim() != 4
    return isinstance(images, (np.ndarray, Image.Image))


def to_raw_batch(images: ImageLike | Sequence[ImageLike]) -> list[Tensor]:
    """Images of any supported type to raw RGB tensors (what a model's ``preprocess`` and the CRF take).

    Args:
        images: one image or a list/tuple of them. An image is a ``uint8`` numpy array ``[H, W, 3]`` (RGB), a PIL
            image (any mode; converted to RGB), or a tensor ``[3, H, W]`` (RGB, ``uint8`` or floating point in
            0-255); a tensor ``[B, 3, H, W]`` is a batch of ``B`` images.

    Returns:
        One ``Tensor[3, H, W]`` float32 per image, RGB in 0-255, on the input's device; sizes may differ.

    Raises:
        TypeError: an unsupported type or dtype.
        ValueError: no images, a wrong number of dimensions or channels, an empty image, values that are not
            raw RGB (negative, above 255, NaN or infinite), or a PIL image that cannot be decoded (a truncated file).
    """
    if isinstance(images, Tensor) and images.dim() == 4:
        items: list[object] = list(images.unbind(0))
    elif is_single_image(images):
        items = [images]
    elif isinstance(images, (list, tuple)):
        items = list(images)
    else:
        raise TypeError(
            "expected an image (numpy uint8 [H, W, 3], PIL image, tensor [3, H, W]), a tensor [B, 3, H, W] or a "
            f"list of images, got {type(images).__name__}"
        )
    if not items:
        raise ValueError("expected at least one image, got an empty list")
    raws = []
    for i, image in enumerate(items):
        where = f"image {i}"
        if isinstance(image, Tensor):
            raw = check_rgb_image(image, name=where, dims=(3,)).float()
        elif isinstance(image, np.ndarray):
            array = np.ascontiguousarray(check_rgb_array(image, name=where))  # e.g. a flipped view, image[:, ::-1]
            raw = torch.tensor(array).permute(2, 0, 1).float()  # a copy: PIL arrays are read-only
        elif isinstance(image, Image.Image):
            try:  # a lazily loaded PIL image decodes here: a truncated or closed file fails now
                rgb = pil_to_rgb(image, name=where)
            except (OSError, SyntaxError) as e:
                raise ValueError(f"{where}: cannot decode the PIL image ({image.mode}, {image.width}x{image.height}): "
                                 f"{e}") from e
            if image.mode == "F" and rgb.max() <= 1:  # pil_to_rgb takes 'F' as 0-255: a 0-1 image is now black
                logger.warning("%s is a float (mode 'F') image with values of at most 1: expected 0-255, not 0-1",
                               where)
            raw = torch.tensor(rgb).permute(2, 0, 1).float()
        else:
            raise TypeError(
                f"{where}: expected a numpy uint8 [H, W, 3] array, a PIL image or a tensor [3, H, W], "
                f"got {type(image).__name__}"
            )
        raws.append(raw)
    return raws


def _network_logits(network: nn.Module, raw: Tensor, *, scales: tuple[float, ...], flip: bool,
                    dtype: torch.dtype) -> Tensor:
    """The network's logits, averaged over the test-time augmentations.

    Args:
        raw (Tensor[B, 3, H, W]): raw RGB 0-255 images of one size, on the network's device.

    Returns:
        Tensor[B, C, H, W] float32 (float64 for a float64 network): the mean over every scale (input resized to
        ``floor((S - 1) * s) + 1``, logits resized back) and, with ``flip``, every horizontally flipped pass
        (its logits flipped back).
    """
    x = network.preprocess(raw).to(dtype)
    size = (x.shape[-2], x.shape[-1])
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    total, passes = None, 0
    for s in scales:
        xs = resize(x, (scaled_size(size[0], s), scaled_size(size[1], s)))
        for flipped in (False, True) if flip else (False,):
            logits = network(xs.flip(-1) if flipped else xs)
            logits = resize(logits.to(out_dtype), size)
            logits = logits.flip(-1) if flipped else logits
            total = logits if total is None else total + logits
            passes += 1
    return total / passes


@torch.no_grad()
def _predict_group(network: nn.Module, crf: nn.Module | None, raw: Tensor, *, scales: tuple[float, ...],
                   flip: bool, dtype: torch.dtype) -> list[Prediction]:
    """Predictions for a batch of equal-size images (Tensor[B, 3, H, W], raw RGB, on the model's device).

    Raises:
        ValueError: the network's logits hold NaN or infinite values (their argmax would be a class without a word).
    """
    logits = _network_logits(network, raw, scales=scales, flip=flip, dtype=dtype)
    if not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).sum())
        raise ValueError(
            f"the network's logits for {len(raw)} image(s) hold {bad} NaN or infinite value(s) of {logits.numel()} "
            f"(the network computes in {str(dtype).removeprefix('torch.')}): its weights hold such values or its "
            "forward pass overflowed, so there is no prediction to make"
        )
    if crf is None:
        return [Prediction(labels=z.argmax(0).cpu(), probabilities=z.softmax(0).float().cpu()) for z in logits]
    crf_logits = crf(logits, raw)
    return [
        Prediction(labels=z.argmax(0).cpu(), probabilities=z.softmax(0).float().cpu(),
                   network_labels=z0.argmax(0).cpu())
        for z0, z in zip(logits, crf_logits)
    ]


def predict(
    model: nn.Module,
    images: ImageLike | Sequence[ImageLike],
    *,
    crf: bool = True,
    crf_iterations: int | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    device: str | torch.device | None = None,
    batch_size: int = 4,
) -> list[Prediction]:
    """Segments raw images with a DeepLab v2 (plain or MSC) or CRF-RNN model.

    The model runs in eval mode under ``torch.no_grad()``, in its own dtype and on its own device, with its own
    input convention (``model.preprocess``); every module's training flag is restored afterwards.

    Args:
        model: a :class:`~crfrnn_deeplab.models.deeplab.DeepLabV2`, :class:`~crfrnn_deeplab.models.msc.MSC` or
            :class:`~crfrnn_deeplab.models.crfrnn.CRFRNN` (any network module with a ``preprocess`` method works).
        images: one image or a list (see :func:`to_raw_batch`); sizes may differ.
        crf: run the model's CRF layer, when it has one (a model without a CRF ignores this).
        crf_iterations: mean-field iterations for this call, ``0..MAX_CRF_ITERATIONS`` (default: the CRF's
            ``eval_iterations``).
        scales: test-time input scales, each in ``(0, MAX_SCALE]`` (:func:`~crfrnn_deeplab.images.check_scales`);
            the logits of every scale are resized to the image and averaged.
        flip: also run every scale on the horizontally flipped image (logits flipped back, averaged in).
        device: move the model there first (it stays there); default: where the model is. Checked by
            :func:`resolve_device` before anything runs.
        batch_size: most images of equal size per forward pass (network and CRF); images of different sizes are
            run separately, never padded into one batch, so each prediction is the one its image gets alone.

    Returns:
        One :class:`Prediction` per image, in input order, on the CPU.

    Raises:
        TypeError: an unsupported model or image type (see :func:`to_raw_batch`); ``crf`` or ``flip`` not a bool,
            ``crf_iterations`` or ``batch_size`` not an integer, ``device`` not a str or torch.device.
        ValueError: bad images or option values, ``crf_iterations`` without a CRF to run, an image smaller than the
            model accepts at one of the ``scales``, a device that cannot run here, a model on the meta device, or
            a network whose logits hold NaN or infinite values (weights that hold such values, a float16 overflow).
    """
    if not (isinstance(model, nn.Module) and callable(getattr(model, "preprocess", None))):
        raise TypeError(
            "model must be a DeepLabV2, MSC or CRFRNN (an nn.Module with a preprocess() method), "
            f"got {type(model).__name__}"
        )
    crf, flip = _check_flag(crf, "crf"), _check_flag(flip, "flip")
    has_crf = isinstance(getattr(model, "crf", None), nn.Module) and isinstance(getattr(model, "network", None), nn.Module)
    network, crf_layer = (model.network, model.crf if crf else None) if has_crf else (model, None)
    if crf_iterations is not None:
        crf_iterations = check_crf_iterations(crf_iterations)
        if crf_layer is None:
            reason = "crf=False" if has_crf else f"a {type(model).__name__} has no CRF layer"
            raise ValueError(f"crf_iterations={crf_iterations} given but no CRF runs ({reason})")
    batch_size = _check_int(batch_size, "batch_size")
    if batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    scales = check_scales(scales)
    target = resolve_device(device) if device is not None else None
    _check_not_meta(model)
    raws = to_raw_batch(images)
    _check_sizes(raws, scales, getattr(network, "min_input_size", 1))
    if target is not None:
        model.to(target)
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)

    modes = {m: m.training for m in model.modules()}
    saved_iterations = getattr(crf_layer, "eval_iterations", None)
    model.eval()
    try:
        if crf_iterations is not None:
            crf_layer.eval_iterations = crf_iterations
        predictions: list[Prediction | None] = [None] * len(raws)
        for chunk in _equal_size_batches(raws, batch_size):
            batch = torch.stack([raws[i] for i in chunk]).to(device)
            group = _predict_group(network, crf_layer, batch, scales=scales, flip=flip, dtype=dtype)
            for i, prediction in zip(chunk, group):
                predictions[i] = prediction
    finally:
        for m, mode in modes.items():
            m.training = mode
        if crf_iterations is not None:
            crf_layer.eval_iterations = saved_iterations
    return predictions  # type: ignore[return-value]  # every slot is filled


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to predict on: ``device``, checked (:func:`~crfrnn_deeplab.images.check_device`), or (``None``)
    the machine's accelerator if it has one, else the CPU.

    Raises:
        TypeError: not a str, torch.device or None.
        ValueError: not a device name; a device this machine does not have (``cuda`` without a GPU, an index past
            the last GPU); or the ``meta`` device, whose tensors hold no data to compute with.
    """
    if device is None:
        accelerator = torch.accelerator.current_accelerator(check_available=True)
        return accelerator if accelerator is not None else torch.device("cpu")
    return check_device(device, work="a prediction")


def check_crf_iterations(value: object, name: str = "crf_iterations") -> int:
    """A mean-field iteration count for one prediction, ``0..MAX_CRF_ITERATIONS``, as an ``int``.

    Raises:
        TypeError: not an integer (``bool`` included).
        ValueError: negative, or above :data:`MAX_CRF_ITERATIONS`.
    """
    value = _check_int(value, name)
    if not 0 <= value <= MAX_CRF_ITERATIONS:
        raise ValueError(f"{name} must be an int in 0..{MAX_CRF_ITERATIONS}, got {value}")
    return value


def _check_int(value: object, name: str) -> int:
    """``value`` as an ``int``: any integer type (numpy's too) but ``bool``, else TypeError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def _check_flag(value: object, name: str) -> bool:
    """``value`` as a ``bool`` (numpy's too), else TypeError: a truthy string such as ``'no'`` is not a flag."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def _check_not_meta(model: nn.Module) -> None:
    """Raises ValueError when ``model`` has tensors on the meta device (built without data, never loaded)."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_meta:
            raise ValueError(f"the model's {name} is on the meta device (it holds no data): materialise the model "
                             "(to_empty(device=...) and load its weights) before predicting")


def _check_sizes(raws: Sequence[Tensor], scales: tuple[float, ...], min_size: int) -> None:
    """Raises ValueError naming the first image that is smaller than the model accepts at one of the scales."""
    for i, raw in enumerate(raws):
        for s in scales:
            h, w = scaled_size(raw.shape[-2], s), scaled_size(raw.shape[-1], s)
            if min(h, w) < min_size:
                raise ValueError(
                    f"image {i} of size {raw.shape[-2]}x{raw.shape[-1]} is too small: at scale {s} it is {h}x{w}, "
                    f"the model needs sides of at least {min_size}"
                )


def _equal_size_batches(raws: Sequence[Tensor], batch_size: int) -> list[list[int]]:
    """Indices of ``raws`` in batches of at most ``batch_size`` images of one size (sizes are never mixed)."""
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, raw in enumerate(raws):
        by_size[(raw.shape[-2], raw.shape[-1])].append(i)
    return [indices[start : start + batch_size] for indices in by_size.values()
            for start in range(0, len(indices), batch_size)]
