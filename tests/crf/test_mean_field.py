"""MeanFieldCRF: densecrf equivalence, the exact dense reference, gradients, masks, numerics, bad input."""

import math

import numpy as np
import pytest
import torch

from crfrnn_deeplab.crf.reference import dense_crf, dense_gaussian, dense_mean_field
from crf_scenes import PARAMS, at_inference_threads, densecrf_q, scene
from crfrnn_deeplab.crf import MeanFieldCRF
from crfrnn_deeplab.crf import fast_inference
from crfrnn_deeplab.crf.fast_inference import class_softmax
from crfrnn_deeplab.crf.kernels import build_kernels
from crfrnn_deeplab.crf.mean_field import mean_field_step, mean_field_steps
from crfrnn_deeplab.crf.sparse_rows import SparseRows
from crfrnn_deeplab.crf.spatial import gaussian_1d, spatial_gaussian

dcrf = pytest.importorskip("pydensecrf.densecrf")


@pytest.mark.parametrize("iterations", [1, 5, 10])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_densecrf_inference(iterations, seed):
    _, image, logits = scene(seed, 90, 120, 5)
    crf = MeanFieldCRF(num_classes=5, eval_iterations=iterations, **PARAMS).eval()
    with torch.no_grad():
        ours = crf(torch.tensor(logits)[None], torch.tensor(image).permute(2, 0, 1)[None].float())
    q = torch.softmax(ours, 1)[0].numpy()
    theirs = densecrf_q(logits, image, iterations, **PARAMS)
    assert np.abs(q - theirs).mean() <= 0.01
    assert (q.argmax(0) == theirs.argmax(0)).mean() >= 0.99
    assert (q.argmax(0) != logits.argmax(0)).mean() > 0.01  # the CRF did change the labelling


def params_of(crf: MeanFieldCRF) -> dict:
    return dict(
        spatial_weight=crf.spatial_weight,
        bilateral_weight=crf.bilateral_weight,
        compatibility=crf.compatibility,
        theta_alpha=crf.log_theta_alpha.exp(),
        theta_beta=crf.log_theta_beta.exp(),
        theta_gamma=crf.log_theta_gamma.exp(),
    )


def small_inputs(seed=0, b=1, c=3, h=7, w=8):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, h, w, generator=g, dtype=torch.float64) * 2
    image = torch.rand(b, 3, h, w, generator=g, dtype=torch.float64) * 255
    return logits, image


@pytest.mark.parametrize("normalization", ["symmetric", "after"])
def test_spatial_only_matches_exact_dense_crf(normalization):
    # Without the bilateral kernel nothing is approximated (the spatial filter is exact up to exp(-8)).
    logits, image = small_inputs(c=4, h=9, w=11)
    crf = MeanFieldCRF(num_classes=4, bilateral_weight=0.0, theta_gamma=2.0, normalization=normalization).double()
    with torch.no_grad():
        crf.spatial_weight.add_(torch.rand(4, 4, dtype=torch.float64))
        ours = crf.eval()(logits, image)
        ref = dense_crf(logits, image, iterations=10, normalization=normalization, **params_of(crf))
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-3)


@pytest.mark.parametrize("normalization", ["symmetric", "after"])
def test_full_layer_close_to_exact_dense_crf(normalization):
    _, image, logits = scene(3, 24, 30, 3)
    logits = torch.tensor(logits, dtype=torch.float64)[None]
    image = torch.tensor(image, dtype=torch.float64).permute(2, 0, 1)[None]
    crf = MeanFieldCRF(bilateral_filter="lattice", num_classes=3, theta_alpha=10.0, theta_beta=20.0, normalization=normalization).double().eval()
    with torch.no_grad():
        q = torch.softmax(crf(logits, image), 1)
        ref = torch.softmax(dense_crf(logits, image, iterations=10, normalization=normalization, **params_of(crf)), 1)
    assert (q - ref).abs().mean() < 0.02
    assert (q.argmax(1) == ref.argmax(1)).double().mean() > 0.97


@pytest.mark.parametrize("learn_bandwidths", [True, False])
@pytest.mark.parametrize("normalization", ["symmetric", "after"])
# the inference path's Potts-form and general mixes, for either kernel
@pytest.mark.parametrize("compatibility", ["potts", "learned", "spatial learned", "bilateral learned"])
@pytest.mark.parametrize("num_classes, masked", [(4, True), (21, True), (21, False)])  # 21: PyTorch's softmax, 4: the classes-first tiles
def test_autograd_path_equals_inference_path(normalization, learn_bandwidths, compatibility, num_classes, masked):
    logits, image = small_inputs(b=2, c=num_classes, h=12, w=10)
    mask = torch.rand(2, 12, 10, generator=torch.Generator().manual_seed(3)) > 0.2 if masked else None
    crf = MeanFieldCRF(bilateral_filter="lattice", num_classes=num_classes, theta_alpha=6.0, normalization=normalization,
                       learn_bandwidths=learn_bandwidths)
    crf = crf.double().eval()
    with torch.no_grad():
        noise = torch.rand(num_classes, num_classes, dtype=torch.float64)
        if compatibility == "learned":
            crf.compatibility.add_(noise)
        elif compatibility == "spatial learned":
            crf.spatial_weight.add_(noise)
        elif compatibility == "bilateral learned":
            crf.bilateral_weight.add_(noise)
        fast = crf(logits, image, mask)
    slow = crf(logits.clone().requires_grad_(True), image, mask)
    torch.testing.assert_close(fast, slow.detach())
    if masked:
        torch.testing.assert_close(fast.permute(0, 2, 3, 1)[~mask], logits.permute(0, 2, 3, 1)[~mask], rtol=0, atol=0)


@pytest.mark.parametrize("uniform", [True, False])  # every row d + 1 entries (a lattice's), or any number
@pytest.mark.parametrize("with_spatial", [True, False])
def test_update_gather_is_the_mean_field_update(uniform, with_spatial):
    g = torch.Generator().manual_seed(int(uniform) + 2 * int(with_spatial))
    p, m, c = 7, 5, 3
    lengths = torch.full((p,), 3) if uniform else torch.randint(0, 4, (p,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    columns = torch.randint(0, m, (int(offsets[-1]),), generator=g)
    weights = torch.rand(int(offsets[-1]), generator=g, dtype=torch.float64)
    slice_ = SparseRows(columns, offsets, weights, m, 3 if uniform else None)
    dense = torch.zeros(p, m, dtype=torch.float64).index_put_((slice_.rows(), columns), weights, accumulate=True)
    z0, message, lattice = (torch.randn(n, c, generator=g, dtype=torch.float64) for n in (p, p, m))
    after = torch.rand(p, generator=g, dtype=torch.float64)
    spatial = torch.rand(p, generator=g, dtype=torch.float64) if with_spatial else None
    expected = z0 - after[:, None] * (dense @ lattice)
    if with_spatial:
        expected += spatial[:, None] * message
    table = torch.cat([z0, message, lattice] if with_spatial else [z0, lattice])
    torch.testing.assert_close(fast_inference.update_gather(slice_, after, spatial) @ table, expected)


def test_update_gather_names_bad_input():
    slice_ = SparseRows.selection(torch.arange(4), None, 4, torch.float32)
    with pytest.raises(TypeError, match="SparseRows"):
        fast_inference.update_gather(torch.eye(4), torch.ones(4))
    for bad in (torch.ones(3), None):
        with pytest.raises(ValueError, match=r"after must be a Tensor\[4\]"):
            fast_inference.update_gather(slice_, bad)
    with pytest.raises(ValueError, match=r"spatial must be a Tensor\[4\]"):
        fast_inference.update_gather(slice_, torch.ones(4), torch.ones(4, 1))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("compatibility", ["potts", "learned"])
@pytest.mark.parametrize("scale, weight", [(1.0, 3.0), (1e4, 3.0), (1.0, 40.0), (1e4, 40.0)])
def test_inference_softmax_on_extreme_logits_and_weights(monkeypatch, scale, weight, compatibility, masked):
    # The inference loop's softmax is exp(z - top) with a bound `top` computed once; with kernel weights that let
    # the messages move a logit by more than float32's exp can take (40 + 40 here) it takes class_softmax. Either
    # way it equals the autograd path, logits of 1e4 included.
    calls = []
    monkeypatch.setattr(fast_inference, "class_softmax", lambda z: calls.append(1) or class_softmax(z))
    logits, image = small_inputs(b=2, c=5, h=12, w=10)
    logits, image = (logits * scale).float(), image.float()
    mask = torch.rand(2, 12, 10, generator=torch.Generator().manual_seed(1)) > 0.2 if masked else None
    crf = MeanFieldCRF(num_classes=5, spatial_weight=weight, bilateral_weight=weight, theta_alpha=6.0).eval()
    if compatibility == "learned":
        with torch.no_grad():
            crf.compatibility.add_(torch.rand(5, 5, generator=torch.Generator().manual_seed(2)))
    with torch.no_grad():
        fast = crf(logits, image, mask)
    assert bool(calls) == (weight > 20)
    slow = crf(logits.clone().requires_grad_(True), image, mask)
    assert torch.isfinite(fast).all()
    # float32: exp(z - top) rounds its argument at the magnitude of z - top (up to the messages' width), where
    # softmax's is z - max: ~1e-5 on logits of ~10 after 5 iterations (1e-6 when class_softmax runs)
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-5, atol=5e-5)
    if masked:
        torch.testing.assert_close(fast.permute(0, 2, 3, 1)[~mask], logits.permute(0, 2, 3, 1)[~mask], rtol=0, atol=0)


@pytest.mark.parametrize("compatibility", ["potts", "learned"])
@pytest.mark.parametrize("weight", [1e3, 1e6])
def test_inference_keeps_the_unaries_digits_under_large_kernel_weights(weight, compatibility):
    # A Potts mix's constant part (-α·reach, ~ the weights) is added to z_0 once; the first softmax must still read
    # z_0 itself: softmax(z_0 + shift) in float32 rounds z_0 to |shift|·2^-24 (0.06 at weights of 1e6), an error
    # the weights then multiply (it was 2 % of the output at 1e6). One iteration: nothing chaotic, only rounding.
    logits, image = small_inputs(b=2, c=4, h=12, w=13)
    crf = MeanFieldCRF(num_classes=4, spatial_weight=weight, bilateral_weight=weight, eval_iterations=1).eval()
    if compatibility == "learned":
        with torch.no_grad():
            crf.compatibility.add_(torch.rand(4, 4, generator=torch.Generator().manual_seed(2)))
    with torch.no_grad():
        fast = crf(logits.float(), image.float())
        exact = crf.double()(logits.double(), image.double())
    scale = float(exact.abs().max())
    torch.testing.assert_close(fast.double(), exact, rtol=0, atol=1e-6 * scale)
    assert torch.equal(fast.argmax(1), exact.argmax(1))


@pytest.mark.parametrize("learn_bandwidths", [True, False])  # False: the folded, lattice-mixed path
def test_gradcheck_logits_weights_compatibility(learn_bandwidths):
    logits, image = small_inputs(c=3, h=4, w=5)
    crf = MeanFieldCRF(
        bilateral_filter="lattice", num_classes=3, theta_alpha=4.0, theta_beta=40.0, train_iterations=2, learn_bandwidths=learn_bandwidths
    )
    crf = crf.double().train()
    weights = [p.detach().clone() for p in (crf.spatial_weight, crf.bilateral_weight, crf.compatibility)]
    inputs = [logits.requires_grad_(True)] + [w.requires_grad_(True) for w in weights]

    def layer(z, ws, wb, mu):
        return torch.func.functional_call(
            crf, {"spatial_weight": ws, "bilateral_weight": wb, "compatibility": mu}, (z, image)
        )

    assert torch.autograd.gradcheck(layer, tuple(inputs), atol=1e-6)


def test_bandwidth_gradient_matches_finite_differences_of_exact_crf():
    # The bilateral part is only as good as the lattice's approximation of the kernel: at these bandwidths
    # (colour bandwidth wide against the noise, as 80/13 is on a full-size photo) cos is 0.9999; with sharp
    # kernels on a 16×18 image (θα=6, θβ=25) the lattice's error dominates and it drops to ~0.7.
    _, image, logits = scene(5, 16, 18, 3)
    logits = torch.tensor(logits, dtype=torch.float64)[None]
    image = torch.tensor(image, dtype=torch.float64).permute(2, 0, 1)[None]
    target = torch.randn(1, 3, 16, 18, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    crf = MeanFieldCRF(bilateral_filter="lattice", num_classes=3, theta_alpha=10.0, theta_beta=40.0, theta_gamma=2.0, train_iterations=3)
    crf = crf.double().train()
    (crf(logits, image) * target).sum().backward()
    ours = torch.stack([crf.log_theta_alpha.grad, crf.log_theta_beta.grad, crf.log_theta_gamma.grad])

    p = {k: v.detach() for k, v in params_of(crf).items()}

    def exact(log_thetas):
        q = dict(p, theta_alpha=log_thetas[0].exp(), theta_beta=log_thetas[1].exp(), theta_gamma=log_thetas[2].exp())
        return float((dense_crf(logits, image, iterations=3, **q) * target).sum())

    base = torch.tensor([math.log(10.0), math.log(40.0), math.log(2.0)], dtype=torch.float64)
    eps = 1e-4
    steps = torch.eye(3, dtype=torch.float64) * eps
    fd = torch.tensor([(exact(base + e) - exact(base - e)) / (2 * eps) for e in steps], dtype=torch.float64)
    assert torch.nn.functional.cosine_similarity(ours, fd, dim=0) >= 0.99, (ours, fd)
    assert torch.nn.functional.cosine_similarity(ours[:2], fd[:2], dim=0) >= 0.99, (ours, fd)  # bilateral alone
    torch.testing.assert_close(ours[2], fd[2], rtol=1e-3, atol=1e-3)  # the spatial kernel is exact


def test_every_parameter_gets_a_gradient():
    logits, image = small_inputs(c=3, h=6, w=7)
    crf = MeanFieldCRF(num_classes=3).double().train()
    crf(logits, image).square().sum().backward()
    for name, p in crf.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_learning_switches_freeze_parameters():
    crf = MeanFieldCRF(num_classes=3, learn_kernel_weights=False, learn_compatibility=False, learn_bandwidths=False)
    assert not any(p.requires_grad for p in crf.parameters())
    crf = MeanFieldCRF(num_classes=3, learn_bandwidths=False)
    learned = {n for n, p in crf.named_parameters() if p.requires_grad}
    assert learned == {"spatial_weight", "bilateral_weight", "compatibility"}


def test_batch_equals_single_images():
    logits, image = small_inputs(b=2, c=3, h=10, w=9)
    crf = MeanFieldCRF(bilateral_filter="lattice", num_classes=3, theta_alpha=5.0).double().eval()
    with torch.no_grad():
        both = crf(logits, image)
        for i in range(2):
            torch.testing.assert_close(both[i : i + 1], crf(logits[i : i + 1], image[i : i + 1]))


def test_padding_with_mask_equals_unpadded_image():
    logits, image = small_inputs(c=3, h=10, w=9)
    crf = MeanFieldCRF(bilateral_filter="lattice", num_classes=3, theta_alpha=5.0).double().eval()
    pad_logits = torch.nn.functional.pad(logits, (0, 4, 0, 3), value=7.0)
    pad_image = torch.nn.functional.pad(image, (0, 4, 0, 3), value=128.0)
    mask = torch.zeros(1, 13, 13, dtype=torch.bool)
    mask[:, :10, :9] = True
    with torch.no_grad():
        alone = crf(logits, image)
        padded = crf(pad_logits, pad_image, mask)
    torch.testing.assert_close(padded[..., :10, :9], alone)
    torch.testing.assert_close(padded[..., 10:, :], pad_logits[..., 10:, :])  # masked: output = input
    torch.testing.assert_close(padded[..., :, 9:], pad_logits[..., :, 9:])


@pytest.mark.parametrize("normalization", ["symmetric", "after"])
def test_padding_is_exact_for_realistic_bandwidths_in_float32(normalization):
    # The padded pixels' colours would add lattice vertices that carry the blur between valid pixels: they are
    # kept off the lattice, so the valid region is filtered as if the padding were not there.
    _, image, logits = scene(4, 33, 29, 4)
    crf = MeanFieldCRF(bilateral_filter="lattice", num_classes=4, eval_iterations=3, spatial_weight=0.0, normalization=normalization,
                       theta_alpha=40.0, theta_beta=13.0).eval()
    logits, image = torch.tensor(logits)[None], torch.tensor(image).permute(2, 0, 1)[None].float()
    pad_image = torch.nn.functional.pad(image, (0, 21, 0, 7), value=0.0)
    pad_image[..., 33:, :] = torch.rand(3, 7, 50) * 255  # padding of any colour
    pad_logits = torch.nn.functional.pad(logits, (0, 21, 0, 7))
    mask = torch.zeros(1, 40, 50, dtype=torch.bool)
    mask[:, :33, :29] = True
    with torch.no_grad():
        alone, padded = crf(logits, image), crf(pad_logits, pad_image, mask)
    torch.testing.assert_close(padded[..., :33, :29], alone, rtol=1e-5, atol=1e-5)


def test_iterations_follow_mode():
    logits, image = small_inputs(c=3)
    crf = MeanFieldCRF(num_classes=3, train_iterations=0, eval_iterations=2).double()
    with torch.no_grad():
        torch.testing.assert_close(crf.train()(logits, image), logits)
        assert not torch.allclose(crf.eval()(logits, image), logits)


@pytest.mark.parametrize(
    "case",
    ["huge_logits", "constant_image", "one_pixel", "one_class", "tiny_bandwidths", "huge_bandwidths"],
)
def test_numerics_stay_finite(case):
    logits, image = small_inputs(c=3, h=8, w=9)
    logits, image = logits.float(), image.float()
    kw = {}
    if case == "huge_logits":
        logits = torch.sign(logits) * 1e4
    elif case == "constant_image":
        image = torch.full_like(image, 77.0)
    elif case == "one_pixel":
        logits, image = logits[..., :1, :1], image[..., :1, :1]
    elif case == "one_class":
        logits = logits[:, :1]
    elif case == "tiny_bandwidths":
        kw = dict(theta_alpha=1e-3, theta_beta=1e-3, theta_gamma=1e-3)
    elif case == "huge_bandwidths":
        kw = dict(theta_alpha=1e5, theta_beta=1e5, theta_gamma=1e4)
    crf = MeanFieldCRF(num_classes=logits.shape[1], **kw).train()
    z = logits.clone().requires_grad_(True)
    out = crf(z, image)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in crf.parameters())
    assert torch.isfinite(z.grad).all()


def test_float32_under_autocast():
    logits, image = small_inputs(c=3)
    crf = MeanFieldCRF(num_classes=3).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = crf(logits.to(torch.bfloat16), image.float())
    assert out.dtype == torch.float32
    with torch.no_grad():
        ref = crf(logits.to(torch.bfloat16).float(), image.float())
    torch.testing.assert_close(out, ref)


def test_uint8_image_accepted():
    logits, image = small_inputs(c=3)
    crf = MeanFieldCRF(num_classes=3).eval()
    with torch.no_grad():
        a = crf(logits.float(), image.round().to(torch.uint8))
        b = crf(logits.float(), image.round().float())
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda z, im, m: (z[0], im, m), ValueError, "logits must be a Tensor\\[B, C, H, W\\]"),
        (lambda z, im, m: (z.long(), im, m), TypeError, "floating point"),
        (lambda z, im, m: (z, im[:, :2], m), ValueError, "raw RGB Tensor\\[B, 3, H, W\\]"),
        (lambda z, im, m: (z, im[..., :-1], m), ValueError, "does not match logits"),
        (lambda z, im, m: (z, im, m[..., :-1]), ValueError, "valid_mask must be a Tensor\\[B, H, W\\]"),
        (lambda z, im, m: (z, im, m.float()), TypeError, "bool"),
        (lambda z, im, m: (z.index_fill(1, torch.tensor([0]), float("nan")), im, m), ValueError, "NaN"),
        (lambda z, im, m: (z, im - 128.0, m), ValueError, "negative values.*normalised network input"),
        (lambda z, im, m: (z[:, :2], im, m), ValueError, "2 classes, the CRF was built for 3"),
        (lambda z, im, m: (z.to("meta"), im.to("meta"), m), ValueError, "cannot run on meta tensors"),
        (lambda z, im, m: (z, im.clone().requires_grad_(True), m), ValueError,
         "image requires grad.*does not differentiate its guidance.*image.detach"),
    ],
)
def test_bad_input(mutate, error, match):
    logits, image = small_inputs(c=3)
    crf = MeanFieldCRF(num_classes=3).double()
    mask = torch.ones(1, 7, 8, dtype=torch.bool)
    with pytest.raises(error, match=match):
        crf(*mutate(logits, image, mask))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_classes=0), "num_classes"),
        (dict(num_classes=3, theta_alpha=0.0), "theta_alpha"),
        (dict(num_classes=3, theta_beta=-1.0), "theta_beta"),
        (dict(num_classes=3, theta_gamma=float("inf")), "theta_gamma"),
        (dict(num_classes=3, normalization="before"), "normalization"),
        (dict(num_classes=3, train_iterations=-1), "train_iterations"),
        (dict(num_classes=3, bilateral_weight=float("nan")), "bilateral_weight must be a finite number, got nan"),
        (dict(num_classes=3, spatial_weight=float("inf")), "spatial_weight must be a finite number, got inf"),
        (dict(num_classes=True), "num_classes must be an int >= 1, got True"),
        (dict(num_classes=3, train_iterations=True), "train_iterations must be an int >= 0, got True"),
        (dict(num_classes=3, theta_alpha=True), "theta_alpha must be a real number"),
        (dict(num_classes=3, theta_beta=torch.tensor(5.0)), "theta_beta must be a real number.*Tensor"),
        (dict(num_classes=3, theta_gamma=1e-50), "theta_gamma=1e-50 is 0 or infinite in float32"),
        (dict(num_classes=3, theta_alpha=1e39), "theta_alpha=1e\\+39 is 0 or infinite in float32"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MeanFieldCRF(**kwargs)


def test_numpy_numbers_construct_the_same_layer():
    logits, image = small_inputs(c=3)
    plain = MeanFieldCRF(num_classes=3, theta_beta=5.0, eval_iterations=2).double().eval()
    numpy = MeanFieldCRF(num_classes=np.int64(3), theta_beta=np.float32(5.0), eval_iterations=np.int64(2),
                         spatial_weight=np.float64(3.0)).double().eval()
    assert type(numpy.num_classes) is int and type(numpy.eval_iterations) is int
    with torch.no_grad():
        torch.testing.assert_close(numpy(logits, image), plain(logits, image))


@pytest.mark.parametrize("name", ["spatial_weight", "bilateral_weight", "compatibility", "log_theta_alpha",
                                  "log_theta_beta", "log_theta_gamma"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_parameters_are_named_not_turned_into_nan_output(name, value):
    # edited, loaded from a checkpoint: the output would be NaN everywhere (or the filters would fail obscurely)
    logits, image = small_inputs(c=3)
    crf = MeanFieldCRF(num_classes=3).double()
    with torch.no_grad():
        getattr(crf, name).view(-1)[0] = value
    for mode in (crf.eval(), crf.train()):
        with pytest.raises(ValueError, match=f"parameters {name} hold NaN or infinite values"):
            mode(logits, image)


@pytest.mark.parametrize("name, log_value, match", [
    ("log_theta_gamma", 100.0, "bandwidths must be finite and > 0 in torch.float32, got theta_gamma=inf"),
    ("log_theta_gamma", -110.0, "bandwidths must be finite and > 0 in torch.float32, got theta_gamma=0.0"),
    ("log_theta_beta", 100.0, "got theta_beta=inf"),
    ("log_theta_alpha", -100.0, "bilateral features.*overflow torch.float32: theta_alpha=3.78.*too small"),
])
def test_bandwidths_out_of_the_dtypes_range_are_named(name, log_value, match):
    logits, image = small_inputs(c=3)
    crf = MeanFieldCRF(num_classes=3)
    with torch.no_grad():
        getattr(crf, name).fill_(log_value)
    with pytest.raises(ValueError, match=match), torch.no_grad():
        crf.eval()(logits.float(), image.float())


def test_build_kernels_checks_its_arguments_and_takes_numbers():
    _, image = small_inputs(c=3)
    numbers = build_kernels(image, theta_alpha=80.0, theta_beta=13.0, theta_gamma=3.0)
    tensors = build_kernels(image, theta_alpha=torch.tensor(80.0, dtype=torch.float64),
                            theta_beta=torch.tensor(13.0, dtype=torch.float64),
                            theta_gamma=torch.tensor(3.0, dtype=torch.float64))
    torch.testing.assert_close(numbers.norm_bilateral, tensors.norm_bilateral, rtol=0, atol=0)
    with pytest.raises(ValueError, match="normalization must be 'symmetric' or 'after', got 'bogus'"):
        build_kernels(image, theta_alpha=80.0, theta_beta=13.0, theta_gamma=3.0, normalization="bogus")
    with pytest.raises(ValueError, match="got theta_alpha=0.0, theta_gamma=nan"):
        build_kernels(image, theta_alpha=0.0, theta_beta=13.0, theta_gamma=float("nan"))
    with pytest.raises(ValueError, match="the guidance image contains NaN or infinite values"):  # not "too small"
        build_kernels(image.index_fill(2, torch.tensor([1]), float("nan")), theta_alpha=80.0, theta_beta=13.0,
                      theta_gamma=3.0)


def test_mean_field_loops_name_bad_arguments():
    logits, image = small_inputs(c=3)
    crf = MeanFieldCRF(num_classes=3).double()
    kernels, pairwise = crf.kernels(image), crf.pairwise(torch.float64)
    unary = logits.movedim(1, -1).contiguous()
    for loop in (fast_inference.mean_field_inference, mean_field_steps):
        with pytest.raises(ValueError, match="iterations must be an int >= 0, got -1"):
            loop(unary, kernels, pairwise, -1)
        with pytest.raises(ValueError, match=r"pairwise must be .*two Tensor\[3, 3\], got \[\(5, 5\), \(3, 3\)\]"):
            loop(unary, kernels, (torch.eye(5, dtype=torch.float64), pairwise[1]), 1)
        with pytest.raises(ValueError, match=r"unary must be Tensor\[B, \*S, C\] with \(B, \*S\) = \(1, 7, 8\)"):
            loop(logits, kernels, pairwise, 1)  # channels first
        # float16 was refused for its mixes' size (2^-40 of float16's largest value is 6e-8), not for its dtype
        with pytest.raises(TypeError, match=r"unary must be a float32 or float64 Tensor\[B, \*S, C\] .* got torch.float16"):
            loop(unary.half(), kernels, tuple(m.half() for m in pairwise), 1)
        with pytest.raises(TypeError, match=r"pairwise must have the unary's dtype torch.float64, got \[torch.float32, "):
            loop(unary, kernels, tuple(m.float() for m in pairwise), 1)
    with pytest.raises(ValueError, match="unary .* and logits .* differ in shape"):
        mean_field_step(unary, unary[:, :, :1], kernels, pairwise)
    # the layer checks its logits; the low-level loop named a NaN or +inf unary too (it returned NaN z_T)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="mean_field_inference: the unary holds NaN or infinite values"):
            fast_inference.mean_field_inference(unary.index_fill(2, torch.tensor([3]), bad), kernels, pairwise, 2)
    some_impossible = unary.index_fill(3, torch.tensor([0]), float("-inf"))  # log 0: a class ruled out
    assert torch.isfinite(fast_inference.mean_field_inference(some_impossible, kernels, pairwise, 2)[..., 1:]).all()


def test_mixes_that_could_overflow_the_messages_are_named():
    # Finite weights near float32's largest value overflowed the messages: inf or NaN z_T, in both modes, and from
    # the low-level loops. The limit is 2^-40 of the dtype's largest value, which no real weight comes near.
    logits, image = (t.float() for t in small_inputs(c=3))
    crf = MeanFieldCRF(num_classes=3)
    limit32 = torch.finfo(torch.float32).max * 2.0**-40
    for mode in ("train", "eval"):
        crf.train(mode == "train")
        with torch.no_grad():
            crf.bilateral_weight.fill_(0).diagonal().fill_(0.6 * limit32)  # its columns sum to 1.2 × the limit
        with pytest.raises(ValueError, match=r"^μ W_bilateral \(the compatibility times the bilateral kernel weights\) "
                                             r"has a column whose \|entries\| sum to 3.7\d*e\+26: above 3.09e\+26 "
                                             r"\(2\^-40 of float32's largest value\)"):
            crf(logits, image)
        with torch.no_grad():
            crf.bilateral_weight.diagonal().fill_(0.4 * limit32)  # 0.8 × the limit: runs, finite
        assert torch.isfinite(crf(logits, image)).all()
    kernels = crf.kernels(image)
    unary = logits.movedim(1, -1).contiguous()
    for bad, found in ((float("inf"), "is not finite"), (float("nan"), "is not finite"), (1e27, "sum to 2e\\+27")):
        pairwise = (torch.full((3, 3), bad).fill_diagonal_(0), torch.zeros(3, 3))
        for loop in (fast_inference.mean_field_inference, mean_field_steps):
            with pytest.raises(ValueError, match=rf"^μ W_spatial .* {found}"):
                loop(unary, kernels, pairwise, 1)
    # float64 allows more (its own 2^-40), and construction checks the weights as float32 parameters hold them
    big = (torch.full((3, 3), 1e27, dtype=torch.float64).fill_diagonal_(0), torch.zeros(3, 3, dtype=torch.float64))
    z = fast_inference.mean_field_inference(unary.double(), crf.kernels(image.double()), big, 1)
    assert torch.isfinite(z).all()
    with pytest.raises(ValueError, match=r"^μ W_spatial .* sum to 2e\+27: above 3.09e\+26"):
        MeanFieldCRF(num_classes=3, spatial_weight=1e27)


@pytest.mark.parametrize("shape", [(2, 7, 9, 3), (1, 70, 5, 21), (1, 40, 32, 4)])  # lanes: 3, 21 channels; 16
def test_spatial_filter_is_exact_gaussian(shape):
    b, h, w, c = shape
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    theta = torch.tensor(1.7, dtype=torch.float64)
    ys, xs = torch.meshgrid(torch.arange(float(h)), torch.arange(float(w)), indexing="ij")
    pos = torch.stack([ys, xs], -1).reshape(-1, 2).double()
    k = torch.exp(-torch.cdist(pos, pos) ** 2 / (2 * theta**2))
    ref = torch.einsum("ij,bjc->bic", k, x.reshape(b, h * w, c)).reshape(shape)
    torch.testing.assert_close(spatial_gaussian(x, theta), ref, rtol=0, atol=5e-4)  # truncation at 4θ


@pytest.mark.parametrize("shape, spacing", [((2, 7, 9, 3), None), ((1, 4, 5, 20), (1.5, 0.7)),
                                            ((1, 5, 6, 7, 2), (2.0, 1.0, 0.5)), ((2, 34, 1, 17), None)])
def test_spatial_filter_gradients_are_exact(shape, spacing):
    # The truncated separable filter is differentiable in θ (fixed radius): gradcheck for the values and θ,
    # through every pass order (2-D, 3-D, anisotropic spacing, channels beyond one vector block).
    v = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    theta = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, t: spatial_gaussian(x, t, spacing=spacing), (v, theta))
    theta_only = torch.autograd.grad(spatial_gaussian(v.detach(), theta, spacing=spacing).square().sum(), theta)[0]
    both = torch.autograd.grad(spatial_gaussian(v, theta, spacing=spacing).square().sum(), theta)[0]
    torch.testing.assert_close(theta_only, both)


@pytest.mark.parametrize("p", [1, 63, 64, 64 * 5 + 7])
def test_class_softmax_equals_softmax(p):
    for c in (1, 3, 15, 16, 21):  # classes-first tiles below 16 classes, PyTorch's kernel from 16
        z = torch.randn(p, c, dtype=torch.float64, generator=torch.Generator().manual_seed(c)) * 5
        out = class_softmax(z)
        assert out.is_contiguous() and out.shape == z.shape
        torch.testing.assert_close(out, torch.softmax(z, -1))


def test_class_softmax_is_differentiable_for_any_leading_shape():
    z = torch.randn(2, 1, 70, 3, dtype=torch.float64, requires_grad=True)  # tiles and a remainder
    assert torch.autograd.gradcheck(class_softmax, (z,))


def test_gaussian_1d_filters_outer_products_like_the_2d_filter():
    theta = torch.tensor(2.3, dtype=torch.float64)
    a, b = torch.rand(11, dtype=torch.float64), torch.rand(6, dtype=torch.float64)
    outer = (a[:, None] * b[None, :])[None, ..., None]  # Tensor[1, H, W, 1]
    expected = (gaussian_1d(a, theta)[:, None] * gaussian_1d(b, theta)[None, :])[None, ..., None]
    torch.testing.assert_close(spatial_gaussian(outer, theta), expected)
    with pytest.raises(ValueError, match="Tensor\\[L\\]"):
        gaussian_1d(torch.rand(3, 4), theta)  # would otherwise be flattened into one axis
    with pytest.raises(ValueError, match="floating-point"):
        gaussian_1d(torch.ones(5, dtype=torch.long), theta)


def iou(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> float:
    scores = []
    for k in range(num_classes):
        inter = ((pred == k) & (label == k)).sum().item()
        union = ((pred == k) | (label == k)).sum().item()
        if union:
            scores.append(inter / union)
    return float(np.mean(scores))


@pytest.mark.slow
def test_crf_parameters_can_learn():
    """Fit only the CRF's parameters to ground truth on noisy unaries over clean images: IoU goes up."""
    torch.manual_seed(0)
    data = [scene(100 + i, 40, 48, 3, noise=2.2) for i in range(4)]
    labels = torch.tensor(np.stack([d[0] for d in data]))
    images = torch.tensor(np.stack([d[1] for d in data])).permute(0, 3, 1, 2).float()
    logits = torch.tensor(np.stack([d[2] for d in data]))
    crf = MeanFieldCRF(num_classes=3, spatial_weight=1.0, bilateral_weight=1.0, theta_alpha=20.0, theta_beta=40.0)
    crf.train_iterations = crf.eval_iterations = 5

    def score() -> float:
        with torch.no_grad():
            return iou(crf.eval()(logits, images).argmax(1), labels, 3)

    before = score()
    opt = torch.optim.SGD(crf.parameters(), lr=0.05, momentum=0.9)
    for _ in range(200):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(crf.train()(logits, images), labels)
        loss.backward()
        opt.step()
    after = score()
    assert after > before + 0.05, (before, after)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    _, image, logits = scene(0, 40, 50, 4)
    z = torch.tensor(logits)[None]
    im = torch.tensor(image).permute(2, 0, 1)[None].float()
    crf = MeanFieldCRF(num_classes=4).eval()
    with torch.no_grad():
        cpu = crf(z, im)
        gpu = crf.cuda()(z.cuda(), im.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-3)


def test_crfrnn_composes_network_and_crf():
    from crfrnn_deeplab import CRFRNN, get_model

    torch.manual_seed(0)
    net = get_model("deeplabv2_resnet18_msc", num_classes=3, base_width=8)
    model = CRFRNN(network=net, crf=MeanFieldCRF(num_classes=3, train_iterations=2))
    raw = torch.rand(2, 3, 33, 35) * 255
    out = model.train()(model.preprocess(raw), raw)
    assert len(out.network.per_scale) == 3 and out.crf.shape == (2, 3, 33, 35)
    (out.crf.sum() + out.network.fused.sum()).backward()
    groups = model.backbone_parameters() + model.head_weights() + model.head_biases() + model.crf_parameters()
    assert {id(p) for p in groups} == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(p.grad is not None for p in groups)
    with pytest.raises(ValueError, match="network has 3 classes, the CRF 4"):
        CRFRNN(network=net, crf=MeanFieldCRF(num_classes=4))
    with pytest.raises(ValueError, match="raw must be the raw RGB image"):
        model(model.preprocess(raw), raw[:, :, :10])


@pytest.mark.parametrize("normalization", ["symmetric", "after"])
def test_large_masked_region_stays_finite_in_float32(normalization):
    # Far from every valid pixel D = K·mask is 0 up to float32 rounding (it came out -1e-9 in a padded training
    # batch and D^-½ turned it into NaN); masked pixels must get exactly no message instead.
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 4, 48, 40, generator=g, requires_grad=True)
    image = torch.rand(1, 3, 48, 40, generator=g) * 255
    image[..., 30:, :] = 104.0  # padding filled with a mean colour, as the transforms do
    mask = torch.zeros(1, 48, 40, dtype=torch.bool)
    mask[:, :30, :25] = True
    crf = MeanFieldCRF(bilateral_filter="lattice", num_classes=4, theta_alpha=3.0, theta_beta=5.0, normalization=normalization).train()
    out = crf(logits, image, mask)
    out.square().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(logits.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in crf.parameters())
    torch.testing.assert_close(out[..., 30:, :], logits[..., 30:, :])


@pytest.mark.parametrize("normalization", ["symmetric", "after"])
def test_normaliser_is_zero_on_masked_pixels_even_for_rounding_negatives(normalization):
    from crfrnn_deeplab.crf.kernels import normaliser as _normaliser

    d = torch.tensor([4.0, -3e-7, 0.0, 1e-30])
    valid = torch.tensor([1.0, 0.0, 0.0, 1.0])
    n = _normaliser(d, valid, normalization)
    assert torch.isfinite(n).all() and n[1] == 0 and n[2] == 0
    assert n[0] == pytest.approx(0.5 if normalization == "symmetric" else 0.25)


def test_inference_thread_policy():
    from crfrnn_deeplab.crf import threads

    policy = threads.thread_policy()
    try:
        for bad in ("some", 0, -1, True, 1.5):
            with pytest.raises(ValueError, match="policy"):
                threads.set_inference_threads(bad)
        free = threads.free_cores()
        assert free is None or 0 <= free <= len(__import__("os").sched_getaffinity(0))
        threads.set_inference_threads(1)
        assert threads.inference_threads() == 1
        threads.set_inference_threads("all")
        assert threads.inference_threads() == torch.get_num_threads()
        threads.set_inference_threads("adaptive")
        assert 1 <= threads.inference_threads() <= torch.get_num_threads()
        before = torch.get_num_threads()
        threads.set_inference_threads(1)
        with threads.limited_threads() as used:
            assert used == 1 and torch.get_num_threads() == 1
            with threads.caller_threads():  # products whose rounding depends on the count: the caller's
                assert torch.get_num_threads() == before
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == before
    finally:
        threads.set_inference_threads(policy)


@pytest.mark.parametrize("learned", [False, True])
def test_inference_does_not_depend_on_the_thread_count(learned, monkeypatch):
    # the adaptive policy picks the thread count from the load: the outputs must not depend on it (large enough
    # for the spatial filter's banded products, which run with the policy's threads)
    from crfrnn_deeplab.crf import spatial

    banded = []
    run_banded = spatial._banded_rows
    monkeypatch.setattr(spatial, "_banded_rows", lambda *args: banded.append(1) or run_banded(*args))
    _, image, logits = scene(0, 120, 160, 21)
    crf = MeanFieldCRF(num_classes=21, eval_iterations=3, **PARAMS).eval()
    if learned:
        with torch.no_grad():
            crf.compatibility.add_(0.05 * torch.randn(21, 21, generator=torch.Generator().manual_seed(0)))
    z, im = torch.tensor(logits)[None], torch.tensor(image).permute(2, 0, 1)[None].float()
    outputs = at_inference_threads(lambda: crf(z, im))
    assert banded, "the banded passes did not run"
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("learn_bandwidths", [True, False])
@pytest.mark.parametrize("normalization", ["symmetric", "after"])
def test_blocked_splat_gives_the_plain_splats_outputs_and_gradients(normalization, learn_bandwidths, monkeypatch):
    # Above _SPLAT_BLOCK points the CPU splat is blocked (BlockedRows): the inference path (its weights scaled by
    # column), the autograd path and every gradient (the lattice's backward splats the incoming gradient) must be
    # the plain splat's up to the order of the additions. Blocks of 64 points (and wide bandwidths, so that the
    # lattice has fewer vertices than a block has entries) make these small images blocked (on the lattice, which
    # small images take only when asked to).
    from crfrnn_deeplab.crf import lattice as permutohedral
    from crfrnn_deeplab.crf.sparse_rows import BlockedRows

    logits, image = small_inputs(b=2, c=5, h=12, w=10)
    mask = torch.rand(2, 12, 10, generator=torch.Generator().manual_seed(3)) > 0.2
    crf = MeanFieldCRF(num_classes=5, theta_alpha=10.0, theta_beta=200.0, normalization=normalization,
                       learn_bandwidths=learn_bandwidths, bilateral_filter="lattice").double()
    with torch.no_grad():
        crf.compatibility.add_(torch.rand(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4)))

    def run():
        with torch.no_grad():
            fast = crf.eval()(logits, image, mask)
        x = logits.clone().requires_grad_(True)
        crf.train().zero_grad()
        crf(x, image, mask).square().sum().backward()
        grads = [x.grad] + [p.grad for p in crf.parameters() if p.requires_grad]
        return fast, grads

    plain, plain_grads = run()
    monkeypatch.setattr(permutohedral, "_SPLAT_BLOCK", 64)
    assert isinstance(crf.kernels(image.double(), mask).lattice.splat, BlockedRows)
    blocked, blocked_grads = run()
    torch.testing.assert_close(blocked, plain, rtol=1e-12, atol=1e-12)
    assert len(blocked_grads) == len(plain_grads) == (7 if learn_bandwidths else 4)
    for a, b in zip(blocked_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_dense_mean_field_is_dense_crfs_loop():
    # dense_crf is dense_mean_field on the exact Gaussians; a mask zeroes what masked points send and receive.
    g = torch.Generator().manual_seed(0)
    unary = torch.randn(12, 3, generator=g, dtype=torch.float64)
    features = torch.randn(12, 2, generator=g, dtype=torch.float64)
    kernel, eye = dense_gaussian(features), torch.eye(3, dtype=torch.float64)
    valid = torch.arange(12) % 4 != 0
    z = dense_mean_field(unary, [(2 * eye, kernel)], 1 - eye, 4, "after", valid)
    alone = dense_mean_field(unary[valid], [(2 * eye, kernel[valid][:, valid])], 1 - eye, 4, "after")
    torch.testing.assert_close(z[valid], alone, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z[~valid], unary[~valid], rtol=0, atol=0)
    assert torch.equal(dense_mean_field(unary, [(2 * eye, kernel)], 1 - eye, 0), unary)


@pytest.mark.parametrize("change, match", [
    (dict(unary=torch.zeros(12)), r"unary must be a Tensor\[N, C\]"),
    (dict(kernels=[(torch.eye(3), torch.eye(11))]), r"each kernel must be a \(Tensor\[3, 3\], Tensor\[12, 12\]\)"),
    (dict(compatibility=torch.ones(2, 2)), r"compatibility must be a Tensor\[3, 3\]"),
    (dict(iterations=-1), "iterations must be an int >= 0"),
    (dict(iterations=2.0), "iterations must be an int >= 0"),
    (dict(normalization="before"), "normalization must be 'symmetric' or 'after'"),
    (dict(valid=torch.ones(12)), r"valid must be a bool Tensor\[12\]"),
])
def test_dense_mean_field_names_bad_input(change, match):
    args = dict(unary=torch.zeros(12, 3), kernels=[(torch.eye(3), torch.eye(12))], compatibility=torch.ones(3, 3),
                iterations=2, normalization="symmetric", valid=None)
    with pytest.raises(ValueError, match=match):
        dense_mean_field(**{**args, **change})


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_a_transposed_valid_mask_is_the_same_mask(spatial_dims, train):
    # A mask built from a transposed label map (or a numpy .T) has the same values in another layout: the layer
    # raised torch's "view size is not compatible with input tensor's size and stride" from inside its kernels.
    g = torch.Generator().manual_seed(3)
    sizes = (6, 7) if spatial_dims == 2 else (4, 5, 6)
    logits = torch.randn(2, 3, *sizes, generator=g)
    groups = None if spatial_dims == 2 else (1,)
    image = torch.rand(2, 3 if groups is None else 1, *sizes, generator=g) * 255
    mask = torch.rand(2, *sizes, generator=g) > 0.3
    transposed = mask.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not transposed.is_contiguous() and torch.equal(transposed, mask)
    crf = MeanFieldCRF(num_classes=3, spatial_dims=spatial_dims, guidance_groups=groups).train(train)
    z = logits.clone().requires_grad_(train)
    expected = crf(z, image, mask)
    torch.testing.assert_close(crf(z, image, transposed), expected, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(crf(logits, image, transposed), crf(logits, image, mask), rtol=0, atol=0)
        direct, plain = crf.kernels(image, transposed), crf.kernels(image, mask)  # build_kernels called directly
        for name in ("norm_spatial", "norm_bilateral"):
            torch.testing.assert_close(getattr(direct, name), getattr(plain, name), rtol=0, atol=0)


def test_a_layer_built_on_the_meta_device_is_named_until_its_weights_are_loaded():
    # torch.device("meta") builds a model without memory, to load its weights with assign=True: the construction
    # failed ("Tensor.item() cannot be called on meta tensors"), so did print(crf), and a forward pass before the
    # loading raised "Cannot copy out of meta tensor; no data!".
    logits, image = small_inputs(c=3)
    logits, image = logits.float(), image.float()
    trained = MeanFieldCRF(num_classes=3, theta_alpha=20.0, theta_beta=5.0).eval()
    with torch.no_grad():
        trained.compatibility.add_(0.1 * torch.randn(3, 3, generator=torch.Generator().manual_seed(0)))
    with torch.device("meta"):
        crf = MeanFieldCRF(num_classes=3).eval()
    assert "bandwidths on the meta device" in repr(crf)
    with pytest.raises(ValueError, match="parameters spatial_weight, .* are on the meta device .*load_state_dict"):
        crf(logits, image)
    with pytest.raises(ValueError, match="bandwidths are on the meta device"):
        crf.bandwidths
    crf.load_state_dict(trained.state_dict(), assign=True)
    assert crf.bandwidths == trained.bandwidths
    with torch.no_grad():
        torch.testing.assert_close(crf(logits, image), trained(logits, image), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"μ W_spatial .* sum to 2e\+38"), torch.device("meta"):
        MeanFieldCRF(num_classes=3, spatial_weight=1e38)  # checked on the meta device too


@pytest.mark.parametrize("name", ["spatial_weight", "bilateral_weight", "compatibility"])
def test_a_weight_matrix_of_another_shape_is_named(name):
    # crf.<name> = nn.Parameter(...) for another class count: torch's "mat1 and mat2 shapes cannot be multiplied"
    logits, image = small_inputs(c=3)
    crf = MeanFieldCRF(num_classes=3).double()
    setattr(crf, name, torch.nn.Parameter(torch.eye(4, dtype=torch.float64)))
    for mode in (crf.eval(), crf.train()):
        with pytest.raises(ValueError, match=rf"parameter {name} must be a Tensor\[C, C\] with C = num_classes = 3, "
                                             r"got shape \(4, 4\)"):
            mode(logits, image)
