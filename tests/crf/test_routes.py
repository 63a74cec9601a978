"""The generic route (what CUDA runs: torch.sort/unique/searchsorted, the unblocked splat, one product, one
convolution per axis) against the CPU's own route, both on the CPU (crfrnn_deeplab.crf.routes), in float64 so
that only the order of additions differs. Sizes are chosen so that every CPU-only branch runs on the CPU route:
more than a splat block of points, more than two Gram blocks of rows, at least 2^17 values per banded pass,
more than 16 classes and fewer (the classes-first softmax)."""

import pytest
import torch

from crfrnn_deeplab.crf import MeanFieldCRF, build_lattice, routes
from crfrnn_deeplab.crf.kernels import bilateral_features
from crfrnn_deeplab.crf.lattice import _SPLAT_BLOCK
from crfrnn_deeplab.crf.products import _BLOCK_ROWS, gram
from crfrnn_deeplab.crf.spatial import _BAND_MIN_VALUES, spatial_gaussian
from crf_scenes import scene

H, W = 120, 160  # 19 200 points > _SPLAT_BLOCK; 160 × 21 × 120 values per H pass >= _BAND_MIN_VALUES


def both_routes(fn):
    """fn() on the CPU's route, then on the generic route."""
    cpu = fn()
    with routes.generic_routes():
        generic = fn()
    return cpu, generic


def inputs(classes: int, batch: int = 2, seed: int = 0):
    images, logits = [], []
    for b in range(batch):
        _, image, z = scene(seed + b, H, W, classes)
        images.append(torch.from_numpy(image).permute(2, 0, 1).double())
        logits.append(torch.from_numpy(z).double())
    mask = torch.ones(batch, H, W, dtype=torch.bool)
    mask[-1, :, W - 37 :] = False  # the last image padded on the right
    return torch.stack(logits), torch.stack(images), mask


def test_sizes_reach_every_cpu_branch():
    assert H * W > _SPLAT_BLOCK and H * W > 2 * _BLOCK_ROWS and H * W * 21 >= _BAND_MIN_VALUES
    with routes.generic_routes():
        assert not routes.cpu_route("cpu")
    assert routes.cpu_route("cpu") and not routes.cpu_route("meta")


def test_lattice_routes_agree():
    _, images, mask = inputs(3)
    scale = torch.tensor([80.0, 80.0, 13.0, 13.0, 13.0], dtype=torch.float64)
    features = (bilateral_features(images) / scale).transpose(1, 2).contiguous()  # [B, 5, N]
    values = torch.rand(2, H * W, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cpu, generic = both_routes(lambda: build_lattice(features, mask))
    assert cpu.num_vertices == generic.num_vertices
    torch.testing.assert_close(cpu.slice.columns, generic.slice.columns)  # vertices numbered alike
    for transpose in (False, True):
        torch.testing.assert_close(cpu.filter(values, transpose=transpose), generic.filter(values, transpose=transpose),
                                   rtol=1e-12, atol=1e-12)
    assert type(cpu.splat).__name__ == "BlockedRows" and type(generic.splat).__name__ == "SparseRows"


def test_products_and_spatial_filter_routes_agree():
    generator = torch.Generator().manual_seed(2)
    a, b = (torch.rand(3 * _BLOCK_ROWS + 5, c, dtype=torch.float64, generator=generator) for c in (21, 7))
    cpu, generic = both_routes(lambda: gram(a, b))
    torch.testing.assert_close(cpu, generic, rtol=1e-12, atol=1e-12)
    values = torch.rand(2, H, W, 21, dtype=torch.float64, generator=generator)
    cpu, generic = both_routes(lambda: spatial_gaussian(values, torch.tensor(3.0, dtype=torch.float64)))
    torch.testing.assert_close(cpu, generic, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("normalization", ["symmetric", "after"])
@pytest.mark.parametrize("classes, compatibility", [(21, "potts"), (21, "learned"), (5, "learned")])
def test_inference_routes_agree(normalization, classes, compatibility):
    logits, images, mask = inputs(classes)
    crf = MeanFieldCRF(num_classes=classes, normalization=normalization).double().eval()
    if compatibility == "learned":
        with torch.no_grad():
            crf.compatibility.add_(torch.rand(classes, classes, dtype=torch.float64,
                                              generator=torch.Generator().manual_seed(4)))
    with torch.no_grad():
        cpu, generic = both_routes(lambda: crf(logits, images, mask))
    torch.testing.assert_close(cpu, generic, rtol=1e-9, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("learn_bandwidths", [False, True])
def test_training_routes_agree(learn_bandwidths):
    logits, images, mask = inputs(21)
    crf = MeanFieldCRF(num_classes=21, learn_bandwidths=learn_bandwidths).double().train()
    weights = torch.rand(logits.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def step():
        torch.manual_seed(0)  # the kernel pairs of the bandwidths' gradient are drawn alike
        z = logits.clone().requires_grad_(True)
        crf.zero_grad()
        out = crf(z, images, mask)
        (out * weights).sum().backward()
        return [out.detach(), z.grad] + [p.grad.clone() for p in crf.parameters() if p.grad is not None]

    cpu, generic = both_routes(step)
    assert len(cpu) == len(generic) == 2 + sum(p.requires_grad for p in crf.parameters())
    for x, y in zip(cpu, generic):
        torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-9)


@pytest.mark.slow
def test_volume_routes_agree():
    generator = torch.Generator().manual_seed(6)
    volume = torch.rand(1, 1, 32, 48, 48, dtype=torch.float64, generator=generator) * 100
    logits = torch.randn(1, 3, 32, 48, 48, dtype=torch.float64, generator=generator)
    crf = MeanFieldCRF(num_classes=3, spatial_dims=3, guidance_groups=(1,), theta_alpha=6.0, theta_beta=20.0, theta_gamma=2.0,
                       spacing=(2.0, 1.0, 1.0)).double()
    with torch.no_grad():
        cpu, generic = both_routes(lambda: crf.eval()(logits, volume))
    torch.testing.assert_close(cpu, generic, rtol=1e-9, atol=1e-9)
