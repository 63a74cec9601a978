"""The spatial Gaussian's banded passes along leading axes (crf/spatial.py): exact against independent references,
through both backward routes, and independent of the thread count."""

import itertools

import pytest
import torch

from crfrnn_deeplab.crf import MeanFieldCRF, spatial
from crfrnn_deeplab.crf.spatial import _banded_rows, spatial_gaussian


def toeplitz_by_loops(taps: torch.Tensor, length: int) -> torch.Tensor:
    """The pass as a dense Tensor[L, L], entry by entry (independent of the code under test)."""
    r = taps.numel() // 2
    matrix = torch.zeros(length, length, dtype=taps.dtype)
    for i in range(length):
        for t in range(-r, r + 1):
            if 0 <= i + t < length:
                matrix[i, i + t] = taps[t + r]
    return matrix


# Lengths below, at and above one block of rows (16) and past two; radii from 0 to beyond a block; 1 and 3 images.
@pytest.mark.parametrize("length, radius", [(1, 0), (5, 2), (15, 3), (16, 0), (17, 1), (31, 12), (32, 12),
                                            (33, 16), (70, 1), (70, 20), (100, 12), (257, 40)])
def test_banded_rows_equals_the_dense_toeplitz_product(length, radius):
    generator = torch.Generator().manual_seed(length * 100 + radius)
    taps = torch.rand(2 * radius + 1, dtype=torch.float64, generator=generator)  # not symmetric: orientation counts
    matrix = toeplitz_by_loops(taps, length)
    for images, m in itertools.product((1, 3), (1, 7, 48)):
        x = torch.randn(images, length, m, dtype=torch.float64, generator=generator)
        torch.testing.assert_close(_banded_rows(x, taps), torch.einsum("ik,bkm->bim", matrix, x), rtol=0, atol=1e-12)


def exact_separable(values: torch.Tensor, theta: float, spacing=None) -> torch.Tensor:
    """The untruncated Gaussian, one dense 1-D kernel matrix per spatial axis (channels last)."""
    out = values
    dims = values.dim() - 2
    for axis in range(dims):
        n = values.shape[1 + axis]
        t = torch.arange(n, dtype=values.dtype)
        step = 1.0 if spacing is None else spacing[axis]
        k = torch.exp(-(((t[:, None] - t[None, :]) * step) ** 2) / (2 * theta**2))
        out = torch.movedim(torch.tensordot(k, out, dims=([1], [1 + axis])), 0, 1 + axis)
    return out


@pytest.mark.parametrize("shape, spacing", [((2, 90, 75, 21), None), ((1, 130, 64, 16), None),
                                            ((1, 40, 30, 50, 3), (2.0, 1.0, 0.7))])
def test_spatial_filter_with_banded_passes_is_exact(shape, spacing, monkeypatch):
    # Large enough for the banded passes (≥ 2^17 values per image along the first axis); the 3-D volume's second
    # axis (40 images of 30 × 150 values) takes the convolution: both routes in one filter.
    calls = []
    banded = spatial._banded_rows
    monkeypatch.setattr(spatial, "_banded_rows", lambda x, *rest: calls.append(x.shape) or banded(x, *rest))
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = spatial_gaussian(x, torch.tensor(2.5, dtype=torch.float64), spacing=spacing)
    assert calls, "the banded pass did not run"
    torch.testing.assert_close(out, exact_separable(x, 2.5, spacing), rtol=0, atol=2e-3 * x.abs().max().item())


def test_spatial_filter_gradients_through_banded_passes():
    # The values' and θ's gradients against autograd through the dense truncated filter (the same taps, as
    # explicit Toeplitz matrices), for θ learned and for θ fixed (the values-only route).
    shape = (1, 96, 70, 21)
    theta = torch.tensor(1.8, dtype=torch.float64, requires_grad=True)
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    weight = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def dense(values, th):
        out = values
        for axis in (1, 0):
            taps = spatial.gaussian_taps(th, shape[1 + axis])
            r = taps.numel() // 2
            n = shape[1 + axis]
            offset = torch.arange(n)[None, :] - torch.arange(n)[:, None] + r
            inside = (offset >= 0) & (offset <= 2 * r)
            matrix = torch.where(inside, taps[offset.clamp(0, 2 * r)], 0.0)
            out = torch.movedim(torch.tensordot(matrix, out, dims=([1], [1 + axis])), 0, 1 + axis)
        return out

    expected = torch.autograd.grad((dense(x, theta) * weight).sum(), (x, theta))
    got = torch.autograd.grad((spatial_gaussian(x, theta) * weight).sum(), (x, theta))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    values_only = torch.autograd.grad((spatial_gaussian(x, theta.detach()) * weight).sum(), x)[0]
    torch.testing.assert_close(values_only, expected[0], rtol=1e-10, atol=1e-10)


def test_banded_passes_do_not_depend_on_the_thread_count():
    # Inference chooses its thread count by the machine's load (crf/threads.py): the filter must not round
    # differently with it.
    x = torch.rand(1, 375, 500, 21, generator=torch.Generator().manual_seed(4))
    theta = torch.tensor(3.0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = spatial_gaussian(x, theta)
        torch.set_num_threads(2)
        two = spatial_gaussian(x, theta)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_gaussian_passes_and_backward_reject_mismatched_inputs():
    theta = torch.tensor(1.5)
    with pytest.raises(ValueError, match="values must be a Tensor\\[B, H, W, C\\]"):
        spatial.gaussian_passes(torch.zeros(5, 6, 2), theta)
    out, states = spatial.gaussian_passes(torch.rand(1, 5, 6, 2), theta)
    assert len(states) == 2
    with pytest.raises(ValueError, match="do not match the filtered grid"):
        spatial.gaussian_backward(torch.ones(1, 5, 7, 2), theta, states, (5, 6))
    with pytest.raises(ValueError, match="do not match the filtered grid"):
        spatial.gaussian_backward(torch.ones(1, 5, 6, 2), theta, states[:1], (5, 6))
    filtered, grad_theta = spatial.gaussian_backward(torch.ones_like(out), theta, states, (5, 6))
    torch.testing.assert_close(filtered, spatial_gaussian(torch.ones_like(out), theta))  # K is symmetric
    assert grad_theta is not None and grad_theta > 0  # a wider filter sums more of positive values


@pytest.mark.parametrize("shape, spacing", [((2, 90, 75, 21), None), ((1, 12, 10, 5), None),
                                            ((1, 40, 30, 50, 3), (2.0, 1.0, 0.7))])
def test_spatial_filter_into_out_equals_the_returned_filter(shape, spacing):
    # out= on every route: banded last pass (written in place), convolution last pass (copied), a 3-D volume
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    theta = torch.tensor(2.5)
    buffer = torch.full(shape, float("nan"))
    out = spatial_gaussian(x, theta, spacing=spacing, out=buffer)
    assert out.data_ptr() == buffer.data_ptr()
    assert torch.equal(buffer, spatial_gaussian(x, theta, spacing=spacing))


def test_spatial_filter_names_a_bad_out():
    x = torch.randn(1, 6, 5, 3)
    theta = torch.tensor(1.5)
    for bad, match in ((torch.empty(1, 6, 5, 4), "shape"), (torch.empty(1, 6, 5, 3, dtype=torch.float64), "dtype"),
                       (torch.empty(1, 5, 6, 3).transpose(1, 2), "contiguous"), (x, "overlaps"), ([0.0], "list")):
        with pytest.raises(ValueError, match=match):
            spatial_gaussian(x, theta, out=bad)
    with pytest.raises(ValueError, match="autograd"):
        spatial_gaussian(x.requires_grad_(True), theta, out=torch.empty(1, 6, 5, 3))


def test_spatial_filter_names_bad_values_and_bandwidths():
    x = torch.randn(1, 6, 7, 2)
    with pytest.raises(TypeError, match="values must be a floating-point Tensor, got torch.int64"):
        spatial_gaussian(torch.randint(0, 100, (1, 6, 7, 2)), torch.tensor(3.0))  # was returned unfiltered
    for theta in (0.0, -1.0, float("nan"), float("inf")):  # 0 was NaN everywhere, inf an OverflowError
        with pytest.raises(ValueError, match="bandwidth .* and a truncation that are finite and > 0"):
            spatial_gaussian(x, torch.tensor(theta))
    with pytest.raises(ValueError, match="finite and > 0, got inf"):
        spatial_gaussian(x, torch.tensor(3.0), spacing=(1e-320, 1.0))  # θ / spacing overflows
    with pytest.raises(ValueError, match="truncation that are finite and > 0, got 3.0 and -1"):
        spatial_gaussian(x, torch.tensor(3.0), truncate=-1)
    assert torch.equal(spatial_gaussian(x, 3.0), spatial_gaussian(x, torch.tensor(3.0)))  # a number is taken


@pytest.mark.parametrize("theta", [1e-20, 1e-30])
def test_a_tiny_bandwidth_has_a_zero_gradient_not_nan(theta):
    # every tap but the centre underflows to 0; autograd's chain through t / θ multiplied that 0 by an infinite
    # 1 / θ² (NaN), in the taps of the filter and of the normaliser's 1-D filterings alike
    crf = MeanFieldCRF(num_classes=3, theta_gamma=theta).train()
    logits = torch.randn(1, 3, 9, 10, generator=torch.Generator().manual_seed(0), requires_grad=True)
    crf(logits, torch.rand(1, 3, 9, 10, generator=torch.Generator().manual_seed(1)) * 255).square().mean().backward()
    assert crf.log_theta_gamma.grad == 0 and all(torch.isfinite(p.grad).all() for p in crf.parameters())
    taps = spatial.gaussian_taps(torch.tensor(theta, requires_grad=True), 5)
    assert torch.equal(taps.detach(), torch.tensor([0.0, 1.0, 0.0]))
