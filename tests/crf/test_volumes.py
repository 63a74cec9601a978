"""The CRF beyond 2-D RGB (issue #17; README: 3-D volumes): 3-D volumes with a physical voxel spacing, K >= 1 guidance
channels in groups with a bandwidth each; against pydensecrf2's generic DenseCRF on the same features, the exact
dense reference, gradients, masks, bad input; and the synthetic volumes of the worked example."""

import math

import numpy as np
import pytest
import torch

from crfrnn_deeplab import DenseCRF
from crfrnn_deeplab.crf import MeanFieldCRF
from crfrnn_deeplab.crf.kernels import unmasked_spatial
from crfrnn_deeplab.crf.reference import dense_crf
from crfrnn_deeplab.crf.spatial import spatial_gaussian
from crfrnn_deeplab.data.volumes import SyntheticVolumes, render_volume
from crf_scenes import dense_pairs

dcrf = pytest.importorskip("pydensecrf.densecrf")


# --- scenes and pydensecrf2 on the same features ------------------------------------------------------------


def volume_scene(seed, shape, num_classes, channels, spacing=(1.0, 1.0, 1.0), noise=1.5):
    """A synthetic volume's labels (mod C), K guidance channels in very different units, noisy logits.

    Channel 0 is the volume's intensity (about 0-1); channel 1, a second modality in 0-1000 units that
    separates blobs; channels 2-3, an RGB-like 0-255 pair. Returns (label [*S], guidance float32 [K, *S],
    logits float32 [C, *S])."""
    volume, label = render_volume(np.random.default_rng([seed, 5]), shape, spacing=spacing)
    label = label % num_classes
    rng = np.random.default_rng(seed)
    extra = [
        (label == 1) * 700.0 + (label == 2) * 300.0 + rng.normal(0, 60.0, label.shape),
        np.clip(np.array([40.0, 200.0, 120.0, 90.0])[label] + rng.normal(0, 10.0, label.shape), 0, 255),
        np.clip(np.array([220.0, 30.0, 60.0, 160.0])[label] + rng.normal(0, 10.0, label.shape), 0, 255),
    ]
    guidance = np.stack([volume, *extra][:channels]).astype(np.float32)
    logits = 2.0 * np.eye(num_classes)[label].transpose(3, 0, 1, 2) + rng.normal(0, noise, (num_classes, *shape))
    return label, guidance, logits.astype(np.float32)


def positions(shape, spacing):
    """Voxel positions in physical units, x (the last axis) first: float64 [S, N]."""
    grid = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij")[::-1]).reshape(len(shape), -1)
    return grid * np.asarray(spacing[::-1], dtype=np.float64)[:, None]


def densecrf_generic_q(logits, guidance, iterations, *, groups, thetas_beta, spacing, p):
    """pydensecrf2's generic DenseCRF with the features ``p·s/θγ`` and ``(p·s/θα, I_g/θβ_g)``."""
    c, *shape = logits.shape
    pos = positions(shape, spacing)
    beta = np.repeat(np.asarray(thetas_beta, dtype=np.float64), groups)[:, None]
    spatial = np.ascontiguousarray(pos / p["theta_gamma"], dtype=np.float32)
    bilateral = np.ascontiguousarray(
        np.concatenate([pos / p["theta_alpha"], guidance.reshape(len(beta), -1) / beta]), dtype=np.float32
    )
    crf = dcrf.DenseCRF(pos.shape[1], c)
    crf.setUnaryEnergy(np.ascontiguousarray(-logits.reshape(c, -1)))
    crf.addPairwiseEnergy(spatial, compat=p["spatial_weight"], kernel=dcrf.DIAG_KERNEL,
                          normalization=dcrf.NORMALIZE_SYMMETRIC)
    crf.addPairwiseEnergy(bilateral, compat=p["bilateral_weight"], kernel=dcrf.DIAG_KERNEL,
                          normalization=dcrf.NORMALIZE_SYMMETRIC)
    return np.array(crf.inference(iterations)).reshape(logits.shape)


VOLUME_PARAMS = dict(spatial_weight=3.0, bilateral_weight=10.0, theta_alpha=6.0, theta_gamma=1.5)
# (K, groups, θβ per group, C, spacing): grey; two modalities in different units; RGB + a 0-1 intensity.
CASES = {
    "K=1": (1, (1,), (0.25,), 3, (1.0, 1.0, 1.0)),
    "K=2": (2, (1, 1), (0.25, 150.0), 2, (2.0, 1.0, 1.0)),
    "K=4": (4, (1, 1, 2), (0.25, 150.0, 25.0), 4, (1.0, 1.0, 1.0)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_pydensecrf_generic_densecrf_on_32_cubed(case):
    k, groups, betas, c, spacing = CASES[case]
    _, guidance, logits = volume_scene(sorted(CASES).index(case), (32, 32, 32), c, k, spacing=spacing)
    crf = MeanFieldCRF(num_classes=c, spatial_dims=3, guidance_groups=groups, theta_beta=betas, spacing=spacing,
                       **VOLUME_PARAMS).eval()
    for iterations in (1, 5, 10):
        crf.eval_iterations = iterations
        with torch.no_grad():
            q = torch.softmax(crf(torch.from_numpy(logits)[None], torch.from_numpy(guidance)[None]), 1)[0].numpy()
        theirs = densecrf_generic_q(logits, guidance, iterations, groups=groups, thetas_beta=betas, spacing=spacing,
                                    p=VOLUME_PARAMS)
        assert np.abs(q - theirs).mean() <= 0.01, (iterations, np.abs(q - theirs).mean())
        assert (q.argmax(0) == theirs.argmax(0)).mean() >= 0.99, iterations
    assert (q.argmax(0) != logits.argmax(0)).mean() > 0.01  # the CRF did change the labelling


@pytest.mark.parametrize("k, groups, betas", [(1, (1,), (0.25,)), (2, (1, 1), (0.25, 150.0))])
def test_2d_multichannel_matches_pydensecrf_generic_densecrf(k, groups, betas):
    _, guidance, logits = volume_scene(7, (4, 60, 70), 3, k)
    guidance, logits = np.ascontiguousarray(guidance[:, 2]), np.ascontiguousarray(logits[:, 2])  # a 60×70 slice
    p = dict(VOLUME_PARAMS, theta_alpha=15.0)
    crf = MeanFieldCRF(num_classes=3, guidance_groups=groups, theta_beta=betas, eval_iterations=5, **p).eval()
    with torch.no_grad():
        q = torch.softmax(crf(torch.from_numpy(logits)[None], torch.from_numpy(guidance)[None]), 1)[0].numpy()
    theirs = densecrf_generic_q(logits, guidance, 5, groups=groups, thetas_beta=betas, spacing=(1.0, 1.0), p=p)
    assert np.abs(q - theirs).mean() <= 0.01
    assert (q.argmax(0) == theirs.argmax(0)).mean() >= 0.99


# --- the exact dense reference -------------------------------------------------------------------------------


def small_volume(seed=0, b=1, c=3, shape=(4, 5, 6), k=2):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, *shape, generator=g, dtype=torch.float64) * 2
    guidance = torch.rand(b, k, *shape, generator=g, dtype=torch.float64) * torch.tensor([1.0, 100.0][:k]).view(1, k, 1, 1, 1)
    return logits, guidance


def params_of(crf: MeanFieldCRF) -> dict:
    return dict(spatial_weight=crf.spatial_weight, bilateral_weight=crf.bilateral_weight, compatibility=crf.compatibility,
                theta_alpha=crf.log_theta_alpha.exp(), theta_beta=crf.log_theta_beta.exp(),
                theta_gamma=crf.log_theta_gamma.exp(), guidance_groups=crf.guidance_groups, spacing=crf.spacing)


@pytest.mark.parametrize("normalization", ["symmetric", "after"])
def test_spatial_only_matches_exact_dense_crf_with_anisotropic_spacing(normalization):
    # Without the bilateral kernel nothing is approximated (the separable filter is exact up to exp(-8)).
    logits, guidance = small_volume(c=4, shape=(5, 6, 7))
    crf = MeanFieldCRF(num_classes=4, spatial_dims=3, guidance_groups=(1, 1), bilateral_weight=0.0, theta_gamma=2.0,
                       spacing=(2.5, 0.8, 1.0), normalization=normalization).double().eval()
    with torch.no_grad():
        crf.spatial_weight.add_(torch.rand(4, 4, dtype=torch.float64))
        ours = crf(logits, guidance)
        ref = dense_crf(logits, guidance, iterations=10, normalization=normalization, **params_of(crf))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("normalization", ["symmetric", "after"])
def test_full_layer_close_to_exact_dense_crf(normalization):
    label, guidance, logits = volume_scene(3, (8, 10, 12), 3, 2, spacing=(2.0, 1.0, 1.0))
    logits, guidance = torch.tensor(logits, dtype=torch.float64)[None], torch.tensor(guidance, dtype=torch.float64)[None]
    crf = MeanFieldCRF(bilateral_filter="lattice", num_classes=3, spatial_dims=3, guidance_groups=(1, 1), theta_alpha=4.0, theta_beta=(0.3, 200.0),
                       spacing=(2.0, 1.0, 1.0), normalization=normalization).double().eval()
    with torch.no_grad():
        q = torch.softmax(crf(logits, guidance), 1)
        ref = torch.softmax(dense_crf(logits, guidance, iterations=10, normalization=normalization, **params_of(crf)), 1)
    assert (q - ref).abs().mean() < 0.02
    assert (q.argmax(1) == ref.argmax(1)).double().mean() > 0.97


def test_reference_takes_any_spatial_dimension_and_groups():
    # One group of K channels with θβ equals K groups with the same θβ; a uniform spacing s equals θ/s.
    logits, guidance = small_volume(shape=(3, 4, 5))
    w = dict(spatial_weight=torch.eye(3, dtype=torch.float64) * 3, bilateral_weight=torch.eye(3, dtype=torch.float64) * 5,
             compatibility=1 - torch.eye(3, dtype=torch.float64), iterations=3)
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    one = dense_crf(logits, guidance, theta_alpha=t(3.0), theta_beta=t(20.0), theta_gamma=t(1.0), **w)
    two = dense_crf(logits, guidance, theta_alpha=t(6.0), theta_beta=t([20.0, 20.0]), theta_gamma=t(2.0),
                    guidance_groups=(1, 1), spacing=(2.0, 2.0, 2.0), **w)
    torch.testing.assert_close(one, two)


# --- the fast paths ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalization", ["symmetric", "after"])
@pytest.mark.parametrize("compatibility", ["potts", "learned"])
@pytest.mark.parametrize("masked", [False, True])
def test_autograd_path_equals_inference_path(normalization, compatibility, masked):
    logits, guidance = small_volume(b=2, c=3, shape=(5, 6, 7))
    mask = torch.rand(2, 5, 6, 7, generator=torch.Generator().manual_seed(3)) > 0.2 if masked else None
    crf = MeanFieldCRF(bilateral_filter="lattice", num_classes=3, spatial_dims=3, guidance_groups=(1, 1), theta_alpha=3.0, theta_beta=(0.3, 30.0),
                       spacing=(2.0, 1.0, 1.0), normalization=normalization).double().eval()
    if compatibility == "learned":
        with torch.no_grad():
            crf.compatibility.add_(torch.rand(3, 3, dtype=torch.float64))
    with torch.no_grad():
        fast = crf(logits, guidance, mask)
    slow = crf(logits.clone().requires_grad_(True), guidance, mask)
    torch.testing.assert_close(fast, slow.detach())
    if masked:
        torch.testing.assert_close(fast.movedim(1, -1)[~mask], logits.movedim(1, -1)[~mask])


def test_padding_with_mask_equals_unpadded_volume():
    logits, guidance = small_volume(c=3, shape=(5, 6, 7))
    crf = MeanFieldCRF(bilateral_filter="lattice", num_classes=3, spatial_dims=3, guidance_groups=(2,), theta_alpha=3.0, theta_beta=30.0).double().eval()
    pad_logits = torch.nn.functional.pad(logits, (0, 2, 0, 3, 0, 1), value=7.0)
    pad_guidance = torch.nn.functional.pad(guidance, (0, 2, 0, 3, 0, 1), value=50.0)
    mask = torch.zeros(1, 6, 9, 9, dtype=torch.bool)
    mask[:, :5, :6, :7] = True
    with torch.no_grad():
        alone, padded = crf(logits, guidance), crf(pad_logits, pad_guidance, mask)
    torch.testing.assert_close(padded[..., :5, :6, :7], alone)
    torch.testing.assert_close(padded[..., 5:, :, :], pad_logits[..., 5:, :, :])  # masked: output = input


def test_batch_equals_single_volumes_and_spacing_argument_overrides_default():
    logits, guidance = small_volume(b=2, c=3, shape=(4, 5, 6), k=1)
    crf = MeanFieldCRF(bilateral_filter="lattice", num_classes=3, spatial_dims=3, guidance_groups=(1,), theta_alpha=3.0, theta_beta=0.3,
                       spacing=(3.0, 1.0, 1.0)).double().eval()
    other = MeanFieldCRF(bilateral_filter="lattice", num_classes=3, spatial_dims=3, guidance_groups=(1,), theta_alpha=3.0, theta_beta=0.3).double().eval()
    with torch.no_grad():
        both = crf(logits, guidance)
        for i in range(2):
            torch.testing.assert_close(both[i : i + 1], crf(logits[i : i + 1], guidance[i : i + 1]))
        torch.testing.assert_close(other(logits, guidance, spacing=(3.0, 1.0, 1.0)), both)
        assert not torch.allclose(other(logits, guidance), both)


def test_uniform_spacing_is_a_change_of_units():
    # Positions in millimetres with bandwidths in millimetres: the kernels of voxels and bandwidths in voxels.
    logits, guidance = small_volume(c=3, shape=(5, 6, 7))
    voxels = MeanFieldCRF(num_classes=3, spatial_dims=3, guidance_groups=(1, 1), theta_alpha=3.0, theta_gamma=1.5,
                          theta_beta=(0.3, 30.0)).double().eval()
    mm = MeanFieldCRF(num_classes=3, spatial_dims=3, guidance_groups=(1, 1), theta_alpha=1.5, theta_gamma=0.75,
                      theta_beta=(0.3, 30.0), spacing=(0.5, 0.5, 0.5)).double().eval()
    with torch.no_grad():
        a, b = voxels.kernels(guidance), mm.kernels(guidance)
        torch.testing.assert_close(b.raw * b.scale, a.raw * a.scale)  # the lattice's features
        torch.testing.assert_close(b.spatial(b.norm_spatial), a.spatial(a.norm_spatial))
        for crf in (voxels, mm):
            crf.bilateral_weight.zero_()  # the lattice is piecewise in its features: compare the exact kernel only
        torch.testing.assert_close(mm(logits, guidance), voxels(logits, guidance))


def test_spatial_filter_3d_is_exact_anisotropic_gaussian():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, 7, 3, dtype=torch.float64)
    theta, spacing = torch.tensor(1.7, dtype=torch.float64), (2.0, 0.7, 1.0)
    pos = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float64) * s for n, s in zip((5, 6, 7), spacing)),
                                     indexing="ij"), -1).reshape(-1, 3)
    k = torch.exp(-torch.cdist(pos, pos) ** 2 / (2 * theta**2))
    ref = torch.einsum("ij,bjc->bic", k, x.reshape(2, -1, 3)).reshape(x.shape)
    torch.testing.assert_close(spatial_gaussian(x, theta, spacing=spacing), ref, rtol=0, atol=5e-4)  # truncation at 4θ
    ones = torch.ones(2, 5, 6, 7, 1, dtype=torch.float64)
    torch.testing.assert_close(unmasked_spatial(theta, (2, 5, 6, 7), "ones", spacing=spacing),
                               spatial_gaussian(ones, theta, spacing=spacing))
    # 2-D with spacing: each axis its own bandwidth in pixels
    y = x[:, 0]
    torch.testing.assert_close(spatial_gaussian(y, theta, spacing=(1.0, 1.0)), spatial_gaussian(y, theta))


# --- gradients, float64 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("learn_bandwidths", [True, False])  # False: the folded, lattice-mixed path
def test_gradcheck_logits_weights_compatibility_3d(learn_bandwidths):
    # The lattice is a fixed linear operator for given bandwidths, its backward its exact transpose.
    logits, guidance = small_volume(c=2, shape=(3, 3, 4))
    crf = MeanFieldCRF(bilateral_filter="lattice", num_classes=2, spatial_dims=3, guidance_groups=(1, 1), theta_alpha=2.0, theta_beta=(0.5, 50.0),
                       spacing=(2.0, 1.0, 1.0), train_iterations=2, learn_bandwidths=learn_bandwidths).double().train()
    weights = [p.detach().clone() for p in (crf.spatial_weight, crf.bilateral_weight, crf.compatibility)]
    inputs = [logits.requires_grad_(True)] + [w.requires_grad_(True) for w in weights]

    def layer(z, ws, wb, mu):
        return torch.func.functional_call(crf, {"spatial_weight": ws, "bilateral_weight": wb, "compatibility": mu},
                                          (z, guidance))

    assert torch.autograd.gradcheck(layer, tuple(inputs), atol=1e-6, fast_mode=True)


def test_spatial_kernel_gradients_equal_the_exact_dense_crf():
    # No lattice: the logits, W_spatial, μ and θγ gradients are those of the exact dense CRF (up to exp(-8)).
    logits, guidance = small_volume(c=3, shape=(4, 5, 6))
    logits.requires_grad_(True)
    target = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    crf = MeanFieldCRF(num_classes=3, spatial_dims=3, guidance_groups=(1, 1), bilateral_weight=0.0, theta_gamma=1.3,
                       spacing=(2.0, 1.0, 0.8), train_iterations=3).double().train()
    with torch.no_grad():
        crf.spatial_weight.add_(torch.rand(3, 3, dtype=torch.float64))
    (crf(logits, guidance) * target).sum().backward()
    ours = [logits.grad.clone(), crf.spatial_weight.grad, crf.compatibility.grad, crf.log_theta_gamma.grad]
    logits.grad = None
    ws, mu = crf.spatial_weight.detach().clone().requires_grad_(True), crf.compatibility.detach().clone().requires_grad_(True)
    log_gamma = crf.log_theta_gamma.detach().clone().requires_grad_(True)
    p = dict(params_of(crf), spatial_weight=ws, compatibility=mu, theta_gamma=log_gamma.exp())
    (dense_crf(logits, guidance, iterations=3, **p) * target).sum().backward()
    for a, b in zip(ours, [logits.grad, ws.grad, mu.grad, log_gamma.grad]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def bandwidth_gradients(seed, shape, groups, betas, spacing):
    """d(loss)/d(log θα, log θβ_g..., log θγ) of the layer and of the exact dense CRF, 3 iterations."""
    label, guidance, logits = volume_scene(seed, shape, 3, len(groups), spacing=spacing)
    logits, guidance = torch.tensor(logits, dtype=torch.float64)[None], torch.tensor(guidance, dtype=torch.float64)[None]
    target = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    crf = MeanFieldCRF(bilateral_filter="lattice", num_classes=3, spatial_dims=3, guidance_groups=groups, theta_beta=betas, theta_alpha=4.0,
                       theta_gamma=1.2, spacing=spacing, train_iterations=3).double().train()
    (crf(logits, guidance) * target).sum().backward()
    ours = torch.cat([crf.log_theta_alpha.grad[None], crf.log_theta_beta.grad.reshape(-1), crf.log_theta_gamma.grad[None]])
    logs = [p.detach().clone().requires_grad_(True) for p in (crf.log_theta_alpha, crf.log_theta_beta, crf.log_theta_gamma)]
    p = dict(params_of(crf), theta_alpha=logs[0].exp(), theta_beta=logs[1].exp(), theta_gamma=logs[2].exp())
    (dense_crf(logits, guidance, iterations=3, **{k: v.detach() if k.endswith("weight") or k == "compatibility" else v
                                                  for k, v in p.items()}) * target).sum().backward()
    exact = torch.cat([logs[0].grad[None], logs[1].grad.reshape(-1), logs[2].grad[None]])
    return ours, exact


BANDWIDTH_CASES = [(0, (6, 7, 8), (1,), 0.3, (1.0, 1.0, 1.0)), (1, (6, 7, 8), (1, 1), (0.3, 80.0), (2.0, 1.0, 1.0))]


@pytest.mark.parametrize("case", BANDWIDTH_CASES, ids=["K=1", "K=2 anisotropic"])
def test_bandwidth_gradients_match_exact_dense_crf_3d(case):
    # Each bandwidth within ±25 % of the exact float64 dense CRF's gradient, never the wrong sign (README: bandwidth
    # gradients). (On volumes this small the lattice's forward pass itself can differ from the exact CRF's, and then no
    # derivative matches the exact one per bandwidth: the test below is the estimator's own check.)
    ours, exact = bandwidth_gradients(*case)
    ratio = ours / exact
    assert bool(((ratio > 0.75) & (ratio < 1.25)).all()), (ours, exact, ratio)


IDEAL_CASES = [  # seed, shape (D, H, W), guidance groups, θβ, spacing
    (0, (6, 7, 8), (1,), 0.3, (1.0, 1.0, 1.0)),
    (1, (6, 7, 8), (1, 1), (0.3, 80.0), (2.0, 1.0, 1.0)),
    (3, (5, 8, 9), (1,), 0.2, (2.0, 1.0, 1.0)),
    (5, (4, 8, 8), (2,), 0.4, (3.0, 1.0, 1.0)),
    (7, (6, 7, 8), (1, 1), (0.2, 60.0), (2.0, 1.0, 1.0)),
]


@pytest.mark.parametrize("normalization", ["symmetric", "after"])
@pytest.mark.parametrize("case", IDEAL_CASES, ids=[f"seed{c[0]}-K{sum(c[2])}-groups{len(c[2])}" for c in IDEAL_CASES])
def test_bandwidth_gradients_match_the_ideal_3d(case, normalization):
    # #15's protocol on volumes, K guidance channels in groups and anisotropic spacing: the estimator against
    # the layer's own iterates with the dense float64 derivative of √(c_i c_j) k_ij (tests/crf_scenes.py).
    seed, shape, groups, betas, spacing = case
    label, guidance, logits = volume_scene(seed, shape, 3, sum(groups), spacing=spacing)
    logits, guidance = torch.tensor(logits, dtype=torch.float64)[None], torch.tensor(guidance, dtype=torch.float64)[None]
    target = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def gradient() -> torch.Tensor:
        crf = MeanFieldCRF(bilateral_filter="lattice", num_classes=3, spatial_dims=3, guidance_groups=groups, theta_beta=betas, theta_alpha=4.0,
                           theta_gamma=1.2, spatial_weight=3.0, bilateral_weight=5.0, spacing=spacing,
                           normalization=normalization, train_iterations=5).double().train()
        (crf(logits, guidance) * target).sum().backward()
        return torch.cat([crf.log_theta_alpha.grad[None], crf.log_theta_beta.grad.reshape(-1),
                          crf.log_theta_gamma.grad[None]])

    ours = gradient()
    with dense_pairs("pair"):
        ideal = gradient()
    ratio = ours / ideal
    assert bool(((ratio > 0.75) & (ratio < 1.25)).all()), (ours, ideal)


def test_theta_gamma_gradient_through_the_full_crf_is_close_to_exact():
    # θγ's gradient is exact where the lattice is not involved (see above); through the full CRF it is close.
    ours, exact = bandwidth_gradients(*BANDWIDTH_CASES[1])
    assert torch.isfinite(ours).all() and ours.shape == (4,)
    assert float(ours[-1] / exact[-1]) == pytest.approx(1.0, abs=0.1)


# --- parameters, defaults, checkpoints ---------------------------------------------------------------------------


def test_default_state_dict_keys_and_shapes_are_unchanged():
    shapes = {k: tuple(v.shape) for k, v in MeanFieldCRF(num_classes=4).state_dict().items()}
    assert shapes == {"spatial_weight": (4, 4), "bilateral_weight": (4, 4), "compatibility": (4, 4),
                      "log_theta_alpha": (), "log_theta_beta": (), "log_theta_gamma": ()}
    # one guidance group (grey, CT, any K channels): the same keys and shapes, so 2-D checkpoints load
    one_group = MeanFieldCRF(num_classes=4, spatial_dims=3, guidance_groups=(1,), theta_beta=0.2)
    one_group.load_state_dict(MeanFieldCRF(num_classes=4).state_dict())
    groups = MeanFieldCRF(num_classes=4, spatial_dims=3, guidance_groups=(1, 1, 3), theta_beta=(1.0, 2.0, 3.0))
    assert groups.log_theta_beta.shape == (3,)
    assert groups.bandwidths["theta_beta"] == pytest.approx((1.0, 2.0, 3.0))
    assert MeanFieldCRF(num_classes=2, guidance_groups=(1, 1), theta_beta=5.0).bandwidths["theta_beta"] == pytest.approx((5.0, 5.0))
    assert "spatial_dims=3" in repr(groups) and "spatial_dims" not in repr(MeanFieldCRF(num_classes=2))


def test_every_parameter_gets_a_gradient_3d():
    logits, guidance = small_volume(c=3, shape=(3, 4, 5))
    crf = MeanFieldCRF(bilateral_filter="lattice", num_classes=3, spatial_dims=3, guidance_groups=(1, 1), theta_alpha=3.0,
                       theta_beta=(0.5, 50.0)).double().train()
    crf(logits, guidance).square().sum().backward()
    for name, p in crf.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert crf.log_theta_beta.grad.shape == (2,)


def test_guidance_other_than_rgb_has_no_0_255_range_but_rgb_keeps_it():
    logits, guidance = small_volume(c=3, shape=(3, 4, 5), k=1)
    hounsfield = guidance * 3000 - 1000  # CT numbers: negative and far above 255
    crf = MeanFieldCRF(num_classes=3, spatial_dims=3, guidance_groups=(1,), theta_beta=100.0).double().eval()
    with torch.no_grad():
        assert torch.isfinite(crf(logits, hounsfield)).all()
    rgb_volume = MeanFieldCRF(num_classes=3, spatial_dims=3).double()
    with pytest.raises(ValueError, match="negative values"):
        rgb_volume(logits, hounsfield.expand(1, 3, 3, 4, 5))
    with torch.no_grad():
        assert torch.isfinite(rgb_volume(logits, (guidance * 255).expand(1, 3, 3, 4, 5))).all()
    grey_2d = MeanFieldCRF(num_classes=3, guidance_groups=(3,)).double()
    with torch.no_grad():
        assert torch.isfinite(grey_2d(logits[:, :, 0], hounsfield[:, :, 0].expand(1, 3, 4, 5))).all()


def test_an_rgb_volume_is_checked_on_its_channel_axis_whatever_its_depth():
    # The channel axis of Tensor[B, 3, D, H, W] is 1: a depth of 3 made any channel count pass, others fail.
    logits, guidance = small_volume(c=3, shape=(4, 5, 6), k=1)
    rgb = (guidance * 255).expand(1, 3, 4, 5, 6)
    crf = MeanFieldCRF(num_classes=3, spatial_dims=3, theta_beta=20.0).double().eval()
    same = MeanFieldCRF(num_classes=3, spatial_dims=3, guidance_groups=(3,), theta_beta=20.0).double().eval()
    with torch.no_grad():
        torch.testing.assert_close(crf(logits, rgb), same(logits, rgb))
        seven = torch.cat([rgb, rgb[:, :1]] * 2, 1)[:, :7, :3]  # 7 channels, depth 3
        with pytest.raises(ValueError, match=r"raw RGB Tensor\[B, 3, D, H, W\].*got shape \(1, 7, 3, 5, 6\)"):
            crf(logits[:, :, :3], seven)


def test_guidance_groups_take_numpy_integers():
    crf = MeanFieldCRF(num_classes=3, spatial_dims=3, guidance_groups=(np.int64(1), np.int32(1)),
                       theta_beta=(0.3, 30.0))
    assert crf.guidance_groups == (1, 1) and all(type(g) is int for g in crf.guidance_groups)


def test_densecrf_volumes_numpy_and_tensor_forms_agree():
    _, guidance, logits = volume_scene(4, (10, 12, 14), 3, 1)
    crf = DenseCRF(spatial_dims=3, guidance_groups=(1,), theta_alpha=4.0, theta_beta=0.25, theta_gamma=1.5,
                   iterations=5, spacing=(2.0, 1.0, 1.0))
    from_numpy = crf(np.ascontiguousarray(guidance.transpose(1, 2, 3, 0)), logits=logits)  # (D, H, W, 1)
    assert isinstance(from_numpy, np.ndarray) and from_numpy.shape == (3, 10, 12, 14)
    batched = crf(torch.from_numpy(guidance)[None], logits=torch.from_numpy(logits)[None])
    np.testing.assert_allclose(batched[0].numpy(), from_numpy, atol=1e-6)
    layer = MeanFieldCRF(num_classes=3, spatial_dims=3, guidance_groups=(1,), theta_alpha=4.0, theta_beta=0.25,
                         theta_gamma=1.5, eval_iterations=5).eval()
    with torch.no_grad():
        expected = torch.softmax(layer(torch.from_numpy(logits)[None], torch.from_numpy(guidance)[None],
                                       spacing=(2.0, 1.0, 1.0)), 1)
    torch.testing.assert_close(batched, expected)
    assert not np.allclose(crf(torch.from_numpy(guidance), logits=torch.from_numpy(logits), spacing=(1.0, 1.0, 1.0)).numpy(),
                           from_numpy)
    with pytest.raises(ValueError, match="channel axis"):
        crf(guidance[0], logits=logits)  # a grey volume without its channel axis
    assert "spatial_dims=3" in repr(crf) and "spatial_dims" not in repr(DenseCRF())


# --- bad input ----------------------------------------------------------------------------------------------------


def crf3d(**options):
    return MeanFieldCRF(num_classes=3, spatial_dims=3, guidance_groups=(1, 1), theta_beta=(0.3, 30.0), **options).double()


LOGITS, GUIDANCE = small_volume(c=3, shape=(4, 5, 6))
MASK = torch.ones(1, 4, 5, 6, dtype=torch.bool)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: crf3d()(LOGITS, GUIDANCE[..., :-1]), ValueError, r"image \(1, 2, 4, 5, 5\) does not match logits"),
        (lambda: crf3d()(LOGITS, GUIDANCE[:, :, :-1]), ValueError, r"does not match logits.*expected \(1, 2, 4, 5, 6\)"),
        (lambda: crf3d()(LOGITS, GUIDANCE, MASK[..., :-1]), ValueError, r"valid_mask must be a Tensor\[B, D, H, W\] = \(1, 4, 5, 6\)"),
        (lambda: crf3d()(LOGITS, GUIDANCE, MASK[0]), ValueError, r"valid_mask must be a Tensor\[B, D, H, W\]"),
        (lambda: crf3d()(LOGITS, GUIDANCE, spacing=(1.0, 1.0)), ValueError, r"spacing must give one voxel size per spatial axis \(3"),
        (lambda: crf3d()(LOGITS, GUIDANCE, spacing=(1.0, 0.0, 1.0)), ValueError, r"spacing must hold finite voxel sizes > 0"),
        (lambda: crf3d()(LOGITS, GUIDANCE, spacing=(1.0, -2.0, 1.0)), ValueError, r"finite voxel sizes > 0"),
        (lambda: crf3d()(LOGITS, GUIDANCE, spacing=(1.0, float("nan"), 1.0)), ValueError, r"finite voxel sizes > 0"),
        (lambda: crf3d()(LOGITS, GUIDANCE, spacing=(1.0, float("inf"), 1.0)), ValueError, r"finite voxel sizes > 0"),
        (lambda: crf3d()(LOGITS, GUIDANCE, spacing="1,1,1"), ValueError, r"spacing must be a sequence of 3"),
        (lambda: crf3d()(LOGITS, GUIDANCE[:, :0]), ValueError, r"no guidance channels \(K = 0"),
        (lambda: crf3d()(LOGITS, GUIDANCE[:, :1]), ValueError, r"K = 1 guidance channels, but the guidance groups \(1, 1\) add up to 2"),
        (lambda: crf3d()(LOGITS, GUIDANCE.repeat(1, 2, 1, 1, 1)), ValueError, r"add up to 2"),
        (lambda: crf3d()(LOGITS, GUIDANCE.index_fill(2, torch.tensor([1]), float("nan"))), ValueError, r"image contains NaN or infinite"),
        (lambda: crf3d()(LOGITS, GUIDANCE.index_fill(2, torch.tensor([1]), float("inf"))), ValueError, r"NaN or infinite"),
        (lambda: crf3d()(LOGITS, GUIDANCE > 0.5), TypeError, r"real guidance values, got dtype torch.bool"),
        (lambda: crf3d()(LOGITS, GUIDANCE.numpy()), TypeError, r"guidance Tensor\[B, K, D, H, W\], got ndarray"),
        (lambda: crf3d()(LOGITS[:, :, 0], GUIDANCE[:, :, 0]), ValueError, r"logits must be a Tensor\[B, C, D, H, W\].*2 spatial dimensions where 3"),
        (lambda: crf3d()(LOGITS[..., None], GUIDANCE[..., None]), ValueError, r"4 spatial dimensions where 3"),
        (lambda: crf3d()(LOGITS, GUIDANCE[:, :, 0]), ValueError, r"guidance Tensor\[B, K, D, H, W\].*2 spatial dimensions"),
        (lambda: MeanFieldCRF(num_classes=3)(LOGITS, GUIDANCE), ValueError, r"logits must be a Tensor\[B, C, H, W\].*3 spatial dimensions where 2"),
        (lambda: MeanFieldCRF(num_classes=3)(LOGITS[:, :, 0, 0], GUIDANCE[:, :, 0, 0]), ValueError, r"logits must be a Tensor\[B, C, H, W\], got shape \(1, 3, 6\)"),
        (lambda: MeanFieldCRF(num_classes=3, spatial_dims=3)(LOGITS, GUIDANCE), ValueError, r"raw RGB Tensor\[B, 3, D, H, W\]"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(spatial_dims=1), r"spatial_dims must be 2 \(images\) or 3 \(volumes\), got 1"),
        (dict(spatial_dims=4), r"spatial_dims must be 2 \(images\) or 3 \(volumes\), got 4"),
        (dict(spatial_dims=True), r"spatial_dims"),
        (dict(guidance_groups=()), r"guidance_groups must be a non-empty sequence"),
        (dict(guidance_groups=(0,)), r"channel counts >= 1"),
        (dict(guidance_groups=(2, -1)), r"channel counts >= 1"),
        (dict(guidance_groups="3"), r"guidance_groups must be a non-empty sequence"),
        (dict(guidance_groups=(1, 1), theta_beta=(1.0, 2.0, 3.0)), r"theta_beta must be one bandwidth or one per guidance group \(2\)"),
        (dict(guidance_groups=(1, 1), theta_beta=(1.0, -2.0)), r"theta_beta must be a finite bandwidth > 0, got -2.0"),
        (dict(spatial_dims=3, spacing=(1.0, 1.0)), r"spacing must give one voxel size per spatial axis \(3"),
        (dict(spatial_dims=3, spacing=(1.0, 0.0, 1.0)), r"finite voxel sizes > 0"),
        (dict(spacing=(1.0, float("nan"))), r"finite voxel sizes > 0"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MeanFieldCRF(num_classes=3, **kwargs)
    if "spatial_dims" in kwargs or "guidance_groups" in kwargs or "spacing" in kwargs:
        with pytest.raises(ValueError, match=match):
            DenseCRF(**kwargs)


# --- the synthetic volumes ---------------------------------------------------------------------------------------


def test_synthetic_volumes_are_deterministic_and_hold_thin_tubes_and_blobs():
    data = SyntheticVolumes(num_volumes=3, shape=(24, 28, 32), spacing=(2.0, 1.0, 1.0), seed=5)
    volume, label = data[1]
    again, label_again = SyntheticVolumes(num_volumes=3, shape=(24, 28, 32), spacing=(2.0, 1.0, 1.0), seed=5)[1]
    assert torch.equal(volume, again) and torch.equal(label, label_again)
    assert volume.shape == (1, 24, 28, 32) and volume.dtype == torch.float32 and label.dtype == torch.int64
    assert not torch.equal(label, data[0][1])
    fractions = torch.stack([torch.bincount(data[i][1].flatten(), minlength=3) for i in range(3)]).sum(0) / (3 * label.numel())
    assert 0.75 < fractions[0] < 0.97 and 0.003 < fractions[1] < 0.05 and 0.02 < fractions[2] < 0.2, fractions
    # Tubes are thin: a stride-4 prediction (labels down- and up-sampled, nearest) misses most tube voxels.
    coarse = label[None, None, ::4, ::4, ::4].float()
    up = torch.nn.functional.interpolate(coarse, size=label.shape, mode="nearest")[0, 0].long()
    tube = label == 1
    assert (up[tube] != 1).float().mean() > 0.5
    # ... while the intensity tells tubes from the background: a threshold finds most of them.
    assert ((volume[0] > 0.75)[tube]).float().mean() > 0.8
    with pytest.raises(IndexError):
        data[3]
    with pytest.raises(ValueError, match="shape must be 3 sides"):
        render_volume(np.random.default_rng(0), (8, 8))
