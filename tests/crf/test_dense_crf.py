"""DenseCRF: the one-call post-processing API, against pydensecrf2 and its own batched/tensor forms."""

import numpy as np
import pytest
import torch

from crfrnn_deeplab import DenseCRF
from crf_scenes import PARAMS, densecrf_q, scene


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(0, keepdims=True))
    return e / e.sum(0, keepdims=True)


def test_probabilities_in_refined_probabilities_out_like_pydensecrf():
    _, image, logits = scene(3, 60, 80, 4)
    crf = DenseCRF(iterations=5, **PARAMS)
    refined = crf(image, softmax(logits))
    theirs = densecrf_q(logits, image, 5, **PARAMS)  # -log softmax(l) = -l + const: the same unary
    assert isinstance(refined, np.ndarray) and refined.shape == (4, 60, 80) and refined.dtype == np.float32
    np.testing.assert_allclose(refined.sum(0), 1, atol=1e-5)
    assert np.abs(refined - theirs).mean() <= 0.01
    assert (refined.argmax(0) == theirs.argmax(0)).mean() >= 0.99
    assert (refined.argmax(0) != logits.argmax(0)).mean() > 0.01


def test_batched_tensors_logits_and_numpy_agree():
    scenes = [scene(s, 40, 50, 3) for s in (0, 1)]
    crf = DenseCRF(iterations=3)
    single = [crf(image, logits=logits) for _, image, logits in scenes]
    images = torch.stack([torch.from_numpy(im).permute(2, 0, 1) for _, im, _ in scenes])  # uint8 [2, 3, H, W]
    logits = torch.stack([torch.from_numpy(lg) for _, _, lg in scenes])
    batched = crf(images, logits=logits)
    assert isinstance(batched, torch.Tensor) and batched.shape == (2, 3, 40, 50)
    for i in range(2):
        np.testing.assert_allclose(batched[i].numpy(), single[i], atol=1e-5)
    from_probs = crf(images, torch.softmax(logits, 1))
    torch.testing.assert_close(from_probs, batched, atol=1e-4, rtol=0)


def test_pixels_outside_the_mask_keep_their_probabilities():
    _, image, logits = scene(2, 30, 40, 3)
    p = softmax(logits)
    mask = np.zeros((30, 40), bool)
    mask[:, :25] = True
    out = DenseCRF(iterations=5)(image, p, valid_mask=mask)
    np.testing.assert_allclose(out[:, ~mask], p[:, ~mask], atol=1e-6)
    assert np.abs(out[:, mask] - p[:, mask]).max() > 0.05
    alone = DenseCRF(iterations=5)(np.ascontiguousarray(image[:, :25]), np.ascontiguousarray(p[:, :, :25]))
    np.testing.assert_allclose(out[:, :, :25], alone, atol=1e-5)


def test_an_eps_that_would_erase_the_probabilities_is_refused():
    _, image, logits = scene(0, 20, 24, 3)
    with pytest.raises(ValueError, match=r"eps=0.4 is not below 1 / C = 1/3"):
        DenseCRF(iterations=1, eps=0.4)(image, softmax(logits))
    DenseCRF(iterations=1, eps=0.4)(image, softmax(logits[:2]))  # two classes: 0.4 keeps their order


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda crf, im, p: crf(im), ValueError, "exactly one of probabilities"),
        (lambda crf, im, p: crf(im, p, logits=p), ValueError, "exactly one of probabilities"),
        (lambda crf, im, p: crf(im, p * 2), ValueError, "sum to 1 over the class dimension"),
        (lambda crf, im, p: crf(im, p - 0.5), ValueError, "non-negative"),
        (lambda crf, im, p: crf(im, np.where(p > 0.5, np.nan, p)), ValueError, "NaN or inf"),
        (lambda crf, im, p: crf(im, p[None]), ValueError, "must have 3 dimensions"),
        (lambda crf, im, p: crf(im[..., :2], p), ValueError, r"\(H, W, 3\)"),
        (lambda crf, im, p: crf(im.tolist(), p), TypeError, "numpy array or a torch.Tensor"),
        (lambda crf, im, p: crf(im, p[:, :10]), ValueError, "does not match"),
    ],
)
def test_bad_input_is_named(call, error, match):
    _, image, logits = scene(0, 20, 24, 3)
    with pytest.raises(error, match=match):
        call(DenseCRF(iterations=1), image, softmax(logits))


def test_bad_parameters_fail_at_construction():
    with pytest.raises(ValueError, match="iterations"):
        DenseCRF(iterations=0)
    with pytest.raises(ValueError, match="device 'meta' cannot run the CRF"):
        DenseCRF(device="meta")
    if not torch.cuda.is_available():  # failed at the first call, in torch's words
        with pytest.raises(ValueError, match="device 'cuda:7' is not available on this machine; use 'cpu'"):
            DenseCRF(device="cuda:7")
    with pytest.raises(ValueError, match="device 'gpu' is not a torch device"):
        DenseCRF(device="gpu")
    for eps in (0.0, -1.0, 1.0, 2.0, float("nan"), True, "1e-8"):  # 2 made every output exactly 1 / C
        with pytest.raises(ValueError, match=r"eps \(the smallest probability kept before the logarithm\) must be"):
            DenseCRF(eps=eps)
    with pytest.raises(ValueError, match="theta_alpha"):
        DenseCRF(theta_alpha=-1.0)
    # float() would read a string or a bool as a number: "13" would run as 13, True as 1
    for name, value in [("theta_beta", "13"), ("theta_beta", ("13", 20.0)), ("bilateral_weight", True),
                        ("theta_gamma", None), ("spatial_weight", np.array([3.0]))]:
        with pytest.raises(TypeError, match=rf"{name} must be a real number, got"):
            DenseCRF(**{name: value})
    assert DenseCRF(theta_alpha=np.float32(60), theta_beta=np.int64(10)).params["theta_beta"] == 10.0  # numpy numbers are
    learned = DenseCRF(theta_alpha=torch.tensor(60.0, requires_grad=True), theta_gamma=np.array(2.5))  # and 0-d ones
    assert learned.params["theta_alpha"] == 60.0 and learned.params["theta_gamma"] == 2.5
    for value in (torch.tensor(True), torch.tensor([3.0]), np.array([3.0]), torch.tensor(1 + 2j)):
        with pytest.raises(TypeError, match="spatial_weight must be a real number, got"):
            DenseCRF(spatial_weight=value)


def test_big_endian_and_strided_arrays_give_the_native_result():
    # Big-endian arrays (FITS, some DICOM and .npy files) were torch's "given numpy array has byte order
    # different from the native byte order", naming neither argument.
    _, image, logits = scene(1, 20, 24, 3)
    p, mask = softmax(logits), np.ones((20, 24), bool)
    mask[:, :5] = False
    crf = DenseCRF(iterations=2)
    expected = crf(image, p, valid_mask=mask)
    big = crf(image.astype(">u2"), p.astype(">f4"), valid_mask=mask.astype(">?"))
    np.testing.assert_array_equal(big, expected)
    np.testing.assert_array_equal(crf(image, logits=np.log(p).astype(">f8")), crf(image, logits=np.log(p)))
    volume = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)
    probabilities = np.random.default_rng(1).dirichlet(np.ones(2), size=(4, 5, 6)).transpose(3, 0, 1, 2)
    grey = DenseCRF(spatial_dims=3, guidance_groups=(1,), theta_alpha=3, theta_beta=0.2, theta_gamma=1, iterations=2)
    np.testing.assert_array_equal(grey(volume[..., None].astype(">f4"), probabilities),
                                  grey(volume[..., None], probabilities))
    strided = np.asfortranarray(np.repeat(image, 2, axis=1))[:, ::2]  # a strided view, the same pixels
    np.testing.assert_array_equal(crf(strided, p, valid_mask=mask), expected)


@pytest.mark.parametrize("kind", ["probabilities", "logits"])
def test_complex_and_object_scores_are_refused_by_name(kind):
    # complex scores ran with a ComplexWarning, their imaginary part dropped; object arrays were torch's
    # "can't convert np.ndarray of type numpy.object_"
    _, image, logits = scene(0, 20, 24, 3)
    scores = softmax(logits) if kind == "probabilities" else logits
    crf = DenseCRF(iterations=1)
    for bad in (scores.astype(np.complex64), torch.from_numpy(scores).to(torch.complex64)):
        with pytest.raises(TypeError, match=rf"{kind} must be real, got dtype torch.complex64"):
            crf(image, **{kind: bad})
    with pytest.raises(TypeError, match=rf"{kind} must be a numeric array, got dtype object"):
        crf(image, **{kind: scores.astype(object)})


def test_quantised_integer_probabilities_are_named_not_sent_to_logits():
    # A uint8 probability map (0-255, as stored in a PNG) was told "pass logits=... for unnormalised scores":
    # that runs softmax(p), a far sharper distribution than p.
    _, image, logits = scene(0, 20, 24, 3)
    quantised = np.round(softmax(logits) * 255).astype(np.uint8)
    with pytest.raises(ValueError, match=r"probabilities are uint8 with values up to \d+ \(a quantised map\?\): give "
                                         r"floats in \[0, 1\].*softmax\(p\) is not p"):
        DenseCRF(iterations=1)(image, quantised)
    one_hot = (logits == logits.max(0, keepdims=True)).astype(np.uint8)  # integer 0/1: a valid one-hot map
    refined = DenseCRF(iterations=1)(image, one_hot)
    np.testing.assert_array_equal(refined, DenseCRF(iterations=1)(image, one_hot.astype(np.float32)))


def test_bfloat16_softmax_probabilities_are_accepted():
    # A network under bfloat16 autocast gives a bfloat16 softmax, whose rounding (2^-8 of each entry) made a pixel
    # sum to 1.002: it was refused as "must sum to 1", with the advice to pass them as logits.
    _, image, logits = scene(0, 20, 24, 3)
    p = torch.softmax(torch.from_numpy(logits)[None], 1).bfloat16()
    assert (p.double().sum(1) - 1).abs().max() > 1e-3
    rgb = torch.from_numpy(image).permute(2, 0, 1)[None]
    crf = DenseCRF(iterations=2)
    torch.testing.assert_close(crf(rgb, p), crf(rgb, logits=p.float().clamp_min(crf.eps).log()), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"sum to 1 over the class dimension \(dim -3\), but a pixel sums to 1.0"):
        crf(rgb, p.float() * 1.002)  # float32 keeps its 1e-3


def test_the_class_dimension_named_for_volumes():
    volume = np.zeros((4, 5, 6, 1), np.float32)
    crf = DenseCRF(spatial_dims=3, guidance_groups=(1,), iterations=1)
    with pytest.raises(ValueError, match=r"sum to 1 over the class dimension \(dim -4\), but a pixel sums to 2"):
        crf(volume, np.ones((2, 4, 5, 6), np.float32))


def test_numpy_numbers_for_spacing_and_iterations():
    # DenseCRF(spacing=np.array(...)) raised numpy's "The truth value of an array with more than one element is
    # ambiguous"; iterations=np.int64(2), which MeanFieldCRF takes, was refused
    _, image, logits = scene(0, 20, 24, 3)
    p = softmax(logits)
    plain = DenseCRF(iterations=2, spacing=(1.0, 2.0))
    numpy = DenseCRF(iterations=np.int64(2), spacing=np.array([1.0, 2.0]))
    assert repr(numpy) == repr(plain) and type(numpy.iterations) is int
    np.testing.assert_array_equal(numpy(image, p), plain(image, p))
    assert not np.array_equal(plain(image, p), DenseCRF(iterations=2)(image, p))
    assert "spacing" not in repr(DenseCRF(spacing=None)) and "spatial_dims" not in repr(DenseCRF(spatial_dims=2))
