"""Bandwidth gradients θα, θβ, θγ (issue #15; README: bandwidth gradients): the pair estimator against the dense
derivative, the sampled pairs' bias and variance, the CRF's gradient against the ideal one for its own forward pass
and against the exact dense CRF, masks and batches, and gradient descent that recovers the exact CRF's best bandwidths.

Two "ideal" gradients appear here (see :class:`crfrnn_deeplab.crf.reference.DenseKernelPairs`), both the layer's
own mean-field iterates with an exact dense float64 kernel derivative in the backward pass:

- the **mass-consistent ideal** (``mass="pair"``), the derivative of ``√(c_i c_j) k_ij`` with ``c_i`` each
  pixel's lattice-to-Gaussian mass ratio: a symmetric kernel with the lattice's mass, so the derivative of the
  normaliser matches the forward pass. The estimator's target (``mass="row"``, ``c_i k_ij``, has exactly the
  lattice's row sums but is not symmetric; the benchmark measures both against the exact CRF);
- the **literal ideal** (``mass="none"``), the plain Gaussian derivative: the lattice has about half the
  Gaussian's mass, which the normalisation cancels in the forward pass but not in this derivative, so it is
  about twice the exact CRF's gradient (measured by ``benchmarks/bench_bandwidth_gradient.py``).
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crfrnn_deeplab.crf import MeanFieldCRF, kernels as kernels_module
from crfrnn_deeplab.crf.bandwidth_gradient import PairGroups, gaussian_, kernel_pairs
from crfrnn_deeplab.crf.lattice import build_lattice, lattice_gaussian
from crfrnn_deeplab.crf.reference import DenseKernelPairs, dense_crf
from crfrnn_deeplab.data.synthetic import render_synthetic
from crf_scenes import dense_pairs


# --- helpers -------------------------------------------------------------------------------------------------


def grid_features(shape: tuple[int, ...], guidance: int, seed: int, spacing=None) -> torch.Tensor:
    """Positions (x first) on a grid of ``shape`` times ``spacing``, plus ``guidance`` piecewise-constant noisy
    channels: Tensor[1, N, S + guidance] float64."""
    g = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij")
    spacing = [1.0] * len(shape) if spacing is None else spacing
    positions = torch.stack([(a * sp).reshape(-1) for a, sp in zip(axes, spacing)][::-1], 1)
    regions = (axes[-1] > shape[-1] / 2).reshape(-1).long() + 2 * (axes[0] > shape[0] / 3).reshape(-1).long()
    levels = torch.rand(4, guidance, generator=g, dtype=torch.float64) * 200
    colour = levels[regions] + 8 * torch.randn(positions.shape[0], guidance, generator=g, dtype=torch.float64)
    return torch.cat([positions, colour], 1)[None]


def scale_gradient(raw, scale, grid, values, grad, *, mix=None, valid=None, weights=None, pairs="ours", rates=None,
                   **pair_options):
    """``∂/∂scale`` of ``Σ grad ⊙ lattice_gaussian(values)`` through a lattice built on ``raw * scale``, with the
    estimator's pairs ("ours"), none (the lattice's point pairs) or a dense derivative ("pair", "image")."""
    s = scale.clone().requires_grad_(True)
    lattice = build_lattice((raw * scale).transpose(1, 2), valid)
    mass = lattice.filter(raw.new_ones(*raw.shape[:2], 1))[..., 0]
    if pairs == "ours":
        pairs = kernel_pairs(raw * scale, mass, valid, grid=grid, rates=rates, **pair_options)
    elif pairs is not None:
        pairs = DenseKernelPairs(raw * scale, mass, valid, pairs)
    if weights is not None:
        lattice = lattice.weighted(weights, weights)
    (lattice_gaussian(values, raw, s, lattice, mix=mix, pairs=pairs) * grad).sum().backward()
    return s.grad


# --- the pair estimator --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["image", "mix", "masked", "folded", "batch", "volume_multichannel", "point_list"])
def test_all_pairs_equal_the_dense_derivative(case):
    # Images up to EXACT_POINTS take all pairs: the pair sums are the dense Gaussian's derivative scaled by each
    # point's mass ratio, for any feature dimension, mask, mix, weighting and batch.
    g = torch.Generator().manual_seed(3)
    grid, raw, scale = (12, 15), grid_features((12, 15), 3, 0), torch.tensor([0.2, 0.2, 0.05, 0.05, 0.05])
    mix = valid = weights = None
    pairs = "ours"
    if case == "volume_multichannel":  # 3-D positions plus four guidance channels (d = 7)
        grid, raw = (5, 6, 7), grid_features((5, 6, 7), 4, 1, spacing=(2.0, 1.0, 0.7))
        scale = torch.tensor([0.3, 0.3, 0.3, 0.04, 0.04, 0.06, 0.06])
    elif case == "point_list":  # no pairs given: lattice_gaussian makes them from the lattice
        grid, raw = (300,), torch.randn(1, 300, 4, generator=g, dtype=torch.float64) * 3
        scale, pairs = torch.tensor([0.5, 0.7, 0.6, 0.4]), None
    elif case == "batch":
        raw = torch.cat([raw, grid_features(grid, 3, 5)])
    scale = scale.double()
    n, b = math.prod(grid), raw.shape[0]
    values = torch.rand(b, n, 3, generator=g, dtype=torch.float64)
    grad = torch.randn(b, n, 3, generator=g, dtype=torch.float64)
    if case == "mix":
        mix = torch.randn(3, 2, generator=g, dtype=torch.float64)
        grad = grad[..., :2]
    elif case in ("masked", "batch"):
        valid = torch.rand(b, *grid, generator=g) > 0.3
    elif case == "folded":  # diag(w) K diag(w), as the CRF folds its symmetric normaliser into the lattice
        weights = torch.rand(b, n, generator=g, dtype=torch.float64) + 0.5
    ours = scale_gradient(raw, scale, grid, values, grad, mix=mix, valid=valid, weights=weights, pairs=pairs)
    ideal = scale_gradient(raw, scale, grid, values, grad, mix=mix, valid=valid, weights=weights, pairs="pair")
    torch.testing.assert_close(ours, ideal, rtol=1e-9, atol=1e-12)


SAMPLED = {
    # grid, guidance channels, spacing (axes' order), scale (positions then guidance), mask
    "image": ((48, 64), 3, None, [1 / 20, 1 / 20] + [1 / 15] * 3, False),
    "image_narrow_masked": ((40, 52), 3, None, [1 / 3, 1 / 3] + [1 / 10] * 3, True),
    "volume_anisotropic": ((10, 12, 14), 2, (3.0, 1.0, 0.8), [0.25] * 3 + [0.06] * 2, False),
}


def sampled_setup(case):
    grid, k, spacing, scale, masked = SAMPLED[case]
    g = torch.Generator().manual_seed(0)
    raw = torch.cat([grid_features(grid, k, 2, spacing), grid_features(grid, k, 7, spacing)])  # a batch of 2
    n = math.prod(grid)
    values, grad = torch.rand(2, n, 2, generator=g, dtype=torch.float64), torch.rand(2, n, 2, generator=g, dtype=torch.float64)
    valid = (torch.rand(2, *grid, generator=g) > 0.2) if masked else None
    spacing = [1.0] * len(grid) if spacing is None else spacing
    rates = [sp * scale[0] for sp in spacing]  # every position feature has the same scale 1/θα
    return raw, torch.tensor(scale, dtype=torch.float64), grid, values, grad, valid, rates


@pytest.mark.parametrize("case", list(SAMPLED))
def test_sampled_pairs_are_unbiased_seeded_and_of_small_variance(case):
    # Above EXACT_POINTS the pairs are sampled from the position Gaussian (followed along every axis, with its
    # spacing). Nonnegative values and gradients (nothing cancels): each draw close to the reference with the
    # image's mass ratio, the mean of the draws closer still; the same seed gives the same draw.
    raw, scale, grid, values, grad, valid, rates = sampled_setup(case)
    draws = []
    for seed in range(8):
        torch.manual_seed(seed)
        draws.append(scale_gradient(raw, scale, grid, values, grad, valid=valid, rates=rates, samples=2))
    torch.manual_seed(3)
    again = scale_gradient(raw, scale, grid, values, grad, valid=valid, rates=rates, samples=2)
    torch.testing.assert_close(again, draws[3], rtol=0, atol=0)
    assert not torch.equal(draws[0], draws[1])
    reference = scale_gradient(raw, scale, grid, values, grad, valid=valid, pairs="image")
    ratios = torch.stack(draws) / reference
    assert ((ratios - 1).abs() < 0.10).all(), ratios
    assert ((ratios.mean(0) - 1).abs() < 0.03).all(), ratios.mean(0)


def test_sampled_proposal_that_ignores_the_positions_is_still_unbiased_but_noisier():
    # A uniform proposal (no rates) is unbiased too; following the position Gaussian is what keeps it precise.
    raw, scale, grid, values, grad, valid, rates = sampled_setup("image_narrow_masked")
    reference = scale_gradient(raw, scale, grid, values, grad, valid=valid, pairs="image")
    spread = {}
    for name, r in (("gaussian", rates), ("uniform", None)):
        draws = []
        for seed in range(6):
            torch.manual_seed(seed)
            draws.append(scale_gradient(raw, scale, grid, values, grad, valid=valid, rates=r, samples=8))
        ratios = torch.stack(draws) / reference
        spread[name] = float((ratios - 1).abs().max())
    assert spread["gaussian"] < 0.05 and spread["uniform"] > 2 * spread["gaussian"], spread


# --- the CRF's gradient --------------------------------------------------------------------------------------


def smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int, channels: int) -> np.ndarray:
    coarse = rng.normal(0, 1, (cells, cells, channels)).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC).reshape(h, w, channels)


def scene(kind: str, seed: int, h: int, w: int, c: int):
    """An image (synthetic objects, stripes on smooth regions, or shaded Voronoi regions), its labels, and
    unaries as a stride-4 network makes them (:func:`crf_inputs`)."""
    rng = np.random.default_rng(seed)
    if kind == "synthetic":
        image, label = render_synthetic(np.random.default_rng([seed, 7]), h, w)
        image, label = image.astype(np.float64), label.astype(np.int64) % c
    elif kind == "textured":
        levels = smooth_noise(rng, h, w, 3, 1)[..., 0]
        label = np.digitize(levels, np.quantile(levels, np.linspace(0, 1, c + 1)[1:-1]))
        ys, xs = np.mgrid[0:h, 0:w]
        angle, period = rng.uniform(0, np.pi), rng.uniform(3, 8)
        stripes = np.sin(2 * np.pi / period * (np.cos(angle) * xs + np.sin(angle) * ys))[..., None]
        image = rng.uniform(60, 200, 3) + 30 * smooth_noise(rng, h, w, 3, 3) + rng.uniform(-60, 60, (c, 3))[label]
        image = np.clip(image + stripes * rng.uniform(8, 20, 3) + rng.normal(0, 5, (h, w, 3)), 0, 255)
    else:  # "natural": shaded regions with smooth texture and noise
        ys, xs = np.mgrid[0:h, 0:w]
        centres = rng.uniform(0, 1, (c + 2, 2)) * [h, w]
        region = ((ys[..., None] - centres[:, 0]) ** 2 + (xs[..., None] - centres[:, 1]) ** 2).argmin(-1)
        label = region % c
        shade = rng.normal(0, 3, (c + 2, 2, 3))
        image = (rng.uniform(20, 235, (c + 2, 3))[region] + shade[region, 0] * (ys[..., None] - h / 2) / 4
                 + shade[region, 1] * (xs[..., None] - w / 2) / 4)
        image = np.clip(image + 8 * smooth_noise(rng, h, w, 4, 3) + rng.normal(0, 4, (h, w, 3)), 0, 255)
    return crf_inputs(rng, image, label, c, scale=3.0, coarse_noise=1.0, pixel_noise=0.5)


def crf_inputs(rng: np.random.Generator, image: np.ndarray, label: np.ndarray, c: int, *, scale: float,
               coarse_noise: float, pixel_noise: float):
    """Unaries as a stride-4 network makes them (``scale`` × one-hot labels averaged to 1/4 resolution, plus
    ``coarse_noise``, bilinearly upsampled, plus ``pixel_noise``) and the float64 batch of one:
    (logits Tensor[1, C, H, W], image Tensor[1, 3, H, W], labels Tensor[1, H, W])."""
    h, w = label.shape
    hs, ws = max(2, h // 4), max(2, w // 4)
    onehot = np.eye(c, dtype=np.float32)[label]  # INTER_AREA takes at most 4 channels at a non-integer scale
    coarse = np.concatenate([cv2.resize(onehot[..., k : k + 4], (ws, hs), interpolation=cv2.INTER_AREA)
                             .reshape(hs, ws, -1) for k in range(0, c, 4)], -1)
    coarse = scale * coarse + rng.normal(0, coarse_noise, coarse.shape).astype(np.float32)
    logits = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR).reshape(h, w, c).transpose(2, 0, 1)
    logits = logits + rng.normal(0, pixel_noise, logits.shape)
    return (
        torch.tensor(logits, dtype=torch.float64)[None],
        torch.tensor(image, dtype=torch.float64).permute(2, 0, 1)[None].contiguous(),
        torch.tensor(label)[None],
    )


# kind, seed, H, W, classes, spatial weight, bilateral weight, θα, θβ, θγ; each runs with both normalisations
CASES = [
    ("synthetic", 1000, 16, 16, 5, 2.1, 3.3, 40.0, 8.0, 1.0),
    ("textured", 1001, 20, 24, 3, 4.7, 7.2, 80.0, 30.0, 3.0),
    ("natural", 1002, 24, 32, 4, 4.7, 8.7, 40.0, 20.0, 1.0),
    ("natural", 1005, 16, 16, 4, 1.5, 7.7, 10.0, 20.0, 2.0),
    ("synthetic", 1006, 20, 24, 3, 2.5, 10.0, 40.0, 30.0, 3.0),
    ("textured", 1007, 24, 32, 4, 3.6, 7.8, 40.0, 20.0, 2.0),
    ("natural", 1008, 16, 24, 5, 3.9, 6.7, 10.0, 13.0, 1.0),
    ("synthetic", 1012, 24, 32, 3, 4.3, 8.5, 10.0, 13.0, 1.0),
    ("textured", 1016, 20, 24, 5, 1.0, 3.0, 20.0, 30.0, 3.0),
]
NORMALIZATIONS = ("symmetric", "after")
PARAMETERS = ("spatial_weight", "bilateral_weight", "compatibility", "log_theta_alpha", "log_theta_beta",
              "log_theta_gamma")


def case_layer(case, normalization, bilateral_filter="lattice") -> MeanFieldCRF:
    """The layer with a case's parameters, float64, in training mode (5 iterations), on the lattice (the
    estimator's test: images this small take the exact filter by default)."""
    _, _, _, _, c, ws, wb, ta, tb, tg = case
    return MeanFieldCRF(num_classes=c, spatial_weight=ws, bilateral_weight=wb, theta_alpha=ta, theta_beta=tb,
                        theta_gamma=tg, normalization=normalization, train_iterations=5,
                        bilateral_filter=bilateral_filter).double().train()


def crf_gradient(case, normalization, bilateral_filter="lattice") -> torch.Tensor:
    """The layer's gradient of the cross-entropy after 5 iterations, float64: (W_spatial, W_bilateral, μ,
    log θα, log θβ, log θγ) concatenated."""
    logits, image, label = scene(*case[:5])
    crf = case_layer(case, normalization, bilateral_filter)
    F.cross_entropy(crf(logits, image), label).backward()
    return torch.cat([getattr(crf, p).grad.reshape(-1) for p in PARAMETERS])


def exact_crf_output(case, normalization) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The exact dense CRF's logits after 5 iterations (explicit Gaussian kernel matrices) with a case's
    parameters, and those parameters as leaves that require grad: (W_spatial, W_bilateral, μ, log θα, log θβ,
    log θγ)."""
    kind, seed, h, w, c, ws, wb, ta, tb, tg = case
    logits, image, _ = scene(kind, seed, h, w, c)
    eye = torch.eye(c, dtype=torch.float64)
    params = [ws * eye, wb * eye, 1 - eye] + [torch.tensor(math.log(t), dtype=torch.float64) for t in (ta, tb, tg)]
    params = [p.requires_grad_(True) for p in params]
    out = dense_crf(logits, image, spatial_weight=params[0], bilateral_weight=params[1], compatibility=params[2],
                    theta_alpha=params[3].exp(), theta_beta=params[4].exp(), theta_gamma=params[5].exp(),
                    iterations=5, normalization=normalization)
    return out, params


def exact_crf_gradient(case, normalization) -> torch.Tensor:
    """The same gradient as :func:`crf_gradient`, of the exact dense CRF (plain autograd)."""
    out, params = exact_crf_output(case, normalization)
    F.cross_entropy(out, scene(*case[:5])[2]).backward()
    return torch.cat([p.grad.reshape(-1) for p in params])


def draw_case(rng: np.random.Generator) -> tuple:
    """A case like the accuracy section's, drawn at random: kind, seed, 16-24 × 16-32 pixels, 3-5 classes, spatial
    weight 1-5, bilateral weight 3-10, θα 10-100, θβ 5-30, θγ 1-3 (the bandwidths log-uniform)."""
    log_uniform = lambda low, high: float(np.exp(rng.uniform(np.log(low), np.log(high))))  # noqa: E731
    return (str(rng.choice(["synthetic", "textured", "natural"])), int(rng.integers(10_000, 100_000)),
            int(rng.integers(16, 25)), int(rng.integers(16, 33)), int(rng.integers(3, 6)),
            round(float(rng.uniform(1, 5)), 2), round(float(rng.uniform(3, 10)), 2),
            round(log_uniform(10, 100), 1), round(log_uniform(5, 30), 1), round(log_uniform(1, 3), 2))


def gradient_near_the_ideal(case, normalization) -> torch.Tensor:
    """The layer's gradient (:func:`crf_gradient`), checked: each bandwidth's within ±15 % of the ideal one (the
    layer's own iterates with the exact dense derivative), so never of the opposite sign."""
    ours = crf_gradient(case, normalization)
    with dense_pairs("pair"):
        ideal = crf_gradient(case, normalization)
    ratio = ours[-3:] / ideal[-3:]  # θα, θβ, θγ
    assert ((ratio > 0.85) & (ratio < 1.15)).all(), (ours[-3:], ideal[-3:])
    return ours


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}{c[1]}-{c[2]}x{c[3]}" for c in CASES])
def test_crf_bandwidth_gradient_against_ideal_and_exact_crf(case, normalization):
    ours = gradient_near_the_ideal(case, normalization)
    exact = exact_crf_gradient(case, normalization)
    assert F.cosine_similarity(ours, exact, dim=0) >= 0.98, (ours[-3:], exact[-3:])


DRAWN = [draw_case(rng) for rng in [np.random.default_rng(2026)] for _ in range(4)]


def test_drawn_cases_are_reproducible_distinct_and_in_range():
    rng = np.random.default_rng(4)
    cases = [draw_case(rng) for _ in range(50)]
    assert cases[0] == draw_case(np.random.default_rng(4)) and len(set(cases)) == 50
    for kind, _, h, w, c, ws, wb, ta, tb, tg in cases:
        assert kind in ("synthetic", "textured", "natural")
        assert 16 <= h <= 24 and 16 <= w <= 32 and 3 <= c <= 5
        assert 1 <= ws <= 5 and 3 <= wb <= 10 and 10 <= ta <= 100 and 5 <= tb <= 30 and 1 <= tg <= 3


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("case", DRAWN, ids=[f"{c[0]}{c[1]}-{c[2]}x{c[3]}" for c in DRAWN])
def test_crf_bandwidth_gradient_against_ideal_on_drawn_cases(case, normalization):
    # Cases drawn at random, not chosen: the bandwidth gradient is the ideal one for the layer's forward pass
    # (the cosine with the exact CRF depends on how close that forward pass is; README measures it on drawn cases).
    gradient_near_the_ideal(case, normalization)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("case", CASES + DRAWN, ids=[f"{c[0]}{c[1]}-{c[2]}x{c[3]}" for c in CASES + DRAWN])
def test_default_layer_gradient_is_the_exact_crfs(case, normalization):
    # By default images of at most EXACT_FILTER_POINTS pixels take the exact filter: then the gradient of every
    # CRF parameter is the exact dense CRF's (up to the spatial filter's truncation at 4θγ), each bandwidth's too.
    ours = crf_gradient(case, normalization, bilateral_filter="auto")
    exact = exact_crf_gradient(case, normalization)
    assert F.cosine_similarity(ours, exact, dim=0) >= 0.9999, (ours[-3:], exact[-3:])
    torch.testing.assert_close(ours[-3:], exact[-3:], rtol=0.01, atol=1e-3 * float(exact[-3:].abs().max()))


@pytest.mark.parametrize("bilateral_filter", ["auto", "lattice"])
def test_padded_batch_gives_the_gradients_of_its_images(bilateral_filter):
    # Two images of different sizes padded into one masked batch: the bandwidth gradients of the summed losses
    # are the sums of each image's alone (masked pixels send and receive nothing, also in the derivative).
    crf = MeanFieldCRF(num_classes=4, theta_alpha=20.0, theta_beta=15.0, theta_gamma=2.0,
                       bilateral_filter=bilateral_filter).double().train()
    scenes = [scene("natural", 7, 16, 20, 4), scene("synthetic", 8, 20, 14, 4)]
    alone = []
    for logits, image, label in scenes:
        crf.zero_grad()
        F.cross_entropy(crf(logits, image), label, reduction="sum").backward()
        alone.append(torch.stack([crf.log_theta_alpha.grad, crf.log_theta_beta.grad, crf.log_theta_gamma.grad]))
    logits = torch.zeros(2, 4, 20, 20, dtype=torch.float64)
    image = torch.zeros(2, 3, 20, 20, dtype=torch.float64)
    label = torch.full((2, 20, 20), -100)
    valid = torch.zeros(2, 20, 20, dtype=torch.bool)
    for i, (lg, im, lb) in enumerate(scenes):
        h, w = lb.shape[1:]
        logits[i, :, :h, :w], image[i, :, :h, :w], label[i, :h, :w], valid[i, :h, :w] = lg[0], im[0], lb[0], True
    crf.zero_grad()
    F.cross_entropy(crf(logits, image, valid), label, reduction="sum").backward()
    batched = torch.stack([crf.log_theta_alpha.grad, crf.log_theta_beta.grad, crf.log_theta_gamma.grad])
    torch.testing.assert_close(batched, alone[0] + alone[1], rtol=1e-6, atol=1e-9)


def test_sampled_crf_gradient_is_deterministic_given_the_seed():
    logits, image, label = scene("natural", 3, 40, 32, 3)  # 1280 pixels: sampled pairs
    crf = MeanFieldCRF(num_classes=3, theta_alpha=20.0, theta_beta=15.0).double().train()

    def gradient(seed):
        torch.manual_seed(seed)
        crf.zero_grad()
        F.cross_entropy(crf(logits, image), label).backward()
        return torch.stack([crf.log_theta_alpha.grad, crf.log_theta_beta.grad])

    assert torch.equal(gradient(1), gradient(1)) and not torch.equal(gradient(1), gradient(2))


def test_kernel_pairs_rejects_a_grid_or_rates_that_do_not_fit():
    features, mass = grid_features((6, 8), 3, 1), torch.ones(1, 48, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"grid \(6, 9\) does not hold the 48 points"):
        kernel_pairs(features, mass, grid=(6, 9))
    with pytest.raises(ValueError, match="rates must give one value per grid axis"):
        kernel_pairs(features, mass, grid=(6, 8), rates=[0.1])
    with pytest.raises(ValueError, match=r"seed must be a Tensor\[1, \.\.\.\] \(one row of values per image\)"):
        kernel_pairs(features, mass, seed=torch.ones(2, 48))
    with pytest.raises(ValueError, match="seed must be a Tensor"):
        kernel_pairs(features, mass, seed=[1.0])


def test_pairs_seeded_by_unscaled_features_do_not_depend_on_a_bandwidths_last_bit():
    # A DDP run averages the ranks' gradients in another order than one process: its bandwidths differ in their
    # last bits, and pairs seeded by the scaled features would be other draws; seeded by the raw features, the same.
    raw = grid_features((40, 48), 3, 2).float()  # (the CRF's float32)
    mass = torch.ones(1, 40 * 48)
    scale = torch.tensor([0.05, 0.05, 0.1, 0.1, 0.1])
    nudged = scale.clone()
    nudged[2] = torch.nextafter(scale[2], torch.tensor(1.0))

    def partners(s, seed):
        torch.manual_seed(5)
        return kernel_pairs(raw * s, mass, grid=(40, 48), rates=[0.05, 0.05], seed=seed).columns

    assert torch.equal(partners(scale, raw), partners(nudged, raw))
    assert not torch.equal(partners(scale, None), partners(nudged, None))  # seeded by the scaled features


def test_an_images_sampled_pairs_do_not_depend_on_its_batch():
    # A batch split over DistributedDataParallel ranks must draw what one process with the whole batch draws.
    first, second = grid_features((40, 48), 3, 2), grid_features((40, 48), 3, 7)
    mass = torch.ones(1, 40 * 48, dtype=torch.float64)

    def pairs_of_first(batch):
        torch.manual_seed(5)
        pairs = kernel_pairs(batch, mass.expand(batch.shape[0], -1), grid=(40, 48), rates=[0.05, 0.05])
        return pairs.columns.view(batch.shape[0], -1)[0], pairs.weights.view(5, batch.shape[0], -1)[:, 0]

    alone, together = pairs_of_first(first), pairs_of_first(torch.cat([first, second]))
    assert torch.equal(alone[0], together[0]) and torch.equal(alone[1], together[1])
    torch.manual_seed(6)  # another step: other pairs
    assert not torch.equal(kernel_pairs(first, mass, grid=(40, 48), rates=[0.05, 0.05]).columns, alone[0])


def test_a_small_images_pairs_do_not_depend_on_its_batch():
    # A padded image of at most EXACT_POINTS valid points beside a larger one keeps all its pairs (not sampled ones
    # because of its batchmate): the batch's pairs are a PairGroups whose contraction is the two images' own.
    g = torch.Generator().manual_seed(8)
    batch = torch.randn(2, 40 * 48, 5, generator=g, dtype=torch.float64)
    valid = torch.ones(2, 40, 48, dtype=torch.bool)
    valid[0, 20:], valid[0, :, 30:] = False, False  # 600 valid points
    mass = torch.rand(2, 40 * 48, generator=g, dtype=torch.float64) * valid.view(2, -1)
    left, right = (torch.randn(2, 40 * 48, 3, generator=g, dtype=torch.float64) for _ in range(2))
    options = dict(grid=(40, 48), rates=[0.05, 0.05])
    torch.manual_seed(5)
    pairs = kernel_pairs(batch, mass, valid, **options)
    assert isinstance(pairs, PairGroups) and [images.tolist() for images, _ in pairs.groups] == [[0], [1]]
    assert pairs.groups[0][1].exact and not pairs.groups[1][1].exact and not pairs.exact
    alone = []
    for i in range(2):
        torch.manual_seed(5)  # (the small image's all pairs draw nothing)
        alone.append(kernel_pairs(batch[i : i + 1], mass[i : i + 1], valid[i : i + 1], **options))
    assert alone[0].exact
    expected = sum(one.contract(left[i : i + 1], right[i : i + 1]) for i, one in enumerate(alone))
    torch.testing.assert_close(pairs.contract(left, right), expected, rtol=1e-12, atol=0)
    scale = torch.rand(2, 40 * 48, generator=g, dtype=torch.float64)
    expected = sum(one.contract(left[i : i + 1], right[i : i + 1], scale[i : i + 1], scale[i : i + 1])
                   for i, one in enumerate(alone))
    torch.testing.assert_close(pairs.contract(left, right, scale, scale), expected, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match=r"left and right must be the same Tensor\[2, N, C\]"):
        pairs.contract(left[:1], right[:1])
    with pytest.raises(ValueError, match="images must be an int64 Tensor"):
        PairGroups(((torch.tensor([0.0]), alone[0]),))
    with pytest.raises(ValueError, match="the KernelPairs of its 2 images"):
        PairGroups(((torch.tensor([0, 1]), alone[0]),))


def test_gaussian_zeroes_negligible_entries_and_names_bad_input():
    exponent = torch.tensor([0.0, -1.0, -60.0, -70.0, -1e4, -math.inf])
    tiny = torch.finfo(torch.float32).tiny
    out = gaussian_(exponent.clone())
    torch.testing.assert_close(out[:3], torch.exp(exponent[:3]))  # exp(-60) = 8.8e-27: kept
    assert (out[3:] == 0).all() and float(torch.exp(exponent[3])) < 1.5 * math.exp(20) * tiny
    with pytest.raises(ValueError, match="exponent must be a floating-point Tensor"):
        gaussian_(torch.zeros(3, dtype=torch.long))


# --- recovery of the exact CRF's best bandwidths -------------------------------------------------------------


def recovery_scene(seed: int, h: int = 24, w: int = 24, c: int = 3):
    """Blobs (class 1), thin bars (class 2) coloured close to class 1, and class-0 decoys coloured like class 1
    away from it, on noisy colours, with noisy coarse unaries. Each bandwidth has an interior optimum: a wide
    θα links the decoys to class 1, a wide θβ merges classes 1 and 2, a wide θγ erases the bars."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w]
    label = np.zeros((h, w), np.int64)
    for _ in range(3):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2.5, 5)
        label[(ys - cy) ** 2 + (xs - cx) ** 2 < r * r] = 1
    for _ in range(2):
        y0, x0, angle, length = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0, np.pi), rng.uniform(8, 16)
        t = np.linspace(-length / 2, length / 2, 64)
        for yy, xx in zip(y0 + t * np.sin(angle), x0 + t * np.cos(angle)):
            label[(np.abs(ys - yy) <= 0.6) & (np.abs(xs - xx) <= 0.6)] = 2
    decoy = np.zeros((h, w), bool)
    for _ in range(2):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2.5, 4.5)
        decoy |= ((ys - cy) ** 2 + (xs - cx) ** 2 < r * r) & (label == 0)
    base = rng.uniform(60, 200, 3)
    d1 = rng.normal(0, 1, 3)
    d1 *= 80 / np.linalg.norm(d1)
    d2 = rng.normal(0, 1, 3)
    d2 *= 40 / np.linalg.norm(d2)
    colours = np.stack([base, base + d1, base + d1 + d2])
    image = np.clip(colours[np.where(decoy, 1, label)] + rng.normal(0, 12, (h, w, 3)), 0, 255)
    return crf_inputs(rng, image, label, c, scale=2.0, coarse_noise=0.5, pixel_noise=1.5)


RECOVERY = dict(seed=5, spatial_weight=3.0, bilateral_weight=5.0, normalization="symmetric")
# The exact CRF's best (θα, θβ, θγ) for RECOVERY: a log-spaced grid search of its loss refined by Nelder-Mead
# (test_recovery_optimum_is_the_exact_crfs recomputes it).
RECOVERY_OPTIMUM = (2.981, 25.015, 1.218)
RECOVERY_STARTS = ((0.3, 3.0, 0.3), (3.5, 3.0, 3.0))  # × the optimum


def exact_crf_logits(scene_, theta_alpha, theta_beta, theta_gamma) -> torch.Tensor:
    """The exact dense CRF's output on a recovery scene with RECOVERY's weights (bandwidths: floats or tensors)."""
    logits, image, label = scene_
    eye = torch.eye(logits.shape[1], dtype=torch.float64)
    theta = [torch.as_tensor(t, dtype=torch.float64) for t in (theta_alpha, theta_beta, theta_gamma)]
    return dense_crf(logits, image, spatial_weight=RECOVERY["spatial_weight"] * eye,
                     bilateral_weight=RECOVERY["bilateral_weight"] * eye, compatibility=1 - eye,
                     theta_alpha=theta[0], theta_beta=theta[1], theta_gamma=theta[2], iterations=5,
                     normalization=RECOVERY["normalization"])


def exact_crf_loss(scene_, theta_alpha, theta_beta, theta_gamma) -> float:
    return float(F.cross_entropy(exact_crf_logits(scene_, theta_alpha, theta_beta, theta_gamma), scene_[2]))


class Optimum(NamedTuple):
    """The exact CRF's best (θα, θβ, θγ) found by :func:`exact_optimum`."""

    theta: np.ndarray
    in_range: bool  # inside the grid's range (else the loss has no optimum there: it keeps falling along a θ)
    grid_interior: bool  # the grid's best point is off the grid's edges


def exact_optimum(seed: int, size: int = 24) -> Optimum:
    """The exact CRF's best (θα, θβ, θγ) on ``recovery_scene(seed, size, size)``: a log-spaced grid search of its
    loss refined by Nelder-Mead."""
    from scipy.optimize import minimize

    scene_ = recovery_scene(seed, size, size)
    grid = [np.geomspace(2, 64, 7), np.geomspace(4, 100, 7), np.geomspace(0.5, 6, 5)]
    losses = np.array([[[exact_crf_loss(scene_, a, b, g) for g in grid[2]] for b in grid[1]] for a in grid[0]])
    best = np.unravel_index(losses.argmin(), losses.shape)
    start = np.log([grid[k][i] for k, i in enumerate(best)])
    result = minimize(lambda x: exact_crf_loss(scene_, *np.exp(x)), start, method="Nelder-Mead",
                      options=dict(xatol=1e-3, fatol=1e-7, maxiter=400))
    theta = np.exp(result.x)
    return Optimum(theta, all(g[0] < t < g[-1] for g, t in zip(grid, theta)),
                   all(0 < i < n - 1 for i, n in zip(best, losses.shape)))


def descend(start: tuple[float, float, float], steps: int = 150, *, seed: int = RECOVERY["seed"],
            optimum=RECOVERY_OPTIMUM, exact: bool = False, size: int = 24, decay: bool = False,
            bilateral_filter: str = "auto") -> np.ndarray:
    """Adam (lr 0.05; with ``decay`` brought to 0 along a cosine) on the log-bandwidths alone (unaries and kernel
    weights frozen) from ``start`` × the optimum, on ``recovery_scene(seed, size, size)``: the end bandwidths
    divided by the exact CRF's optimum, per θ. The layer's gradient, or with ``exact`` the exact dense CRF's own
    (autograd through its kernel matrices). ``bilateral_filter``: the layer's (at 24×24 "auto" is the exact
    filter)."""
    scene_ = logits, image, label = recovery_scene(seed, size, size)
    begin = [o * f for o, f in zip(optimum, start)]
    crf = MeanFieldCRF(num_classes=3, spatial_weight=RECOVERY["spatial_weight"],
                       bilateral_weight=RECOVERY["bilateral_weight"], theta_alpha=begin[0], theta_beta=begin[1],
                       theta_gamma=begin[2], normalization=RECOVERY["normalization"], train_iterations=5,
                       learn_kernel_weights=False, learn_compatibility=False,
                       bilateral_filter=bilateral_filter).double().train()
    bandwidths = [crf.log_theta_alpha, crf.log_theta_beta, crf.log_theta_gamma]
    optimiser = torch.optim.Adam(bandwidths, lr=0.05)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps) if decay else None
    for _ in range(steps):
        optimiser.zero_grad()
        out = exact_crf_logits(scene_, *[p.exp() for p in bandwidths]) if exact else crf(logits, image)
        F.cross_entropy(out, label).backward()
        optimiser.step()
        if schedule is not None:
            schedule.step()
    return np.array([float(p.detach().exp()) for p in bandwidths]) / np.array(optimum)


@pytest.mark.parametrize("bilateral_filter", ["auto", "lattice"])  # the default (exact) filter, and the lattice's
@pytest.mark.parametrize("start", [RECOVERY_STARTS[0], pytest.param(RECOVERY_STARTS[1], marks=pytest.mark.slow)])
def test_gradient_descent_recovers_the_exact_crfs_bandwidths(start, bilateral_filter):
    # From 3-4× off the exact CRF's optimum, each θ ends within 10 % of it.
    end = descend(start, bilateral_filter=bilateral_filter)
    assert (np.abs(end - 1) < 0.10).all(), end


@pytest.mark.slow
def test_recovery_optimum_is_the_exact_crfs():
    optimum = exact_optimum(RECOVERY["seed"])
    assert optimum.grid_interior and optimum.in_range, "the optimum must be interior"
    np.testing.assert_allclose(optimum.theta, RECOVERY_OPTIMUM, rtol=0.03)


@pytest.mark.parametrize("points", [30, 2000])  # all pairs / sampled pairs
def test_contract_with_point_scales_equals_contract_of_scaled_values(points):
    # The per-point factors (a normaliser folded into the lattice) on the pair values: the same as scaling the
    # arrays first, for all pairs and for sampled pairs (the partner's own factor).
    g = torch.Generator().manual_seed(points)
    features = torch.rand(2, points, 3, generator=g, dtype=torch.float64) * 4
    mass = 0.3 + torch.rand(2, points, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    pairs = kernel_pairs(features, mass)
    left, right = (torch.randn(2, points, 5, generator=g, dtype=torch.float64) for _ in range(2))
    a, b = (0.2 + torch.rand(2, points, generator=g, dtype=torch.float64) for _ in range(2))
    expected = pairs.contract(left * a[..., None], right * b[..., None])
    torch.testing.assert_close(pairs.contract(left, right, a, b), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pairs.contract(left * a[..., None], right, None, b), expected, rtol=1e-12, atol=1e-12)
