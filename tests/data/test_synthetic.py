"""The embedded synthetic dataset: determinism, disjoint splits, and the properties its docstring states."""

from __future__ import annotations

import hashlib
import math
import pickle
import time

import cv2
import numpy as np
import pytest
import torch
from scipy import ndimage

from crfrnn_deeplab.data import SYNTHETIC_CLASSES, SyntheticSegmentation, render_synthetic

N_STATS = 50  # images per statistic, as stated in the module docstring


def _digest(image: np.ndarray, label: np.ndarray) -> str:
    return hashlib.sha1(image.tobytes() + label.tobytes()).hexdigest()


@pytest.fixture(scope="module", params=[0, 1], ids=["seed0", "seed1"])
def stats_images(request):
    ds = SyntheticSegmentation(split="train", num_images=N_STATS, seed=request.param)
    return [ds.load(i) for i in range(N_STATS)]


def _boundary(label: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another label (both sides of every boundary)."""
    edge = np.zeros(label.shape, dtype=bool)
    dx, dy = label[:, 1:] != label[:, :-1], label[1:] != label[:-1]
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    edge[1:] |= dy
    edge[:-1] |= dy
    return edge


def test_sample_format_and_metadata():
    ds = SyntheticSegmentation(num_images=3)
    assert len(ds) == 3 and ds.num_classes == 6 and ds.class_names == SYNTHETIC_CLASSES and ds.ignore_index == 255
    sample = ds[1]
    assert set(sample) == {"image", "label", "id"}
    assert sample["image"].dtype == np.uint8 and sample["image"].shape == (161, 161, 3)
    assert sample["label"].dtype == np.uint8 and sample["label"].shape == (161, 161)
    assert sample["label"].max() < 6
    assert sample["id"] == "synthetic_train_0_000001"
    assert ds[-1]["id"] == ds[2]["id"]
    with pytest.raises(IndexError):
        ds[3]


def test_other_sizes_and_rectangles():
    image, label = SyntheticSegmentation(size=321, num_images=1).load(0)
    assert image.shape == (321, 321, 3) and label.shape == (321, 321) and len(np.unique(label)) > 1
    image, label = SyntheticSegmentation(size=(97, 200), num_images=1).load(0)
    assert image.shape == (97, 200, 3) and label.shape == (97, 200)


def test_same_seed_identical_different_seed_different():
    a = SyntheticSegmentation(num_images=4, seed=7)
    b = SyntheticSegmentation(num_images=4, seed=7)
    c = SyntheticSegmentation(num_images=4, seed=8)
    for i in range(4):
        (ia, la), (ib, lb), (ic, lc) = a.load(i), b.load(i), c.load(i)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(la, lb)
        assert not np.array_equal(ia, ic)


def test_each_index_reproducible_alone_and_after_pickling():
    ds = SyntheticSegmentation(num_images=20, seed=3)
    direct = ds.load(13)
    for i in range(5):  # drawing other images first changes nothing
        ds.load(i)
    again = pickle.loads(pickle.dumps(ds)).load(13)
    np.testing.assert_array_equal(direct[0], again[0])
    np.testing.assert_array_equal(direct[1], again[1])


def test_splits_never_share_an_image():
    train = SyntheticSegmentation(split="train", num_images=200, size=48, seed=0)
    val = SyntheticSegmentation(split="val", num_images=100, size=48, seed=0)
    h_train = {_digest(*train.load(i)) for i in range(len(train))}
    h_val = {_digest(*val.load(i)) for i in range(len(val))}
    assert len(h_train) == 200 and len(h_val) == 100  # no repeats within a split either
    assert not h_train & h_val


def test_class_frequencies_within_stated_bounds(stats_images):
    counts = np.zeros(6)
    present = np.zeros(6)
    for _, label in stats_images:
        c = np.bincount(label.ravel(), minlength=6)
        assert c.size == 6, "labels must stay in 0..5"
        counts += c
        present += c > 0
    freq = counts / counts.sum()
    assert 0.80 <= freq[0] <= 0.95, freq
    assert np.all((freq[1:] >= 0.008) & (freq[1:] <= 0.06)), freq
    assert np.all(present[1:] / len(stats_images) >= 0.40), present


def test_objects_have_thin_parts(stats_images):
    removed = total = 0
    for _, label in stats_images:
        for c in range(1, 6):
            mask = (label == c).astype(np.uint8)
            opened = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((5, 5), np.uint8))
            removed += int((mask > opened).sum())
            total += int(mask.sum())
    assert removed / total >= 0.25, removed / total


def test_label_boundaries_are_colour_edges(stats_images):
    across, within = [], []
    for image, label in stats_images:
        jump = np.linalg.norm(image[:, 1:].astype(np.float32) - image[:, :-1], axis=-1)
        edge = label[:, 1:] != label[:, :-1]
        across.append(jump[edge])
        within.append(jump[~edge])
    across, within = np.concatenate(across), np.concatenate(within)
    assert (across > 40).mean() >= 0.90
    assert np.median(across) >= 4 * np.median(within)


def test_stride8_labels_lose_boundary_pixels(stats_images):
    """Nearest 8x down/up-sampling (a stand-in for stride-8 predictions) is wrong near boundaries."""
    wrong = near = 0
    for _, label in stats_images:
        h, w = label.shape
        small = cv2.resize(label, (math.ceil(w / 8), math.ceil(h / 8)), interpolation=cv2.INTER_NEAREST)
        up = cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)
        band = ndimage.distance_transform_edt(~_boundary(label)) <= 3
        wrong += int((band & (up != label)).sum())
        near += int(band.sum())
    assert wrong / near >= 0.30, wrong / near


def test_colour_alone_does_not_give_the_class(stats_images):
    colours = np.concatenate([img[lbl > 0] for img, lbl in stats_images]).astype(np.float32)
    classes = np.concatenate([lbl[lbl > 0] for _, lbl in stats_images])
    means = np.stack([colours[classes == c].mean(0) for c in range(1, 6)])
    predicted = np.argmin(((colours[:, None] - means[None]) ** 2).sum(-1), axis=1) + 1
    accuracy = (predicted == classes).mean()
    assert 0.50 <= accuracy <= 0.85, accuracy


def test_generation_is_fast():
    ds = SyntheticSegmentation(size=321, num_images=20)
    ds.load(0)
    start = time.perf_counter()
    for i in range(20):
        ds.load(i)
    per_image = (time.perf_counter() - start) / 20
    assert per_image < 0.03, f"{per_image * 1e3:.1f} ms per 321x321 image (about 4 ms expected; generous bound)"


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"split": "test"}, ValueError, "split must be one of"),
        ({"num_images": 0}, ValueError, "num_images must be a positive integer"),
        ({"size": 16}, ValueError, "at least 32x32"),
        ({"seed": -1}, ValueError, "seed must be non-negative"),
        ({"seed": "a"}, TypeError, "seed must be an integer"),
        ({"seed": 1.0}, TypeError, "seed must be an integer"),
        ({"transform": 3}, TypeError, "transform must be callable"),
        # a float size was truncated: (40.7, 40) gave 40x40 images
        ({"size": (40.7, 40)}, TypeError,
         r"size must be an int or a \(height, width\) pair of ints, got tuple \(40.7, 40\)"),
        ({"size": 40.5}, TypeError, r"size must be an int or a \(height, width\) pair of ints, got float 40.5"),
        ({"size": True}, TypeError, r"size must be .*, got bool True"),
        ({"size": (True, 40)}, TypeError, r"size must be .*, got tuple \(True, 40\)"),
        ({"size": (40, 40, 40)}, TypeError, r"size must be .*, got tuple \(40, 40, 40\)"),
        ({"size": "40"}, TypeError, r"size must be .*, got str '40'"),
        ({"num_images": 2.0}, TypeError, r"num_images must be a positive integer, got float 2.0"),
        ({"num_images": True}, TypeError, r"num_images must be a positive integer, got bool True"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        SyntheticSegmentation(**kwargs)


def test_numpy_integers_are_accepted():
    ds = SyntheticSegmentation(num_images=np.int64(2), size=(np.int64(40), 41), seed=np.int64(3))
    assert len(ds) == 2 and ds.size == (40, 41) and type(ds.size[0]) is int
    assert SyntheticSegmentation(num_images=1, size=np.array([40, 41])).size == (40, 41)
    np.testing.assert_array_equal(ds[np.int64(1)]["image"], ds[1]["image"])
    # and torch's: a size tensor, or a side that is a 0-d tensor, as before sizes were checked
    assert SyntheticSegmentation(num_images=1, size=torch.tensor([40, 41])).size == (40, 41)
    assert SyntheticSegmentation(num_images=1, size=(torch.tensor(40), 41)).size == (40, 41)
    np.testing.assert_array_equal(ds[torch.tensor(1)]["image"], ds[1]["image"])


@pytest.mark.parametrize("index", [1.5, True, "1", torch.tensor(True)])  # (operator.index reads tensor(True) as 1)
def test_an_index_that_is_not_an_int_is_named(index):
    # a float index reached numpy as "seed must be integer"
    with pytest.raises(TypeError, match=rf"SyntheticSegmentation index must be an int, got {type(index).__name__}"):
        SyntheticSegmentation(num_images=2)[index]


@pytest.mark.parametrize(
    "height, width, error, match",
    [
        (40.7, 40, TypeError, r"height must be an int \(pixels\), got float 40.7"),
        (40, True, TypeError, r"width must be an int \(pixels\), got bool True"),
        (40, 0, ValueError, r"width must be at least 1 pixel, got 0"),
    ],
)
def test_render_synthetic_bad_sizes(height, width, error, match):
    with pytest.raises(error, match=match):
        render_synthetic(np.random.default_rng(0), height, width)
