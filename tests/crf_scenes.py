"""Shared test inputs for the CRF: a structured scene with noisy unaries, densecrf's answer on it, and the
densecrf parameters the tests use (importable by every test module: ``pythonpath = ["tests"]``)."""

import contextlib

import numpy as np
import pydensecrf.densecrf as dcrf

from crfrnn_deeplab.crf import kernels as kernels_module
from crfrnn_deeplab.crf.reference import DenseKernelPairs


def scene(seed: int, h: int, w: int, num_classes: int, noise: float = 1.5):
    """A structured scene: coloured rectangles and a disc (labels), textured colours, noisy unary logits."""
    rng = np.random.default_rng(seed)
    label = np.zeros((h, w), np.int64)
    colours = rng.uniform(0, 255, (num_classes, 3))
    for k in range(1, num_classes):
        y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
        label[y : y + rng.integers(8, h // 2 + 8), x : x + rng.integers(8, w // 2 + 8)] = k
    ys, xs = np.mgrid[0:h, 0:w]
    label[(ys - h / 2) ** 2 + (xs - w / 3) ** 2 < (min(h, w) / 5) ** 2] = num_classes - 1
    image = np.clip(colours[label] + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)
    logits = 2.0 * np.eye(num_classes)[label].transpose(2, 0, 1) + rng.normal(0, noise, (num_classes, h, w))
    return label, image, logits.astype(np.float32)


def densecrf_q(logits: np.ndarray, image: np.ndarray, iterations: int, **p) -> np.ndarray:
    c, h, w = logits.shape
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(-logits.reshape(c, -1)))
    crf.addPairwiseGaussian(sxy=p["theta_gamma"], compat=p["spatial_weight"])
    crf.addPairwiseBilateral(sxy=p["theta_alpha"], srgb=p["theta_beta"], rgbim=image, compat=p["bilateral_weight"])
    return np.array(crf.inference(iterations)).reshape(c, h, w)


PARAMS = dict(spatial_weight=3.0, bilateral_weight=10.0, theta_alpha=80.0, theta_beta=13.0, theta_gamma=3.0)


@contextlib.contextmanager
def dense_pairs(mass: str):
    """Every CRF built inside uses the dense derivative with ``mass`` ("pair": the mass-consistent ideal,
    "none": the literal ideal) instead of the estimator."""
    original = kernels_module.kernel_pairs

    def make(features, lattice_mass, valid=None, **_):
        return DenseKernelPairs(features, lattice_mass, valid, mass)

    kernels_module.kernel_pairs = make
    try:
        yield
    finally:
        kernels_module.kernel_pairs = original


def at_inference_threads(run, counts=(1, 2)):
    """``run()``'s result with the inference thread policy at each of ``counts`` (torch given 2 threads), the
    caller's settings restored after."""
    import torch

    from crfrnn_deeplab.crf import threads

    before, policy = torch.get_num_threads(), threads.thread_policy()
    outputs = []
    try:
        torch.set_num_threads(2)
        for chosen in counts:
            threads.set_inference_threads(chosen)
            with torch.no_grad():
                outputs.append(run())
    finally:
        torch.set_num_threads(before)
        threads.set_inference_threads(policy)
    return outputs
