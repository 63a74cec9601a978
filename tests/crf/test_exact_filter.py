"""The exact bilateral filter of small images (crf/exact_filter.py): its kernel, the layer on it against the exact
dense CRF (values and every gradient, bandwidths included), its code paths against each other, the "auto" rule
and bad input."""

import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crf_scenes import at_inference_threads, scene
from crfrnn_deeplab.crf import EXACT_FILTER_POINTS, DenseCRF, MeanFieldCRF, build_kernels, exact_filter, fused_step
from crfrnn_deeplab.crf.exact_filter import DenseBlocks, SplitBlur, bilateral_lattice, exact_images
from crfrnn_deeplab.crf.mean_field import mean_field_steps
from crfrnn_deeplab.crf.reference import dense_crf, dense_gaussian

exact_filter_module = importlib.import_module("crfrnn_deeplab.crf.exact_filter")  # the package's exact_filter is the function

PARAMETERS = ("spatial_weight", "bilateral_weight", "compatibility", "log_theta_alpha", "log_theta_beta",
              "log_theta_gamma")


def random_features(b, d, n, seed, dtype=torch.float64):
    return torch.randn(b, d, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).mul(2).to(dtype)


def valid_points(b, n, seed, keep=0.7):
    valid = torch.rand(b, n, generator=torch.Generator().manual_seed(seed)) < keep
    valid[1, n // 2 :] = False  # the images have different numbers of valid points
    return valid


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masked", [False, True])
def test_kernel_is_the_dense_gaussian_of_the_valid_points(dtype, masked):
    b, d, n = 2, 5, 37
    features = random_features(b, d, n, 0, dtype)
    valid = valid_points(b, n, 1) if masked else None
    lattice = exact_filter(features, valid)
    blocks = []
    for i in range(b):
        v = torch.ones(n, dtype=dtype) if valid is None else valid[i].to(dtype)
        blocks.append(dense_gaussian(features[i].T.double()).to(dtype) * v[:, None] * v[None, :])
    expected = torch.block_diag(*blocks)
    explicit = lattice.slice.to_dense() @ lattice.blur[0].to_dense() @ lattice.splat.to_dense()
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(explicit, expected, **tolerance)
    values = torch.rand(b, n, 4, generator=torch.Generator().manual_seed(2), dtype=dtype)
    filtered = (expected @ values.reshape(b * n, 4)).view(b, n, 4)
    torch.testing.assert_close(lattice.filter(values), filtered, **tolerance)
    torch.testing.assert_close(lattice.filter(values, transpose=True), filtered, **tolerance)
    assert lattice.alpha == 1.0 and lattice.symmetric
    expected_on = torch.ones(b, n, dtype=torch.bool) if valid is None else valid
    assert torch.equal(lattice.on_lattice(), expected_on)
    most = n if valid is None else int(valid.sum(1).max())
    assert lattice.num_vertices == b * most  # the kernels hold the valid points only


@pytest.mark.parametrize("entries", [1, 7 * 2 * 37, 10**9])  # a row a step; 7 rows (a ragged last step); all rows
def test_the_kernel_built_in_blocks_of_rows_is_the_same_to_the_bit(entries, monkeypatch):
    # (the blocks bound the temporary differences: the construction's peak is then about the kernel's own size)
    features, valid = random_features(2, 5, 37, 3, torch.float32), valid_points(2, 37, 4)
    whole = exact_filter(features, valid).blur[0].blocks
    monkeypatch.setattr(exact_filter_module, "_DIFF_ENTRIES", entries)
    assert torch.equal(exact_filter(features, valid).blur[0].blocks, whole)


def test_negligible_entries_are_exactly_zero():
    # Entries below 1.5·e^20 times the smallest normal number become 0 (the slow denormal range stays out of the
    # products); larger ones keep their value, in either precision.
    gaps = torch.tensor([0.0, 11.0, 25.0])  # exp(-60.5) = 5e-27 is kept in float32; exp(-312.5) is not
    for dtype, kept in ((torch.float32, [True, True, False]), (torch.float64, [True, True, True])):
        features = gaps.to(dtype).view(1, 1, 3)
        kernel = exact_filter(features).blur[0].blocks[0, 0]
        expected = torch.exp(-0.5 * gaps.double() ** 2)
        assert [bool(k > 0) for k in kernel] == kept
        torch.testing.assert_close(kernel.double()[torch.tensor(kept)], expected[torch.tensor(kept)], rtol=1e-6, atol=0)


def layer(case, normalization, **options) -> MeanFieldCRF:
    c, ws, wb, ta, tb, tg = case
    return MeanFieldCRF(num_classes=c, spatial_weight=ws, bilateral_weight=wb, theta_alpha=ta, theta_beta=tb,
                        theta_gamma=tg, normalization=normalization, train_iterations=5, **options).double().train()


def exact_gradients(crf: MeanFieldCRF, logits, image, label, mask=None, **volume):
    """The exact dense CRF's logits and gradients w.r.t. the logits and every parameter, with crf's parameters."""
    params = {k: getattr(crf, k).detach().clone().requires_grad_(True) for k in PARAMETERS}
    z = logits.clone().requires_grad_(True)
    out = dense_crf(z, image, spatial_weight=params["spatial_weight"], bilateral_weight=params["bilateral_weight"],
                    compatibility=params["compatibility"], theta_alpha=params["log_theta_alpha"].exp(),
                    theta_beta=params["log_theta_beta"].exp(), theta_gamma=params["log_theta_gamma"].exp(),
                    iterations=crf.train_iterations, normalization=crf.normalization, valid_mask=mask, **volume)
    if mask is not None:  # the layer returns masked pixels' logits unchanged
        out = torch.where(mask[:, None], out, z)
    F.cross_entropy(out, label, ignore_index=-1).backward()
    return out.detach(), [z.grad] + [params[k].grad for k in PARAMETERS]


def layer_gradients(crf: MeanFieldCRF, logits, image, label, mask=None):
    crf.zero_grad()
    z = logits.clone().requires_grad_(True)
    out = crf(z, image, mask)
    F.cross_entropy(out, label, ignore_index=-1).backward()
    return out.detach(), [z.grad] + [getattr(crf, k).grad for k in PARAMETERS]


def assert_near_exact(ours, exact):
    # The spatial filter is truncated at 4θγ (exp(-8) = 3e-4 of the peak): everything else is exact.
    for a, b in zip(ours, exact):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3 * float(b.abs().max()))
    flat = lambda xs: torch.cat([x.reshape(-1) for x in xs[1:]])  # noqa: E731
    assert F.cosine_similarity(flat(ours), flat(exact), dim=0) > 0.9999


CASES = [(4, 3.0, 10.0, 30.0, 20.0, 2.0), (3, 1.5, 7.0, 10.0, 8.0, 1.0), (5, 4.0, 3.0, 80.0, 13.0, 3.0)]


@pytest.mark.parametrize("normalization", ["symmetric", "after"])
@pytest.mark.parametrize("case", CASES, ids=["wide", "sharp", "densecrf"])
def test_default_layer_on_small_images_is_the_exact_dense_crf(case, normalization):
    # Up to EXACT_FILTER_POINTS pixels the default layer is the exact dense CRF: its output and the gradients of
    # the loss w.r.t. the logits and every parameter, θα and θβ included, in float64.
    c = case[0]
    label, image, logits = scene(7, 24, 30, c)
    logits, label = torch.tensor(logits, dtype=torch.float64)[None], torch.tensor(label)[None]
    image = torch.tensor(image, dtype=torch.float64).permute(2, 0, 1)[None]
    crf = layer(case, normalization)
    with torch.no_grad():
        crf.compatibility.add_(torch.rand(c, c, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    ours = layer_gradients(crf, logits, image, label)
    exact = exact_gradients(crf, logits, image, label)
    assert_near_exact([ours[0], *ours[1]], [exact[0], *exact[1]])


def test_masked_batch_and_volume_are_the_exact_dense_crf():
    # A padded batch of two images (different valid sizes), and a volume with two guidance groups and anisotropic
    # spacing: also exact, masked pixels sending and receiving nothing.
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 20, 25, generator=g, dtype=torch.float64) * 2
    image = torch.rand(2, 3, 20, 25, generator=g, dtype=torch.float64) * 255
    label = torch.randint(0, 4, (2, 20, 25), generator=g)
    mask = torch.ones(2, 20, 25, dtype=torch.bool)
    mask[1, 14:], mask[1, :, 17:] = False, False
    label[~mask] = -1
    crf = layer(CASES[0], "symmetric")
    ours = layer_gradients(crf, logits, image, label, mask)
    exact = exact_gradients(crf, logits, image, label, mask)
    assert_near_exact([ours[0], *ours[1]], [exact[0], *exact[1]])

    volume = torch.rand(1, 2, 6, 7, 8, generator=g, dtype=torch.float64)
    volume[:, 1] *= 100.0  # a second modality in other units
    logits = torch.randn(1, 3, 6, 7, 8, generator=g, dtype=torch.float64)
    label = torch.randint(0, 3, (1, 6, 7, 8), generator=g)
    crf = MeanFieldCRF(num_classes=3, spatial_dims=3, guidance_groups=(1, 1), theta_alpha=3.0, theta_beta=(0.3, 30.0),
                       theta_gamma=1.2, spacing=(2.0, 1.0, 1.0)).double().train()
    ours = layer_gradients(crf, logits, volume, label)
    exact = exact_gradients(crf, logits, volume, label, guidance_groups=(1, 1), spacing=(2.0, 1.0, 1.0))
    assert_near_exact([ours[0], *ours[1]], [exact[0], *exact[1]])


def _three_paths(crf, logits, image, mask, target, monkeypatch):
    """The layer's output through the inference path (no autograd), and output and gradients through its training
    path (one fused node where it applies) and through autograd's per-step nodes."""
    with torch.no_grad():
        fast = crf.eval()(logits, image, mask)
    crf.train()

    def run():
        crf.zero_grad()
        torch.manual_seed(0)  # the same sampled pairs (of images that take the lattice) on both paths
        z = logits.clone().requires_grad_(True)
        out = crf(z, image, mask)
        (out * target).sum().backward()
        return out.detach(), [z.grad] + [p.grad.clone() for p in crf.parameters() if p.grad is not None]

    trained = run()
    with monkeypatch.context() as patch:
        patch.setattr(fused_step, "applies", lambda kernels: False)
        patch.setattr(fused_step, "learned_iterations", mean_field_steps)
        steps = run()
    return fast, trained, steps


@pytest.mark.parametrize("normalization", ["symmetric", "after"])
@pytest.mark.parametrize("learn_bandwidths", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_inference_fused_and_per_step_paths_agree(normalization, learn_bandwidths, masked, monkeypatch):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 21, 9, 11, generator=g, dtype=torch.float64) * 2  # 21: more classes than the classes-first softmax takes
    image = torch.rand(2, 3, 9, 11, generator=g, dtype=torch.float64) * 255
    mask = torch.rand(2, 9, 11, generator=g) > 0.25 if masked else None
    target = torch.randn(2, 21, 9, 11, generator=g, dtype=torch.float64)
    crf = MeanFieldCRF(num_classes=21, theta_alpha=6.0, normalization=normalization, train_iterations=4,
                       eval_iterations=4, learn_bandwidths=learn_bandwidths).double()
    with torch.no_grad():  # a learned-looking compatibility (not Potts), and Potts in the spatial term
        crf.compatibility.add_(torch.rand(21, 21, generator=g, dtype=torch.float64))
    assert isinstance(crf.kernels(image, mask).lattice.blur[0], DenseBlocks)
    fast, (trained, trained_grads), (steps, step_grads) = _three_paths(crf, logits, image, mask, target, monkeypatch)
    torch.testing.assert_close(fast, steps, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(trained, steps, rtol=1e-10, atol=1e-10)
    assert len(trained_grads) == len(step_grads) == 1 + (6 if learn_bandwidths else 3)
    for a, b in zip(trained_grads, step_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_gradcheck_every_parameter_bandwidths_included():
    # On the exact filter the forward pass is smooth in the bandwidths (no lattice, no change of simplex), so
    # finite differences check θα's and θβ's gradient too.
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(1, 3, 4, 5, generator=g, dtype=torch.float64) * 2
    image = torch.rand(1, 3, 4, 5, generator=g, dtype=torch.float64) * 255
    crf = MeanFieldCRF(num_classes=3, theta_alpha=4.0, theta_beta=60.0, theta_gamma=1.5, train_iterations=2)
    crf = crf.double().train()
    params = [getattr(crf, k).detach().clone().requires_grad_(True) for k in PARAMETERS]

    def run(z, *values):
        return torch.func.functional_call(crf, dict(zip(PARAMETERS, values)), (z, image))

    assert torch.autograd.gradcheck(run, (logits.requires_grad_(True), *params), atol=1e-6)


def test_auto_takes_the_exact_filter_up_to_its_size_and_the_lattice_beyond():
    g = torch.Generator().manual_seed(7)
    crf = MeanFieldCRF(num_classes=3)
    assert EXACT_FILTER_POINTS == 32 * 32
    for (h, w), exact in (((32, 32), True), ((32, 33), False)):
        image = torch.rand(1, 3, h, w, generator=g) * 255
        assert isinstance(crf.kernels(image).lattice.blur[0], DenseBlocks) == exact
        assert isinstance(MeanFieldCRF(num_classes=3, bilateral_filter="exact").kernels(image).lattice.blur[0],
                          DenseBlocks)
        assert not isinstance(MeanFieldCRF(num_classes=3, bilateral_filter="lattice").kernels(image).lattice.blur[0],
                              DenseBlocks)
    # The valid pixels count, not the padding: a padded image is filtered as it is alone
    image = torch.rand(2, 3, 40, 40, generator=g) * 255
    logits = torch.randn(2, 3, 40, 40, generator=g)
    mask = torch.zeros(2, 40, 40, dtype=torch.bool)
    mask[0, :30, :30], mask[1, :20, :35] = True, True
    assert isinstance(crf.kernels(image, mask).lattice.blur[0], DenseBlocks)
    with torch.no_grad():
        padded = crf.eval()(logits, image, mask)
        alone = crf(logits[:1, :, :30, :30], image[:1, :, :30, :30])
    torch.testing.assert_close(padded[:1, :, :30, :30], alone, rtol=1e-5, atol=1e-5)
    # Each image by its own size: one with more valid pixels beside it takes the lattice, the small one stays exact
    mask[1] = True
    lattice = crf.kernels(image, mask).lattice
    assert isinstance(lattice.blur[0], SplitBlur) and isinstance(lattice.blur[0].second, DenseBlocks)
    assert all(blur.second is None for blur in lattice.blur[1:])


def test_exact_images_rule():
    n = EXACT_FILTER_POINTS + 1
    valid = torch.zeros(4, n, dtype=torch.bool)
    assert exact_images("auto", 4, n, None).tolist() == [False] * 4
    assert exact_images("auto", 4, EXACT_FILTER_POINTS, None).tolist() == [True] * 4
    assert exact_images("auto", 4, n, valid).tolist() == [False] * 4  # none valid: every point on the lattice
    valid[0, :EXACT_FILTER_POINTS], valid[1] = True, True
    valid[2, :3] = True  # image 3 has no valid point: it goes with the lattice's images
    assert exact_images("auto", 4, n, valid).tolist() == [True, False, True, False]
    valid[1, -1] = False  # every image with points small: all exact, the empty one too
    assert exact_images("auto", 4, n, valid).tolist() == [True] * 4
    assert exact_images("exact", 4, 10**6).tolist() == [True] * 4
    assert exact_images("lattice", 4, n, valid).tolist() == [False] * 4
    for bad in (valid[:, :-1], valid.float(), valid.numpy()):
        with pytest.raises(ValueError, match=f"valid must be a bool Tensor of B·N = 4·{n} values"):
            exact_images("auto", 4, n, bad)
    with pytest.raises(ValueError, match="bilateral_filter must be"):
        exact_images("dense", 4, n)


@pytest.mark.parametrize("bilateral_filter", ["auto", "lattice"])
@pytest.mark.parametrize("learn_bandwidths", [False, True])
def test_a_batch_of_small_and_large_images_filters_each_as_alone(learn_bandwidths, bilateral_filter):
    # 30×30 and 20×35 images (exact under "auto") padded beside a whole 40×40 one (lattice) and an empty canvas:
    # every image's output and the gradients of every parameter are those of each image alone (all pairs for the
    # small images, the sampled pairs of the large one drawn from the same seed), in float64; before, the small
    # images took the lattice and sampled pairs in such a batch.
    g = torch.Generator().manual_seed(12)
    b, c = 4, 4
    logits = torch.randn(b, c, 40, 40, generator=g, dtype=torch.float64) * 2
    image = torch.rand(b, 3, 40, 40, generator=g, dtype=torch.float64) * 255
    mask = torch.zeros(b, 40, 40, dtype=torch.bool)
    mask[0, :30, :30], mask[1], mask[3, 5:25, :35] = True, True, True
    label = torch.randint(0, c, (b, 40, 40), generator=g).masked_fill(~mask, -1)
    crf = MeanFieldCRF(num_classes=c, theta_alpha=20.0, theta_beta=15.0, theta_gamma=2.0, train_iterations=3,
                       eval_iterations=3, learn_bandwidths=learn_bandwidths, bilateral_filter=bilateral_filter).double()
    with torch.no_grad():
        crf.compatibility.add_(torch.rand(c, c, generator=g, dtype=torch.float64))
    assert isinstance(crf.kernels(image, mask).lattice.blur[0], SplitBlur) == (bilateral_filter == "auto")

    def run(rows):
        crf.zero_grad()
        torch.manual_seed(0)
        z = logits[rows].clone().requires_grad_(True)
        out = crf.train()(z, image[rows], mask[rows])
        F.cross_entropy(out, label[rows], ignore_index=-1, reduction="sum").backward()
        with torch.no_grad():
            fast = crf.eval()(logits[rows], image[rows], mask[rows])
        grads = [z.grad] + [p.grad.clone() for p in crf.parameters() if p.grad is not None]
        return out.detach(), fast, grads

    out, fast, grads = run(slice(None))
    alone = [run(slice(i, i + 1)) for i in range(b)]
    for i, (one_out, one_fast, one_grads) in enumerate(alone):
        torch.testing.assert_close(out[i : i + 1], one_out, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(fast[i : i + 1], one_fast, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(grads[0][i : i + 1], one_grads[0], rtol=1e-9, atol=1e-11)
    assert len(grads) == 1 + (6 if learn_bandwidths else 3)
    for k in range(1, len(grads)):
        torch.testing.assert_close(grads[k], sum(one[2][k] for one in alone), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("normalization", ["symmetric", "after"])
def test_a_mixed_batch_takes_the_same_values_on_every_path(normalization, monkeypatch):
    # The lattice of both filters through the inference loop, the fused training node and autograd's per-step
    # nodes (learned bandwidths, a learned compatibility): the same output and gradients.
    g = torch.Generator().manual_seed(13)
    logits = torch.randn(2, 21, 36, 36, generator=g, dtype=torch.float64) * 2  # 21: more classes than the classes-first softmax takes
    image = torch.rand(2, 3, 36, 36, generator=g, dtype=torch.float64) * 255
    mask = torch.rand(2, 36, 36, generator=g) > 0.1
    mask[1, 20:] = False  # about 1170 and 590 valid pixels
    target = torch.randn(2, 21, 36, 36, generator=g, dtype=torch.float64)
    crf = MeanFieldCRF(num_classes=21, theta_alpha=6.0, normalization=normalization, train_iterations=3,
                       eval_iterations=3).double()
    with torch.no_grad():
        crf.compatibility.add_(torch.rand(21, 21, generator=g, dtype=torch.float64))
    assert exact_images("auto", 2, 36 * 36, mask).tolist() == [False, True]
    fast, (trained, trained_grads), (steps, step_grads) = _three_paths(crf, logits, image, mask, target, monkeypatch)
    torch.testing.assert_close(fast, steps, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(trained, steps, rtol=1e-10, atol=1e-10)
    assert len(trained_grads) == len(step_grads) == 7
    for a, b in zip(trained_grads, step_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_the_lattice_of_both_filters_is_the_block_diagonal_of_each():
    # Its explicit matrix: the lattice's kernel on the large image's points, the Gaussian on the small one's.
    b, d, n = 2, 5, 1100
    features = random_features(b, d, n, 14)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, 300:] = False
    exact = exact_images("auto", b, n, valid)
    assert exact.tolist() == [False, True]
    both = bilateral_lattice(features, valid, exact)
    lattice_part = bilateral_lattice(features[:1], None, exact[:1])
    values = torch.rand(b, n, 3, dtype=torch.float64)
    v = valid[1].to(torch.float64)
    gaussian = (dense_gaussian(features[1].T) * v[:, None] * v[None, :]) @ values[1]
    for transpose in (False, True):  # (Kᵀ: the lattice's blurs in reverse order)
        expected = torch.cat([lattice_part.filter(values[:1], transpose=transpose), gaussian[None]])
        torch.testing.assert_close(both.filter(values, transpose=transpose), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(both.slice.to_dense(), both.alpha * both.splat.to_dense().T)
    explicit = both.splat.to_dense()
    for blur in both.blur:
        explicit = blur.to_dense() @ explicit
    explicit = both.slice.to_dense() @ explicit
    torch.testing.assert_close(explicit @ values.reshape(b * n, 3), both.filter(values).reshape(b * n, 3))
    assert torch.equal(both.on_lattice(), valid)
    with pytest.raises(ValueError, match=f"values must be a Tensor\\[{both.num_vertices}, C\\]"):
        both.blur[1] @ torch.rand(both.num_vertices - 1, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="exact must be a bool Tensor\\[2\\]"):
        bilateral_lattice(features, valid, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="valid points in every image filtered exactly"):
        bilateral_lattice(features, valid & torch.tensor([[True], [False]]), exact)  # the exact image has none


def test_densecrf_takes_the_filter_and_names_it():
    rng = np.random.default_rng(8)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    p = rng.dirichlet(np.ones(3), (20, 30)).transpose(2, 0, 1).astype(np.float32)
    exact, lattice = DenseCRF(iterations=5)(rgb, p), DenseCRF(iterations=5, bilateral_filter="lattice")(rgb, p)
    with torch.no_grad():
        layer_exact = torch.softmax(MeanFieldCRF(num_classes=3, eval_iterations=5, bilateral_filter="exact").eval()(
            torch.from_numpy(p).clamp_min(1e-8).log()[None], torch.from_numpy(rgb).permute(2, 0, 1)[None].float()), 1)
    np.testing.assert_allclose(exact, layer_exact[0].numpy(), atol=1e-6)
    assert np.abs(exact - lattice).max() > 1e-3  # the two filters differ on an image this small
    assert "bilateral_filter='lattice'" in repr(DenseCRF(bilateral_filter="lattice"))
    assert "bilateral_filter" not in repr(DenseCRF())
    assert "bilateral_filter='exact'" in repr(MeanFieldCRF(num_classes=2, bilateral_filter="exact"))
    assert "bilateral_filter" not in repr(MeanFieldCRF(num_classes=2))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: MeanFieldCRF(num_classes=3, bilateral_filter="dense"), "bilateral_filter must be 'auto', 'lattice'"),
        (lambda: DenseCRF(bilateral_filter=None), "bilateral_filter must be 'auto', 'lattice' or 'exact', got None"),
        (lambda: build_kernels(torch.rand(1, 3, 4, 4), theta_alpha=torch.tensor(3.0), theta_beta=torch.tensor(3.0),
                               theta_gamma=torch.tensor(3.0), bilateral_filter="Exact"), "got 'Exact'"),
        (lambda: exact_filter(torch.full((1, 5, 6), math.nan)), "features contain NaN"),
        (lambda: exact_filter(torch.rand(1, 5, 6), torch.ones(1, 5, dtype=torch.bool)), "valid must be a bool Tensor"),
        (lambda: exact_filter(torch.rand(1, 5, 6)).blur[0] @ torch.rand(5, 2), r"values must be a Tensor\[6, C\]"),
        (lambda: DenseBlocks(torch.rand(1, 3, 3)) @ torch.rand(3, 2).double(), "of torch.float32"),
        # asked for at a size it cannot hold: an error before any allocation (2 × 40 000² entries)
        (lambda: exact_filter(torch.rand(2, 1, 40_000)), r"2 × 40000² = 3.2e\+09 kernel entries \(11.9 GiB\), more"),
        (lambda: MeanFieldCRF(num_classes=2, bilateral_filter="exact")(torch.zeros(1, 2, 200, 250),
                                                                        torch.zeros(1, 3, 200, 250)),
         "use bilateral_filter='lattice'"),
    ],
)
def test_bad_input_is_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_inference_does_not_depend_on_the_thread_count():
    # The kernels' products run with the caller's thread count, never the load's (crf/threads.py).
    g = torch.Generator().manual_seed(9)
    logits, image = torch.randn(2, 21, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g) * 255
    crf = MeanFieldCRF(num_classes=21, eval_iterations=3).eval()
    outputs = at_inference_threads(lambda: crf(logits, image))
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("size", [(24, 30), (36, 36)], ids=["small", "mixed"])
def test_cuda_matches_cpu(size):
    # The exact filter on CUDA (inference and a training step with every parameter learned, masked batch); in
    # "mixed", the second image alone is small enough for it, the first takes the lattice.
    g = torch.Generator().manual_seed(10)
    logits, image = torch.randn(2, 5, *size, generator=g), torch.rand(2, 3, *size, generator=g) * 255
    mask = torch.rand(2, *size, generator=g) > 0.2
    mask[1, size[0] // 2 :] = False
    mixed = size[0] * size[1] > EXACT_FILTER_POINTS
    if mixed:
        mask[0] = True
    assert exact_images("auto", 2, size[0] * size[1], mask).tolist() == [not mixed, True]
    # (pairs sampled on the GPU are another sample: the lattice image's θα and θβ gradients are compared on the CPU)
    compared = [k for k in PARAMETERS if not (mixed and k in ("log_theta_alpha", "log_theta_beta"))]
    results = []
    for device in ("cpu", "cuda"):
        crf = MeanFieldCRF(num_classes=5).to(device)
        with torch.no_grad():
            fast = crf.eval()(logits.to(device), image.to(device), mask.to(device))
        z = logits.to(device).requires_grad_(True)
        crf.train()(z, image.to(device), mask.to(device)).square().sum().backward()
        results.append([fast, z.grad] + [getattr(crf, k).grad for k in compared])
    for cpu, gpu in zip(*results):
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-3 * float(cpu.abs().max()))


@pytest.mark.parametrize("normalization", ["symmetric", "after"])
def test_padded_small_images_get_the_exact_gradients(normalization):
    # Small images padded into a larger canvas (1600 pixels, 900 and 700 valid): the exact filter, and the
    # bandwidth gradient over all pairs of the valid pixels (not sampled): the summed loss's gradients of every
    # parameter are the sums of each image's alone.
    g = torch.Generator().manual_seed(11)
    sizes = [(30, 30), (20, 35)]
    alone = [(torch.randn(1, 4, h, w, generator=g, dtype=torch.float64) * 2,
              torch.rand(1, 3, h, w, generator=g, dtype=torch.float64) * 255,
              torch.randint(0, 4, (1, h, w), generator=g)) for h, w in sizes]
    crf = MeanFieldCRF(num_classes=4, theta_alpha=20.0, theta_beta=15.0, theta_gamma=2.0,
                       normalization=normalization).double().train()

    def gradients(logits, image, label, mask=None):
        crf.zero_grad()
        F.cross_entropy(crf(logits, image, mask), label, ignore_index=-1, reduction="sum").backward()
        return [getattr(crf, k).grad.clone() for k in PARAMETERS]

    expected = [sum(parts) for parts in zip(*(gradients(*a) for a in alone))]
    logits = torch.zeros(2, 4, 40, 40, dtype=torch.float64)
    image = torch.zeros(2, 3, 40, 40, dtype=torch.float64)
    label = torch.full((2, 40, 40), -1)
    mask = torch.zeros(2, 40, 40, dtype=torch.bool)
    for i, ((h, w), (lg, im, lb)) in enumerate(zip(sizes, alone)):
        logits[i, :, :h, :w], image[i, :, :h, :w], label[i, :h, :w], mask[i, :h, :w] = lg[0], im[0], lb[0], True
    assert isinstance(crf.kernels(image, mask).lattice.blur[0], DenseBlocks)
    torch.manual_seed(0)
    first = gradients(logits, image, label, mask)
    torch.manual_seed(1)  # a sampled gradient would change with the seed
    second = gradients(logits, image, label, mask)
    for a, b, c in zip(first, second, expected):
        torch.testing.assert_close(a, c, rtol=1e-8, atol=1e-10)
        assert torch.equal(a, b)


def test_huge_guidance_is_refused_by_the_lattice_and_taken_by_the_exact_filter():
    # Guidance values near float32's largest: the lattice's integer keys cannot hold them (a clear error, where
    # its result used to be silently wrong); the exact filter takes them, gradients finite (far pairs weigh 0).
    g = torch.Generator().manual_seed(12)
    guidance = (torch.rand(1, 1, 4, 5, 6, generator=g) - 0.5) * 3e38
    logits = torch.randn(1, 3, 4, 5, 6, generator=g)
    options = dict(num_classes=3, spatial_dims=3, guidance_groups=(1,), theta_beta=1.0)
    with pytest.raises(ValueError, match="features reach .* beyond the .* that the lattice's integer vertex keys"):
        MeanFieldCRF(bilateral_filter="lattice", **options)(logits, guidance)
    crf = MeanFieldCRF(**options).train()
    z = logits.clone().requires_grad_(True)
    out = crf(z, guidance)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(z.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in crf.parameters())
    with torch.no_grad():  # every voxel is its own colour: the bilateral kernel is the identity
        separate = MeanFieldCRF(**options).eval()(logits, guidance)
        alone = MeanFieldCRF(**options).eval()(logits, torch.arange(120.0).view(1, 1, 4, 5, 6) * 1e6)
    torch.testing.assert_close(separate, alone)


def test_dense_blocks_take_non_contiguous_values():
    blocks = torch.rand(2, 3, 3, dtype=torch.float64)
    values = torch.rand(4, 6, dtype=torch.float64).T  # [6, 4], not contiguous
    expected = torch.block_diag(*blocks) @ values
    torch.testing.assert_close(DenseBlocks(blocks) @ values, expected, rtol=1e-12, atol=1e-12)


def test_packed_points_list_each_images_valid_points_first():
    from crfrnn_deeplab.crf.bandwidth_gradient import packed_points

    valid = torch.tensor([[False, True, True, False, True], [True, False, False, False, False]])
    points, slots = packed_points(valid)
    assert points.tolist() == [[1, 2, 4], [0, 0, 0]] and slots.tolist() == [[True] * 3, [True, False, False]]
    for bad in (valid.int(), valid[0]):
        with pytest.raises(ValueError, match=r"valid must be a bool Tensor\[B, N\]"):
            packed_points(bad)
