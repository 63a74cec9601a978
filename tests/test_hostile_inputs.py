"""Hostile input to the library's public entry points: each case gets a clear error of the documented class whose
message names the problem, never a silent wrong result or an internal error.

Table-driven: ``(id, call, error class, regex the message must match)``. The command-line entry points have
their own cases next to their tests (tests/training, tests/predict, tests/weights).
"""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from crfrnn_deeplab import DenseCRF, InputConvention, MeanFieldCRF, TrainTransform, get_model
from crfrnn_deeplab.data.io import DatasetError, read_image
from crfrnn_deeplab.images import pil_to_rgb
from crfrnn_deeplab.models import MSC
from crfrnn_deeplab.predict import predict, to_raw_batch

G = torch.Generator().manual_seed(0)
LOGITS = torch.randn(1, 3, 9, 11, generator=G)
IMAGE = torch.randint(0, 256, (1, 3, 9, 11), generator=G).float()
MASK = torch.ones(1, 9, 11, dtype=torch.bool)
RGB = np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8)
PROBS = np.full((3, 9, 11), 1 / 3, np.float32)


def crf(logits=LOGITS, image=IMAGE, mask=None, **options):
    return MeanFieldCRF(num_classes=3, **options).eval()(logits, image, mask)


def dense(image=RGB, probabilities=PROBS, **kw):
    return DenseCRF(iterations=2)(image, probabilities, **kw)


NET = get_model("deeplabv2_resnet18", num_classes=3, base_width=4).eval()

CASES = [
    # MeanFieldCRF.forward: logits
    ("crf numpy logits", lambda: crf(logits=LOGITS.numpy()), TypeError, r"logits must be a torch.Tensor.*ndarray"),
    ("crf 3-D logits", lambda: crf(logits=LOGITS[0]), ValueError, r"logits must be a Tensor\[B, C, H, W\], got shape \(3, 9, 11\)"),
    ("crf integer logits", lambda: crf(logits=LOGITS.long()), TypeError, r"logits must be floating point, got dtype torch.int64"),
    ("crf empty batch", lambda: crf(logits=LOGITS[:0], image=IMAGE[:0]), ValueError, r"logits are empty"),
    ("crf zero height", lambda: crf(logits=LOGITS[:, :, :0], image=IMAGE[:, :, :0]), ValueError, r"logits are empty"),
    ("crf NaN logits", lambda: crf(logits=LOGITS.clone().index_fill_(2, torch.tensor([1]), float("nan"))), ValueError, r"logits contain NaN"),
    ("crf inf logits", lambda: crf(logits=LOGITS.clone().index_fill_(2, torch.tensor([1]), float("inf"))), ValueError, r"NaN or infinite"),
    ("crf wrong classes", lambda: crf(logits=LOGITS[:, :2]), ValueError, r"logits have 2 classes, the CRF was built for 3"),
    # MeanFieldCRF.forward: image
    ("crf numpy image", lambda: crf(image=IMAGE.numpy()), TypeError, r"image must be a raw RGB Tensor\[B, 3, H, W\].*ndarray"),
    ("crf 2-channel image", lambda: crf(image=IMAGE[:, :2]), ValueError, r"3 \(RGB\) channels first\), got shape \(1, 2, 9, 11\)"),
    ("crf channels-last image", lambda: crf(image=IMAGE.permute(0, 2, 3, 1)), ValueError, r"raw RGB Tensor"),
    ("crf 16-bit image", lambda: crf(image=IMAGE * 257), ValueError, r"values above 255 \(max 6\d+\).*16-bit"),
    ("crf uint16 image", lambda: crf(image=torch.full((1, 3, 9, 11), 4000, dtype=torch.uint16)), ValueError, r"above 255 \(max 4000\)"),
    ("crf int32 image 0-65535", lambda: crf(image=torch.full((1, 3, 9, 11), 65535, dtype=torch.int32)), ValueError, r"above 255"),
    ("crf normalised image", lambda: crf(image=IMAGE / 255 - 0.5), ValueError, r"negative values.*not the normalised network input"),
    ("crf NaN image", lambda: crf(image=IMAGE.clone().fill_(float("nan"))), ValueError, r"image contains NaN"),
    ("crf bool image", lambda: crf(image=IMAGE > 0), TypeError, r"real RGB values.*torch.bool"),
    ("crf complex image", lambda: crf(image=IMAGE.to(torch.complex64)), TypeError, r"torch.complex64"),
    ("crf image of another size", lambda: crf(image=IMAGE[..., :-1]), ValueError, r"does not match logits"),
    ("crf image of another batch", lambda: crf(image=IMAGE.expand(2, -1, -1, -1)), ValueError, r"does not match logits"),
    # MeanFieldCRF.forward: mask
    ("crf mask of another size", lambda: crf(mask=MASK[..., :-1]), ValueError, r"valid_mask must be a Tensor\[B, H, W\] = \(1, 9, 11\)"),
    ("crf float mask", lambda: crf(mask=MASK.float()), TypeError, r"valid_mask must be a bool tensor, got dtype torch.float32"),
    ("crf numpy mask", lambda: crf(mask=MASK.numpy()), TypeError, r"valid_mask must be a bool torch.Tensor"),
    # MeanFieldCRF construction
    ("crf NaN bilateral weight", lambda: crf(bilateral_weight=float("nan")), ValueError, r"bilateral_weight must be a finite number, got nan"),
    ("crf inf spatial weight", lambda: crf(spatial_weight=float("inf")), ValueError, r"spatial_weight must be a finite number"),
    ("crf overflowing weight", lambda: crf(bilateral_weight=1e38), ValueError, r"μ W_bilateral \(the compatibility times the bilateral kernel weights\) has a column whose \|entries\| sum to 2e\+38: above 3.09e\+26"),
    ("crf string weight", lambda: crf(spatial_weight="3"), ValueError, r"spatial_weight must be a finite number, got '3'"),
    ("crf zero theta_alpha", lambda: crf(theta_alpha=0.0), ValueError, r"theta_alpha must be a finite bandwidth > 0"),
    ("crf NaN theta_beta", lambda: crf(theta_beta=float("nan")), ValueError, r"theta_beta must be a finite bandwidth"),
    ("crf negative theta_gamma", lambda: crf(theta_gamma=-3.0), ValueError, r"theta_gamma"),
    ("crf no classes", lambda: MeanFieldCRF(num_classes=0), ValueError, r"num_classes must be an int >= 1, got 0"),
    ("crf float classes", lambda: MeanFieldCRF(num_classes=2.5), ValueError, r"num_classes must be an int"),
    ("crf normalisation", lambda: crf(normalization="before"), ValueError, r"normalization must be 'symmetric' or 'after'"),
    ("crf bilateral filter", lambda: crf(bilateral_filter="dense"), ValueError, r"bilateral_filter must be 'auto', 'lattice' or 'exact', got 'dense'"),
    ("crf negative iterations", lambda: crf(eval_iterations=-1), ValueError, r"eval_iterations must be an int >= 0"),
    # DenseCRF
    ("dense empty image", lambda: dense(image=np.zeros((0, 11, 3), np.uint8)), ValueError, r"image is empty"),
    ("dense uint16 image", lambda: dense(image=RGB.astype(np.uint16) * 257), ValueError, r"above 255.*16-bit"),
    ("dense float image 0-65535", lambda: dense(image=RGB.astype(np.float32) * 257), ValueError, r"above 255"),
    ("dense NaN image", lambda: dense(image=np.full((9, 11, 3), np.nan, np.float32)), ValueError, r"NaN"),
    ("dense channels-first numpy", lambda: dense(image=RGB.transpose(2, 0, 1)), ValueError, r"\(H, W, 3\)"),
    ("dense list image", lambda: dense(image=RGB.tolist()), TypeError, r"numpy array or a torch.Tensor, got list"),
    ("dense unnormalised probabilities", lambda: dense(probabilities=PROBS * 2), ValueError, r"sum to 1"),
    ("dense negative probabilities", lambda: dense(probabilities=PROBS - 1), ValueError, r"non-negative"),
    ("dense NaN logits", lambda: dense(probabilities=None, logits=np.full((3, 9, 11), np.nan, np.float32)), ValueError, r"NaN"),
    ("dense both inputs", lambda: dense(logits=PROBS), ValueError, r"exactly one of probabilities"),
    ("dense size mismatch", lambda: dense(probabilities=PROBS[:, :-1]), ValueError, r"does not match logits"),
    ("dense zero iterations", lambda: DenseCRF(iterations=0), ValueError, r"iterations must be a positive int"),
    ("dense NaN weight", lambda: DenseCRF(bilateral_weight=float("nan")), ValueError, r"bilateral_weight must be a finite number"),
    ("dense bad mask", lambda: dense(valid_mask=np.ones((9, 11), np.float32)), TypeError, r"valid_mask must be bool"),
    # prediction: images
    ("predict no images", lambda: to_raw_batch([]), ValueError, r"at least one image"),
    ("predict path string", lambda: to_raw_batch("photo.jpg"), TypeError, r"got str"),
    ("predict uint16 array", lambda: to_raw_batch(RGB.astype(np.uint16)), TypeError, r"uint8.*16-bit image: convert it"),
    ("predict float array", lambda: to_raw_batch(RGB.astype(np.float32)), TypeError, r"uint8 RGB array.*float32"),
    ("predict greyscale array", lambda: to_raw_batch(RGB[..., 0]), ValueError, r"greyscale"),
    ("predict RGBA array", lambda: to_raw_batch(np.dstack([RGB, RGB[..., :1]])), ValueError, r"RGBA"),
    ("predict batch array", lambda: to_raw_batch(np.stack([RGB, RGB])), ValueError, r"batch of images.*list"),
    ("predict empty array", lambda: to_raw_batch(np.zeros((0, 4, 3), np.uint8)), ValueError, r"empty"),
    ("predict channels-last tensor", lambda: to_raw_batch(torch.zeros(9, 11, 3)), ValueError, r"permute"),
    ("predict 16-bit tensor", lambda: to_raw_batch(torch.full((3, 9, 11), 1000.0)), ValueError, r"above 255"),
    ("predict negative tensor", lambda: to_raw_batch(torch.full((3, 9, 11), -1.0)), ValueError, r"negative values"),
    ("predict second image bad", lambda: to_raw_batch([RGB, 7]), TypeError, r"image 1"),
    ("predict float PIL out of range", lambda: to_raw_batch(Image.fromarray(np.full((4, 4), 300.0, np.float32))), ValueError, r"mode 'F'.*0-255"),
    # prediction: options
    ("predict no scales", lambda: predict(NET, RGB, scales=()), ValueError, r"scales must be a non-empty sequence"),
    ("predict NaN scale", lambda: predict(NET, RGB, scales=(float("nan"),)), ValueError, r"positive finite numbers"),
    ("predict zero batch", lambda: predict(NET, RGB, batch_size=0), ValueError, r"batch_size must be an int >= 1, got 0"),
    ("predict CRF iterations without CRF", lambda: predict(NET, RGB, crf_iterations=3), ValueError, r"no CRF runs"),
    ("predict image too small", lambda: predict(NET, RGB[:4, :4]), ValueError, r"too small"),
    ("predict not a model", lambda: predict(torch.nn.Linear(2, 2), RGB), TypeError, r"DeepLabV2, MSC or CRFRNN"),
    # models
    ("model uint8 input", lambda: NET(torch.zeros(1, 3, 16, 16, dtype=torch.uint8)), TypeError, r"floating-point.*model.preprocess"),
    ("model empty batch", lambda: NET(torch.zeros(0, 3, 16, 16)), ValueError, r"empty batch"),
    ("model tiny input", lambda: NET(torch.zeros(1, 3, 4, 16)), ValueError, r"image of size 4x16 is too small: the minimum is 8x8"),
    ("model unknown name", lambda: get_model("deeplabv3_resnet50", num_classes=3), ValueError, r"unknown model 'deeplabv3_resnet50'; known models"),
    ("model zero classes", lambda: get_model("deeplabv2_resnet18", num_classes=0), ValueError, r"num_classes must be >= 1"),
    ("model unknown option", lambda: get_model("deeplabv2_resnet18", num_classes=3, widht=4), TypeError, r"unknown option\(s\) \['widht'\]"),
    ("model bad head", lambda: get_model("deeplabv2_resnet18", num_classes=3, head="aspp_xl"), ValueError, r"aspp_xl"),
    ("model bad stride", lambda: get_model("deeplabv2_resnet18", num_classes=3, output_stride=32), ValueError, r"output_stride"),
    ("msc bad fusion", lambda: MSC(model=NET, fusion="mean"), ValueError, r"fusion must be 'input' or 'score_map'"),
    ("msc empty scales", lambda: MSC(model=NET, scales=[]), ValueError, r"scales must be a non-empty sequence"),
    ("convention unknown key", lambda: InputConvention.from_dict({"channel_order": "RGB", "gamma": 2}), ValueError, r"unknown InputConvention keys \['gamma'\]"),
    # transforms
    ("transform zero crop", lambda: TrainTransform(InputConvention(), crop_size=0), ValueError, r"crop_size"),
    ("transform inverted scales", lambda: TrainTransform(InputConvention(), scale_range=(1.5, 0.5)), ValueError, r"scale_range must be \(min, max\)"),
    ("transform flip probability 5", lambda: TrainTransform(InputConvention(), hflip_prob=5), ValueError, r"hflip_prob must be in \[0, 1\], got 5"),
    ("transform ignore 0", lambda: TrainTransform(InputConvention(), ignore_index=0), ValueError, r"ignore_index must be an int in 1..255"),
    ("transform float image", lambda: TrainTransform(InputConvention())({"image": RGB.astype(np.float32), "label": RGB[..., 0]}), TypeError, r"uint8 RGB array"),
    ("transform label size", lambda: TrainTransform(InputConvention())({"image": RGB, "label": RGB[:-1, :, 0]}), ValueError, r"image is \(9, 11\) but label is \(8, 11\)"),
]


@pytest.mark.parametrize("call, error, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_input_gets_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_case_ids_are_unique():
    assert len({c[0] for c in CASES}) == len(CASES)


def test_crf_warns_about_a_0_1_image(caplog):
    with caplog.at_level(logging.WARNING):
        crf(image=IMAGE / 255)
    assert "expected raw RGB in 0-255, not 0-1" in caplog.text


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    # PIL's convert("RGB") clips 16-bit greyscale to {0, 255}; every reader must scale by 255/65535 instead.
    values = np.array([[0, 257, 32896], [40000, 65280, 65535]], np.uint16)
    path = tmp_path / "deep.png"
    path.write_bytes(_png(values))
    expected = np.rint(values / 257.0).astype(np.uint8)
    image = read_image(path)
    assert image.dtype == np.uint8 and image.shape == (2, 3, 3)
    np.testing.assert_array_equal(image[..., 0], expected)
    np.testing.assert_array_equal(image[..., 0], image[..., 2])
    with Image.open(path) as pil:
        raw = to_raw_batch(pil)[0]
    np.testing.assert_array_equal(raw[0].numpy(), expected.astype(np.float32))


def test_unreadable_image_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_image(tmp_path / "missing.png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(_png(RGB)[:40])
    with pytest.raises(DatasetError, match="cannot decode image .*truncated.png"):
        read_image(truncated)
    with pytest.raises(ValueError, match="not 8- or 16-bit"):
        pil_to_rgb(Image.fromarray(np.array([[70000]], np.int32), "I"))
