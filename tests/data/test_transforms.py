"""Training and evaluation transforms: alignment, padding, the output contract, worker seeding."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch.utils.data import DataLoader, Dataset, default_collate

from crfrnn_deeplab.models.conventions import CAFFE_CONVENTION, TORCHVISION_CONVENTION, InputConvention
from crfrnn_deeplab.data.transforms import EvalTransform, TrainTransform

# One distinct colour per label value; 255 (ignore) has its own colour so that alignment is checked there too.
_COLOURS = {
    0: (20, 30, 40), 1: (230, 20, 20), 2: (20, 220, 30), 3: (30, 40, 225), 4: (240, 230, 30), 255: (200, 40, 210)
}  # fmt: skip


def _colour_coded_sample(h: int = 90, w: int = 120, seed: int = 0) -> dict:
    """Label = random blocks of 0..4 plus an ignore block; image colour = a function of the label."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 5, size=(-(-h // 15), -(-w // 15)))
    label = np.kron(grid, np.ones((15, 15), dtype=np.int64))[:h, :w].astype(np.uint8)
    label[30:45, 60:90] = 255  # an ignore region inside the real image
    lut = np.zeros((256, 3), dtype=np.uint8)
    for k, c in _COLOURS.items():
        lut[k] = c
    return {"image": lut[label], "label": label, "id": f"blocks{seed}"}


def _interior(label: np.ndarray, valid: np.ndarray, radius: int = 1) -> np.ndarray:
    """Valid pixels whose (2r+1)^2 neighbourhood is valid and has a single label (away from any edge).

    Pixels within ``radius`` of the crop's border are left out too: bilinear scaling blended them with
    neighbours that the crop cut away.
    """
    size = 2 * radius + 1
    lo = ndimage.minimum_filter(label, size=size, mode="nearest")
    hi = ndimage.maximum_filter(label, size=size, mode="nearest")
    all_valid = ndimage.minimum_filter(valid.astype(np.uint8), size=size, mode="nearest").astype(bool)
    inner = (lo == hi) & all_valid
    inner[:radius], inner[-radius:], inner[:, :radius], inner[:, -radius:] = False, False, False, False
    return inner


def _misaligned(out: dict) -> int:
    """Interior pixels of a transformed colour-coded sample whose raw colour is not their label's colour."""
    palette = np.zeros((256, 3), dtype=np.float32)
    for k, c in _COLOURS.items():
        palette[k] = c
    label, valid = out["label"].numpy(), out["valid"].numpy()
    inner = _interior(label, valid)
    assert inner.sum() > 100
    error = np.abs(out["raw"].permute(1, 2, 0).numpy() - palette[label]).max(-1)
    return int((inner & (error > 1.0)).sum())


@pytest.mark.parametrize("convention", [TORCHVISION_CONVENTION, CAFFE_CONVENTION], ids=["torchvision", "caffe"])
def test_train_transform_keeps_image_and_label_aligned(convention):
    """Scale (bilinear image, nearest label), pad, crop and flip move image and label together, to the pixel."""
    transform = TrainTransform(convention, crop_size=96, seed=0)
    sample = _colour_coded_sample()
    saw_padding = saw_full = 0
    for seed in range(40):
        transform.set_random_seed(seed)
        out = transform(sample)
        assert out["image"].shape == out["raw"].shape == (3, 96, 96)
        assert out["label"].shape == out["valid"].shape == (96, 96)
        assert _misaligned(out) == 0, f"seed {seed}: colour does not encode the label"
        assert set(torch.unique(out["label"]).tolist()) <= set(_COLOURS)  # no new label values
        saw_padding += bool((~out["valid"]).any())
        saw_full += bool(out["valid"].all())
    assert saw_padding and saw_full  # the scale range produced both small (padded) and large images


def test_alignment_check_catches_a_one_pixel_shift():
    """The check above has teeth: a label shifted by one pixel against its image fails it."""
    transform = TrainTransform(TORCHVISION_CONVENTION, crop_size=96, seed=0)
    sample = _colour_coded_sample()
    shifted = {**sample, "label": np.roll(sample["label"], 1, axis=1)}
    failures = 0
    for seed in range(10):
        transform.set_random_seed(seed)
        failures += _misaligned(transform(shifted)) > 0
    assert failures >= 5


def test_padding_uses_ignore_label_mean_colour_and_invalid():
    sample = _colour_coded_sample(20, 30)
    sample["label"][0, 0] = 255
    transform = TrainTransform(CAFFE_CONVENTION, crop_size=(40, 50), scale_range=(1.0, 1.0), hflip_prob=0.0)
    out = transform(sample)
    valid = out["valid"]
    expected_valid = torch.zeros(40, 50, dtype=torch.bool)
    expected_valid[:20, :30] = True  # image at the top left, padding at the bottom and right
    assert torch.equal(valid, expected_valid)
    assert torch.equal(out["label"][:20, :30], torch.from_numpy(sample["label"]).long())
    assert bool((out["label"][~valid] == 255).all())
    assert bool(valid[0, 0]) and out["label"][0, 0] == 255  # ignore inside the image stays valid
    mean = torch.tensor(CAFFE_CONVENTION.pixel_mean_rgb255)
    assert torch.equal(out["raw"][:, ~valid], mean[:, None].expand(3, int((~valid).sum())))
    assert torch.allclose(out["image"][:, ~valid], torch.zeros(1), atol=1e-4)  # mean normalises to 0
    assert torch.equal(out["raw"][:, :20, :30], torch.from_numpy(sample["image"]).permute(2, 0, 1).float())


@pytest.mark.parametrize(
    "convention",
    [TORCHVISION_CONVENTION, CAFFE_CONVENTION, InputConvention(mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))],
    ids=["torchvision", "caffe", "custom"],
)
def test_image_is_normalized_raw(convention):
    sample = _colour_coded_sample(50, 70, seed=3)
    rng = np.random.default_rng(0)
    sample["image"] = rng.integers(0, 256, size=sample["image"].shape, dtype=np.uint8)
    for transform in (TrainTransform(convention, crop_size=64, seed=1), EvalTransform(convention, pad_divisor=16)):
        out = transform(sample)
        assert out["image"].dtype == out["raw"].dtype == torch.float32
        assert out["label"].dtype == torch.int64 and out["valid"].dtype == torch.bool
        assert out["raw"].min() >= 0 and out["raw"].max() <= 255
        torch.testing.assert_close(out["image"], convention.normalize(out["raw"]), rtol=0, atol=1e-5)
        assert out["id"] == "blocks3"


def test_label_scaling_is_nearest():
    sample = _colour_coded_sample(60, 60)
    transform = TrainTransform(TORCHVISION_CONVENTION, crop_size=30, scale_range=(0.5, 0.5), hflip_prob=0.0)
    out = transform(sample)
    assert set(torch.unique(out["label"]).tolist()) <= set(_COLOURS)  # no blended label values
    assert out["valid"].all()  # 60 * 0.5 = 30 = crop size


def test_eval_transform_does_not_resize_and_pads():
    sample = _colour_coded_sample(37, 50)
    plain = EvalTransform(TORCHVISION_CONVENTION)(sample)
    assert plain["label"].shape == (37, 50) and plain["valid"].all()
    assert torch.equal(plain["label"], torch.from_numpy(sample["label"]).long())
    assert torch.equal(plain["raw"], torch.from_numpy(sample["image"]).permute(2, 0, 1).float())

    out = EvalTransform(TORCHVISION_CONVENTION, pad_to=45, pad_divisor=8)(sample)
    assert out["label"].shape == (48, 56)
    assert torch.equal(out["label"][:37, :50], plain["label"])
    assert out["valid"][:37, :50].all() and not out["valid"][37:].any() and not out["valid"][:, 50:].any()
    assert bool((out["label"][~out["valid"]] == 255).all())
    mean = torch.tensor(TORCHVISION_CONVENTION.pixel_mean_rgb255)
    assert torch.allclose(out["raw"][:, 40, 52], mean)

    no_label = EvalTransform(TORCHVISION_CONVENTION, pad_to=(40, 64))({"image": sample["image"], "id": "x"})
    assert "label" not in no_label and no_label["image"].shape == (3, 40, 64)


def test_default_collate_batches_samples():
    transform = TrainTransform(TORCHVISION_CONVENTION, crop_size=32, seed=0)
    batch = default_collate([transform(_colour_coded_sample(seed=s)) for s in range(3)])
    assert batch["image"].shape == batch["raw"].shape == (3, 3, 32, 32)
    assert batch["label"].shape == batch["valid"].shape == (3, 32, 32)
    assert batch["id"] == ["blocks0", "blocks1", "blocks2"]


def test_int64_labels_are_accepted():
    sample = _colour_coded_sample(20, 20)
    sample["label"] = sample["label"].astype(np.int64)
    out = TrainTransform(TORCHVISION_CONVENTION, crop_size=16, seed=0)(sample)
    assert out["label"].dtype == torch.int64


def test_transforms_pickle_and_seed_reproducibly():
    sample = _colour_coded_sample()
    a = TrainTransform(TORCHVISION_CONVENTION, crop_size=48, seed=5)
    b = pickle.loads(pickle.dumps(TrainTransform(TORCHVISION_CONVENTION, crop_size=48, seed=5)))
    for _ in range(3):
        assert torch.equal(a(sample)["raw"], b(sample)["raw"])
    pickle.loads(pickle.dumps(EvalTransform(CAFFE_CONVENTION, pad_divisor=8)))


class _SameImage(Dataset):
    def __init__(self, transform):
        self.sample, self.transform = _colour_coded_sample(), transform

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return self.transform(self.sample)["raw"]


def _run_loader(dataset) -> torch.Tensor:
    loader = DataLoader(dataset, batch_size=1, num_workers=2, shuffle=False)
    return torch.cat(list(loader))


def test_workers_get_different_augmentations_reproducibly():
    """albumentations 2.0 alone would give both workers the same augmentation stream."""
    dataset = _SameImage(TrainTransform(TORCHVISION_CONVENTION, crop_size=48, seed=0))
    torch.manual_seed(0)
    first = _run_loader(dataset)
    # index 0 goes to worker 0 and index 1 to worker 1: their first draws must differ
    assert not torch.equal(first[0], first[1])
    assert len({tuple(x.flatten()[::97].tolist()) for x in first}) == 8
    torch.manual_seed(0)
    assert torch.equal(first, _run_loader(dataset))  # same torch seed -> same augmentations
    torch.manual_seed(1)
    assert not torch.equal(first, _run_loader(dataset))  # next "epoch" seed -> new augmentations


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: TrainTransform("imagenet"), TypeError, "convention must be an InputConvention"),
        (lambda: TrainTransform(TORCHVISION_CONVENTION, crop_size=0), ValueError, "crop_size must be positive"),
        (lambda: TrainTransform(TORCHVISION_CONVENTION, crop_size=1.5), TypeError, "crop_size must be an int"),
        (lambda: TrainTransform(TORCHVISION_CONVENTION, scale_range=(1.5, 0.5)), ValueError, "scale_range"),
        (lambda: TrainTransform(TORCHVISION_CONVENTION, hflip_prob=2.0), ValueError, "hflip_prob"),
        (lambda: TrainTransform(TORCHVISION_CONVENTION, ignore_index=0), ValueError, "ignore_index must be"),
        (lambda: TrainTransform(TORCHVISION_CONVENTION, seed="x"), TypeError, "seed must be an int"),
        (lambda: EvalTransform(TORCHVISION_CONVENTION, pad_divisor=0), ValueError, "pad_divisor"),
        # upper bounds, before anything is allocated
        (lambda: TrainTransform(TORCHVISION_CONVENTION, crop_size=100000), ValueError,
         r"crop_size must be at most 8192 pixels a side, got \(100000, 100000\)"),
        (lambda: TrainTransform(TORCHVISION_CONVENTION, crop_size=(321, 9000)), ValueError, "crop_size must be at"),
        (lambda: EvalTransform(TORCHVISION_CONVENTION, pad_to=10**6), ValueError, "pad_to must be at most 8192"),
        (lambda: EvalTransform(TORCHVISION_CONVENTION, pad_divisor=10**6), ValueError,
         "pad_divisor must be at most 1024, got 1000000"),
        *[(lambda r=r: TrainTransform(TORCHVISION_CONVENTION, scale_range=r), ValueError,
           r"scale_range must be \(min, max\) with 0.1 <= min <= max <= 8, got")
          for r in [(200, 200), (float("inf"), float("inf")), (0.5, 1e9), (1e-6, 1e-6), (float("nan"), 1.0)]],
        (lambda: TrainTransform(TORCHVISION_CONVENTION, scale_range=5), TypeError,
         r"scale_range must be a \(min, max\) pair of numbers, got 5"),
        (lambda: TrainTransform(TORCHVISION_CONVENTION, scale_range=(0.5, 1.0, 1.5)), TypeError, "scale_range must be"),
        (lambda: TrainTransform(TORCHVISION_CONVENTION, seed=-1), ValueError, "seed must be a non-negative int or"),
        (lambda: TrainTransform(TORCHVISION_CONVENTION).set_random_seed(-1), ValueError, "seed must be a non-negative"),
        (lambda: TrainTransform(TORCHVISION_CONVENTION, hflip_prob="x"), ValueError, "hflip_prob must be in"),
    ],
)
def test_bad_arguments(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_bad_samples():
    transform = TrainTransform(TORCHVISION_CONVENTION, crop_size=16)
    sample = _colour_coded_sample(20, 20)
    with pytest.raises(TypeError, match="image must be a uint8 RGB array"):
        transform({**sample, "image": sample["image"].astype(np.float32)})
    with pytest.raises(TypeError, match="expected a sample dict"):
        transform((sample["image"], sample["label"]))
    with pytest.raises(ValueError, match="has no 'label'; the training transform needs one"):
        transform({"image": sample["image"], "id": "x"})
    with pytest.raises(ValueError, match=r"image is \(20, 20\) but label is \(19, 20\)"):
        transform({**sample, "label": sample["label"][:-1]})
    with pytest.raises(TypeError, match="label must be an integer array"):
        transform({**sample, "label": sample["label"].astype(np.float32)})


def test_a_negative_ignore_value_is_named_with_the_values():
    # the message named only the dtype ("must be non-negative int32, got int64") for a label using -1 as ignore
    sample = _colour_coded_sample(20, 20)
    label = sample["label"].astype(np.int64)
    label[:2] = -1
    for transform in (TrainTransform(TORCHVISION_CONVENTION, crop_size=16), EvalTransform(TORCHVISION_CONVENTION)):
        with pytest.raises(ValueError, match=(r"sample 'blocks0': label values must be class indices or the ignore "
                                              r"value, in 0\.\.2147483647; got int64 values from -1 to \d+ \(a "
                                              r"negative ignore value, e\.g\. -1, must be mapped")):
            transform({**sample, "label": label})


def test_bounds_themselves_are_accepted():
    TrainTransform(TORCHVISION_CONVENTION, crop_size=(8192, 1), scale_range=(0.1, 8.0), seed=2**40)
    EvalTransform(TORCHVISION_CONVENTION, pad_to=8192, pad_divisor=1024)


def test_empty_image_is_named():
    sample = {"image": np.zeros((0, 0, 3), np.uint8), "label": np.zeros((0, 0), np.uint8), "id": "empty"}
    for transform in (TrainTransform(TORCHVISION_CONVENTION, crop_size=8), EvalTransform(TORCHVISION_CONVENTION)):
        with pytest.raises(ValueError, match=r"sample 'empty': image is empty \(0x0 pixels\)"):
            transform(sample)


def test_tiny_image_at_the_smallest_scale_keeps_one_pixel():
    """A 3x5 image at scale 0.1 would be 0 pixels high: it keeps one pixel row, aligned with its label."""
    image = np.array(_COLOURS[1], np.uint8)[None, None].repeat(3, 0).repeat(5, 1)
    sample = {"image": image, "label": np.ones((3, 5), np.uint8), "id": "tiny"}
    out = TrainTransform(TORCHVISION_CONVENTION, crop_size=4, scale_range=(0.1, 0.1), hflip_prob=0.0, seed=0)(sample)
    assert out["valid"].sum() == 1 and bool(out["valid"][0, 0])
    assert out["label"][0, 0] == 1 and (out["label"][~out["valid"]] == 255).all()
    torch.testing.assert_close(out["raw"][:, 0, 0], torch.tensor(_COLOURS[1], dtype=torch.float32))
