"""The synthetic 3-D volumes' arguments: shapes, voxel sizes and seeds are checked before anything is drawn."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from crfrnn_deeplab.data.volumes import MAX_VOXELS, SPACING_LIMITS, SyntheticVolumes, render_volume


@pytest.mark.parametrize(
    "kwargs, match",
    [
        # a 1e-6 voxel size made the tube walk ~1e7 steps long (a hang); inf made NaN positions
        ({"spacing": (1e-6, 1.0, 1.0)}, r"spacing must be 3 voxel sizes in 0.05..5 .* got \(1e-06, 1.0, 1.0\)"),
        ({"spacing": (1.0, 1.0, float("inf"))}, r"spacing must be 3 voxel sizes .* got \(1.0, 1.0, inf\)"),
        ({"spacing": (1.0, 1.0, float("nan"))}, r"spacing must be 3 voxel sizes"),
        ({"spacing": (1.0, 1.0, 100.0)}, r"spacing must be 3 voxel sizes"),
        ({"spacing": (1.0, 1.0)}, r"spacing must be 3 voxel sizes"),
        ({"spacing": "111"}, r"spacing must be 3 voxel sizes"),
        ({"shape": (4, 4, 4.9)}, r"shape must be 3 sides >= 4 \(ints, D, H, W\), got \(4, 4, 4.9\)"),
        ({"shape": (4, 4, True)}, r"shape must be 3 sides >= 4"),
        ({"shape": (4, 4, 3)}, r"shape must be 3 sides >= 4"),
        # numpy's MemoryError ("Unable to allocate 931. GiB") when the volume was drawn
        ({"shape": (5000, 5000, 5000)}, r"shape \(5000, 5000, 5000\) has 125,000,000,000 voxels; a synthetic volume "
                                        r"has at most MAX_VOXELS = 268,435,456 \(2\*\*28, e.g. 512x512x1024\)"),
        ({"shape": np.array([512, 512, 1025])}, r"shape \(512, 512, 1025\) has 268,697,600 voxels"),
        ({"seed": -1}, r"seed must be a non-negative int, got -1"),
        ({"seed": 1.5}, r"seed must be a non-negative int, got 1.5"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticVolumes(num_volumes=1, **{"shape": (4, 4, 4), **kwargs})
    if "seed" not in kwargs:
        with pytest.raises(ValueError, match=match):
            shape, spacing = kwargs.get("shape", (4, 4, 4)), kwargs.get("spacing", (1.0, 1.0, 1.0))
            render_volume(np.random.default_rng(0), shape, spacing=spacing)


def test_extreme_allowed_spacings_are_drawn_quickly():
    low, high = SPACING_LIMITS
    start = time.perf_counter()
    for spacing in [(low, high, high), (high, low, low), (low, 1.0, 1.0)]:
        volume, label = SyntheticVolumes(num_volumes=1, shape=(4, 6, 8), spacing=spacing)[0]
        assert volume.shape == (1, 4, 6, 8) and torch.isfinite(volume).all() and label.shape == (4, 6, 8)
    assert time.perf_counter() - start < 5.0


def test_numpy_shape_and_spacing_are_accepted():
    data = SyntheticVolumes(num_volumes=1, shape=np.array([4, 5, 6]), spacing=np.array([2.0, 1.0, 1.0]),
                            seed=np.int64(3))
    assert data.shape == (4, 5, 6) and data.spacing == (2.0, 1.0, 1.0) and data.seed == 3
    assert data[0][0].shape == (1, 4, 5, 6)


def test_the_voxel_bound_admits_a_large_ct_scan():
    assert MAX_VOXELS == 512 * 512 * 1024
    assert SyntheticVolumes(num_volumes=1, shape=(512, 512, 1024)).shape == (512, 512, 1024)  # nothing drawn yet


def test_numpy_integer_length_and_index_are_accepted():
    data = SyntheticVolumes(num_volumes=np.int64(2), shape=(4, 4, 4))
    assert len(data) == 2 and type(data.num_volumes) is int
    torch.testing.assert_close(data[np.int64(1)][0], data[1][0])


@pytest.mark.parametrize("num_volumes", [2.0, True, 0])
def test_a_length_that_is_not_a_positive_int_is_refused(num_volumes):
    with pytest.raises(ValueError, match=rf"num_volumes must be an int >= 1, got {num_volumes!r}"):
        SyntheticVolumes(num_volumes=num_volumes, shape=(4, 4, 4))


@pytest.mark.parametrize("index", [0.5, True])
def test_an_index_that_is_not_an_int_is_named(index):
    # 0.5 passed the range check and reached numpy as "seed must be integer"
    with pytest.raises(TypeError, match=rf"a volume index must be an int, got {type(index).__name__} {index!r}"):
        SyntheticVolumes(num_volumes=2, shape=(4, 4, 4))[index]
