"""Image and score-map tensors shared by every entry point: one validator per kind of input, and the resizing
rules of DeepLab v2.

Kinds of input and who takes them:

- a **raw RGB image** (0–255, what the CRF compares and what ``preprocess`` takes): :func:`check_rgb_image`
  (tensors) and :func:`check_rgb_array` (numpy arrays), used by the CRF layers, ``DenseCRF``, ``predict`` and
  the transforms;
- a **network input** (normalised, floating point): :func:`check_network_input`, used by the DeepLab models;
- **logits** and **valid-pixel masks**: :func:`check_logits`, :func:`check_valid_mask` (2-D images or 3-D
  volumes);
- **CRF guidance** other than an RGB image (grey, several modalities, RGB + depth; any units) and the **voxel
  spacing** of a volume: :func:`check_guidance`, :func:`check_spacing`;
- **input scales** (MSC, test-time augmentation): :func:`check_scales`;
- a **device** to compute on, given by name: :func:`check_device`, used by ``predict`` and ``DenseCRF``.

Errors are ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape or values), each naming the
argument, what it got and what was expected.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

__all__ = [
    "all_finite",
    "check_device",
    "check_guidance",
    "check_logits",
    "check_network_input",
    "check_rgb_array",
    "check_rgb_image",
    "MAX_SCALE",
    "check_scales",
    "check_spacing",
    "check_spatial_dims",
    "check_valid_mask",
    "pil_to_rgb",
    "resize",
    "scaled_size",
]

logger = logging.getLogger(__name__)


def all_finite(x: Tensor) -> bool:
    """Whether every value is finite: one sum (a NaN or inf anywhere makes it non-finite), and the elementwise
    check only when the sum overflowed."""
    if not x.is_floating_point():
        return True
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def _shape(x: object) -> str:
    shape = getattr(x, "shape", None)
    return f"shape {tuple(shape)}" if shape is not None else f"a {type(x).__name__}"


def _axes(spatial_dims: int) -> str:
    """The names of the spatial axes: "H, W" (an image) or "D, H, W" (a volume)."""
    return {2: "H, W", 3: "D, H, W"}.get(spatial_dims, f"{spatial_dims} spatial axes")


def check_spatial_dims(spatial_dims: object) -> int:
    """The number of spatial dimensions of the CRF's inputs: 2 (images) or 3 (volumes)."""
    if isinstance(spatial_dims, bool) or not isinstance(spatial_dims, int) or spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 (images) or 3 (volumes), got {spatial_dims!r}")
    return spatial_dims


def check_rgb_image(image: object, *, name: str = "image", dims: tuple[int, ...] = (4,)) -> Tensor:
    """Checks a raw RGB image tensor (channels first, values 0–255) and returns it.

    Args:
        image: ``Tensor[B, 3, H, W]`` (``dims=(4,)``), ``Tensor[3, H, W]`` (``dims=(3,)``) or either; an RGB
            volume ``Tensor[B, 3, D, H, W]`` with ``dims=(5,)``.
        name: what the caller calls it, for the messages.
        dims: accepted numbers of dimensions.

    Raises:
        TypeError: not a tensor, or not a real dtype (bool, complex).
        ValueError: wrong dimensions or channels, an empty image, NaN/inf, values below 0 or above 255 (a
            normalised network input, or a 16-bit image: scale it to 0–255 first).

    A floating image whose maximum is in (0, 1] is accepted with a warning: it is probably a 0–1 image where
    0–255 was expected, which silently weakens the CRF's colour kernel by 255×.
    """
    layouts = {3: "3, H, W", 4: "B, 3, H, W", 5: "B, 3, D, H, W"}
    brackets = " or ".join(f"Tensor[{layouts[d]}]" for d in dims)
    parens = " or ".join(f"({layouts[d]})" for d in dims)
    if not isinstance(image, Tensor):
        raise TypeError(f"{name} must be a raw RGB {brackets} in 0-255, got {type(image).__name__}")
    if image.is_meta:
        raise ValueError(f"{name} is a meta tensor (it holds no data): give the image itself")
    channels = 0 if image.dim() == 3 else 1  # (3, H, W); (B, 3, H, W) and (B, 3, D, H, W)
    if image.dim() not in dims or image.shape[channels] != 3:
        hint = "; permute an (H, W, 3) tensor with .permute(2, 0, 1)" if image.dim() >= 3 and image.shape[-1] == 3 else ""
        raise ValueError(
            f"{name} must be a raw RGB {brackets} (shape {parens}, 3 (RGB) channels first), got {_shape(image)}{hint}"
        )
    if image.dtype == torch.bool or image.is_complex():
        raise TypeError(f"{name} must hold real RGB values in 0-255, got dtype {image.dtype}")
    if image.shape[-1] == 0 or image.shape[-2] == 0 or (image.dim() >= 4 and image.numel() == 0):
        raise ValueError(f"{name} is empty ({_shape(image)})")
    if image.is_floating_point() and not all_finite(image):
        raise ValueError(f"{name} contains NaN or infinite values")
    values = image.detach()
    if values.dtype in (torch.uint16, torch.uint32, torch.uint64):  # no min/max kernels for these dtypes
        values = values.double()
    low, high = (float(v) for v in torch.aminmax(values))
    if low < 0:
        raise ValueError(
            f"{name} has negative values (min {low:.6g}): expected the raw RGB image in 0-255, not the normalised "
            "network input"
        )
    if high > 255:
        raise ValueError(
            f"{name} has values above 255 (max {high:.6g}): expected raw RGB in 0-255 (a 16-bit image must be "
            "scaled to 0-255 first, e.g. image / 257)"
        )
    if image.is_floating_point() and 0 < high <= 1:
        logger.warning("%s has values of at most %.3g: expected raw RGB in 0-255, not 0-1", name, high)
    return image


def check_rgb_array(image: object, *, name: str = "image") -> np.ndarray:
    """Checks a numpy RGB image ``uint8 [H, W, 3]`` and returns it.

    Raises:
        TypeError: not a numpy array, or not ``uint8`` (other depths are not silently rescaled).
        ValueError: not ``[H, W, 3]`` (the message says how to fix greyscale, RGBA and channels-first arrays),
            or empty.
    """
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name} must be a numpy array [H, W, 3], got {type(image).__name__}")
    if image.ndim != 3 or image.shape[-1] != 3:
        hint = ""
        if image.ndim == 2:
            hint = " (a greyscale image: stack it to (H, W, 3))"
        elif image.ndim == 3 and image.shape[-1] == 4:
            hint = " (RGBA: drop the alpha channel, image[..., :3])"
        elif image.ndim == 3 and image.shape[0] == 3:
            hint = " (channels first: numpy images are (H, W, 3), use image.transpose(1, 2, 0))"
        elif image.ndim == 4 and image.shape[-1] == 3:
            hint = " (a batch of images: give them as a list, list(images))"
        raise ValueError(f"{name} must be a numpy RGB image of shape (H, W, 3), got shape {image.shape}{hint}")
    if image.dtype != np.uint8:
        hint = " (a 16-bit image: convert it to 8 bits, e.g. (image >> 8).astype(np.uint8))" if image.dtype == np.uint16 else ""
        raise TypeError(f"{name} must be a uint8 RGB array (0-255), got dtype {image.dtype}{hint}")
    if image.size == 0:
        raise ValueError(f"{name} is empty (shape {image.shape})")
    return image


_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def pil_to_rgb(image: Image.Image, *, name: str = "image") -> np.ndarray:
    """A PIL image as ``uint8 [H, W, 3]`` RGB, with every depth mapped onto 0–255.

    8-bit modes (RGB, L, P, RGBA, CMYK, ...) go through PIL's own conversion. 16-bit greyscale (``I;16*``, and
    ``I`` with values up to 65535, as PIL opens 16-bit PNGs) is scaled by 255/65535 and rounded; PIL's own
    ``convert("RGB")`` would clip those values to {0, 255}. Float images (``F``) must already hold 0–255.

    Raises:
        ValueError: a 32-bit integer image with values above 65535 or below 0, or a float image outside 0–255,
            whose intended range cannot be known.
    """
    if image.mode not in _HIGH_DEPTH_MODES:
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    values = np.asarray(image, dtype=np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode == "F":
        if low < 0 or high > 255 or not np.isfinite(values).all():
            raise ValueError(f"{name}: a float image (mode 'F') must hold values in 0-255, got [{low:.4g}, {high:.4g}]")
        grey = values
    else:
        if low < 0 or high > 65535:
            raise ValueError(f"{name}: a {image.mode!r} image with values in [{low:.0f}, {high:.0f}] is not 8- or 16-bit")
        grey = values * (255.0 / 65535.0)
    grey = np.rint(grey).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def check_network_input(x: object, *, min_size: int, name: str = "input") -> Tensor:
    """Checks a normalised network input ``Tensor[B, 3, H, W]`` (floating point, sides ``>= min_size``)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a Tensor[B, 3, H, W], got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D tensor of shape (B, 3, H, W), got {_shape(x)}")
    if x.shape[1] != 3:
        raise ValueError(f"{name}: expected 3 channels in a (B, 3, H, W) tensor, got {x.shape[1]} ({_shape(x)})")
    if not x.is_floating_point():
        raise TypeError(
            f"{name}: expected a floating-point tensor (the normalised network input), got dtype {x.dtype}; "
            "turn raw 0-255 RGB images into network input with model.preprocess(images)"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch ({_shape(x)})")
    height, width = x.shape[-2:]
    if min(height, width) < min_size:
        raise ValueError(f"image of size {height}x{width} is too small: the minimum is {min_size}x{min_size} for this model")
    return x


def check_logits(logits: object, *, name: str = "logits", spatial_dims: int = 2) -> Tensor:
    """Checks unary logits ``Tensor[B, C, H, W]`` (or ``Tensor[B, C, D, H, W]`` with ``spatial_dims=3``):
    floating point, non-empty, finite."""
    axes = _axes(check_spatial_dims(spatial_dims))
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, C, {axes}], got {type(logits).__name__}")
    if logits.dim() != spatial_dims + 2:
        hint = ""
        if spatial_dims != 2 or logits.dim() > 4:
            hint = f" ({logits.dim() - 2} spatial dimensions where {spatial_dims} were expected)"
        raise ValueError(f"{name} must be a Tensor[B, C, {axes}], got {_shape(logits)}{hint}")
    if not logits.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {logits.dtype}")
    if logits.numel() == 0:
        raise ValueError(f"{name} are empty ({_shape(logits)})")
    if not all_finite(logits):
        raise ValueError(f"{name} contain NaN or infinite values")
    return logits


def check_valid_mask(mask: object, *, shape: tuple[int, ...], device: torch.device, name: str = "valid_mask") -> Tensor:
    """Checks a valid-pixel mask: a bool tensor of ``shape`` ([B, H, W], or [B, D, H, W] for volumes) on
    ``device``."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor {list(shape)}, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must be a Tensor[B, {_axes(len(shape) - 1)}] = {tuple(shape)}, got {_shape(mask)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got dtype {mask.dtype}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device}, the logits on {device}")
    return mask


def check_guidance(
    guidance: object, *, groups: Sequence[int], spatial_dims: int = 2, name: str = "image"
) -> Tensor:
    """Checks a CRF guidance tensor other than the raw RGB image and returns it.

    Guidance is what the appearance kernel compares (grey levels, several MRI modalities, RGB + depth, ...), in
    its own units: there is no fixed range to check, only its layout and finiteness.

    Args:
        guidance: ``Tensor[B, K, H, W]`` (or ``Tensor[B, K, D, H, W]`` with ``spatial_dims=3``), real dtype.
        groups: the channel counts of the guidance groups (each group has its own bandwidth); they must add
            up to K.
        spatial_dims: 2 (images) or 3 (volumes).
        name: what the caller calls it, for the messages.

    Raises:
        TypeError: not a tensor, or not a real dtype (bool, complex).
        ValueError: wrong dimensions, K = 0, K not the sum of ``groups``, an empty tensor, NaN/inf.
    """
    axes = _axes(check_spatial_dims(spatial_dims))
    groups = tuple(groups)
    if not isinstance(guidance, Tensor):
        raise TypeError(f"{name} must be a guidance Tensor[B, K, {axes}], got {type(guidance).__name__}")
    if guidance.dim() != spatial_dims + 2:
        raise ValueError(
            f"{name} must be a guidance Tensor[B, K, {axes}] (channels first), got {_shape(guidance)} "
            f"({guidance.dim() - 2} spatial dimensions where {spatial_dims} were expected)"
        )
    if guidance.dtype == torch.bool or guidance.is_complex():
        raise TypeError(f"{name} must hold real guidance values, got dtype {guidance.dtype}")
    channels = guidance.shape[1]
    if channels == 0:
        raise ValueError(f"{name} has no guidance channels (K = 0, {_shape(guidance)}): expected K >= 1")
    if channels != sum(groups):
        raise ValueError(
            f"{name} has K = {channels} guidance channels, but the guidance groups {groups} add up to {sum(groups)}"
        )
    if guidance.numel() == 0:
        raise ValueError(f"{name} is empty ({_shape(guidance)})")
    if guidance.is_floating_point() and not all_finite(guidance):
        raise ValueError(f"{name} contains NaN or infinite values")
    return guidance


def check_spacing(spacing: object, *, spatial_dims: int, name: str = "spacing") -> tuple[float, ...]:
    """The physical size of a voxel along each spatial axis (e.g. millimetres, in the axes' order), as floats.

    Raises:
        ValueError: not a sequence (or 1-D tensor / array) of ``spatial_dims`` finite numbers > 0.
    """
    check_spatial_dims(spatial_dims)
    if isinstance(spacing, (Tensor, np.ndarray)):
        spacing = spacing.tolist() if spacing.ndim == 1 else spacing
    if isinstance(spacing, (str, bytes)) or not isinstance(spacing, Sequence):
        raise ValueError(f"{name} must be a sequence of {spatial_dims} voxel sizes > 0, got {spacing!r}")
    if len(spacing) != spatial_dims:
        raise ValueError(
            f"{name} must give one voxel size per spatial axis ({spatial_dims}, for {_axes(spatial_dims)}), "
            f"got {len(spacing)}: {tuple(spacing)!r}"
        )
    for s in spacing:
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s) or s <= 0:
            raise ValueError(f"{name} must hold finite voxel sizes > 0, got {tuple(spacing)!r}")
    return tuple(float(s) for s in spacing)


#: Largest input scale (MSC, test-time augmentation). DeepLab's scales are 0.5-1.5; 8 still lets a thumbnail be
#: upscaled, while the cost grows with the square of the scale (and an absurd one would overflow the resized size).
MAX_SCALE = 8.0


def check_scales(scales: object) -> tuple[float, ...]:
    """Input scales (MSC, test-time augmentation) as a tuple of floats, each in ``(0, MAX_SCALE]``.

    Raises:
        ValueError: not a non-empty sequence of positive finite numbers, or a scale above :data:`MAX_SCALE`.
    """
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence) or len(scales) == 0:
        raise ValueError(f"scales must be a non-empty sequence of positive numbers, got {scales!r}")
    for s in scales:
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s) or s <= 0:
            raise ValueError(f"scales must be positive finite numbers, got {tuple(scales)!r}")
        if s > MAX_SCALE:
            raise ValueError(f"scales must be at most {MAX_SCALE:g} (each resizes the image by that factor), got {s!r}")
    return tuple(float(s) for s in scales)


def check_device(device: object, *, work: str = "compute") -> torch.device:
    """``device`` (a name such as ``"cpu"`` or ``"cuda:0"``, or a torch.device) as a torch.device this machine has.

    Raises:
        TypeError: not a str or torch.device.
        ValueError: not a device name; a device this machine does not have (``cuda`` without a GPU, an index past
            the last GPU); or the ``meta`` device, whose tensors hold no data (``work`` says what it would have run).
    """
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str or torch.device such as 'cpu' or 'cuda:0', got {type(device).__name__}")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:  # an unknown device type, a malformed index
        raise ValueError(f"device {str(device)!r} is not a torch device: {e}") from None
    if resolved.type == "cpu":
        return resolved
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    usable = "'cpu'" + (f" or {accelerator.type!r}" if accelerator is not None else "")
    if resolved.type == "meta":
        raise ValueError(f"device 'meta' cannot run {work} (meta tensors hold no data); use {usable}")
    if accelerator is None or resolved.type != accelerator.type:
        raise ValueError(f"device {str(device)!r} is not available on this machine; use {usable}")
    count = torch.accelerator.device_count()
    if resolved.index is not None and resolved.index >= count:
        raise ValueError(f"device {str(device)!r} does not exist: this machine has {count} {accelerator.type} "
                         f"device(s), indices 0..{count - 1}")
    return resolved


def scaled_size(size: int, scale: float) -> int:
    """Side of a rescaled image: ``floor((size - 1) * scale) + 1``, as DeepLab v2's Caffe ``Interp`` layer
    (321 → 241 at 0.75, → 161 at 0.5; the stride-8 score maps are then 41, 31 and 21)."""
    return math.floor((size - 1) * scale) + 1


def resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of ``Tensor[B, C, H, W]`` (``align_corners=False``); a no-op when the size matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
