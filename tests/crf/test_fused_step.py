"""The fixed-bandwidth iteration as one autograd node (crf/fused_step.py) against the autograd path it replaces."""

import pytest
import torch

from crfrnn_deeplab.crf import MeanFieldCRF, fused_step
from crfrnn_deeplab.crf.mean_field import mean_field_step, mean_field_steps


def _layer_and_inputs(spatial_dims: int, masked: bool, classes: int):
    g = torch.Generator().manual_seed(spatial_dims * 10 + classes)
    sizes = (6, 9) if spatial_dims == 2 else (4, 5, 6)
    if spatial_dims == 2:
        crf = MeanFieldCRF(bilateral_filter="lattice", num_classes=classes, theta_alpha=4.0, theta_beta=40.0, learn_bandwidths=False)
        image = torch.rand(2, 3, *sizes, generator=g, dtype=torch.float64) * 255
    else:
        crf = MeanFieldCRF(bilateral_filter="lattice", num_classes=classes, spatial_dims=3, guidance_groups=(1, 1), theta_alpha=3.0,
                           theta_beta=(0.3, 30.0), spacing=(2.0, 1.0, 1.0), learn_bandwidths=False)
        image = torch.rand(2, 2, *sizes, generator=g, dtype=torch.float64)
        image[:, 1] *= 100.0  # a second modality in other units
    crf = crf.double().train()
    with torch.no_grad():  # learned-looking matrices: neither Potts nor diagonal
        for w in (crf.compatibility, crf.spatial_weight, crf.bilateral_weight):
            w.add_(torch.rand(w.shape, generator=g, dtype=torch.float64))
    logits = torch.randn(2, classes, *sizes, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(2, *sizes, generator=g) > 0.25 if masked else None
    target = torch.randn(2, classes, *sizes, generator=g, dtype=torch.float64)
    return crf, logits, image, mask, target


def _run(crf, logits, image, mask, target):
    crf.zero_grad()
    z = logits.clone().requires_grad_(True)
    out = crf(z, image, mask)
    (out * target).sum().backward()
    grads = [z.grad] + [p.grad.clone() for p in (crf.compatibility, crf.spatial_weight, crf.bilateral_weight)]
    return out.detach(), grads


@pytest.mark.parametrize("spatial_dims, masked, classes", [(2, False, 3), (2, True, 4), (3, True, 3), (2, False, 21)])
def test_fused_iterations_equal_autograd_path(monkeypatch, spatial_dims, masked, classes):
    crf, logits, image, mask, target = _layer_and_inputs(spatial_dims, masked, classes)
    calls = []
    iterations = fused_step.fixed_bandwidth_iterations
    monkeypatch.setattr(fused_step, "fixed_bandwidth_iterations", lambda *a: calls.append(a[-1]) or iterations(*a))
    fused, fused_grads = _run(crf, logits, image, mask, target)
    assert calls == [crf.train_iterations]  # the layer's iterations took the one node
    monkeypatch.setattr(fused_step, "applies", lambda kernels: False)
    monkeypatch.setattr(fused_step, "learned_iterations", mean_field_steps)
    nodes, node_grads = _run(crf, logits, image, mask, target)
    assert calls == [crf.train_iterations]
    torch.testing.assert_close(fused, nodes, rtol=1e-12, atol=1e-12)
    for a, b in zip(fused_grads, node_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if mask is not None:  # masked voxels keep their logits
        torch.testing.assert_close(fused.movedim(1, -1)[~mask], logits.movedim(1, -1)[~mask], rtol=0, atol=0)


@pytest.mark.parametrize("spatial_dims, masked", [(2, True), (3, False)])
def test_fused_step_equals_autograd_step(monkeypatch, spatial_dims, masked):
    # mean_field_step (the public single iteration) through the one-iteration node and through autograd's nodes,
    # chained three times from a z_0 that also gets the gradient of every iteration.
    crf, logits, image, mask, target = _layer_and_inputs(spatial_dims, masked, 4)
    kernels = crf.kernels(image, mask)

    def run():
        unary = logits.movedim(1, -1).contiguous().requires_grad_(True)
        pairwise = tuple(w.detach().clone().requires_grad_(True) for w in crf.pairwise(torch.float64))
        z = unary
        for _ in range(3):
            z = mean_field_step(unary, z, kernels, pairwise)
        (z * target.movedim(1, -1)).sum().backward()
        return [z.detach(), unary.grad, *(w.grad for w in pairwise)]

    calls = []
    step = fused_step.fixed_bandwidth_step
    monkeypatch.setattr(fused_step, "fixed_bandwidth_step", lambda *a: calls.append(1) or step(*a))
    fused = run()
    assert len(calls) == 3
    monkeypatch.setattr(fused_step, "applies", lambda kernels: False)
    for a, b in zip(fused, run()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert len(calls) == 3


def test_fused_iterations_without_the_unary_gradient():
    # Logits without gradient (a frozen network): only the matrices' gradients, through every iteration.
    crf, logits, image, mask, target = _layer_and_inputs(2, False, 3)
    results = []
    for fused in (True, False):
        crf.zero_grad()
        with pytest.MonkeyPatch.context() as patch:
            if not fused:
                patch.setattr(fused_step, "applies", lambda kernels: False)
                patch.setattr(fused_step, "learned_iterations", mean_field_steps)
            (crf(logits, image, mask) * target).sum().backward()
        results.append([p.grad.clone() for p in (crf.compatibility, crf.spatial_weight, crf.bilateral_weight)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fused_step_applies_only_with_fixed_bandwidths_and_symmetric_normalisation():
    image = torch.rand(1, 3, 5, 6) * 255
    for learn, normalization, expected in [(False, "symmetric", True), (True, "symmetric", False),
                                           (False, "after", False)]:
        crf = MeanFieldCRF(num_classes=3, learn_bandwidths=learn, normalization=normalization).train()
        assert fused_step.applies(crf.kernels(image)) == expected
    crf = MeanFieldCRF(num_classes=3).train()
    crf.log_theta_gamma.requires_grad_(False)  # θα, θβ still learned: not constant
    assert not fused_step.applies(crf.kernels(image))


@pytest.mark.parametrize("learn, normalization", [(True, "symmetric"), (False, "after")])
def test_fused_step_refuses_kernels_it_does_not_compute(learn, normalization):
    crf = MeanFieldCRF(num_classes=3, learn_bandwidths=learn, normalization=normalization).train()
    image, z = torch.rand(1, 3, 5, 6) * 255, torch.randn(1, 5, 6, 3)
    with pytest.raises(ValueError, match="symmetric normalisation and bandwidths without gradient"):
        fused_step.fixed_bandwidth_step(z, z, crf.kernels(image), crf.pairwise())
    with pytest.raises(ValueError, match="symmetric normalisation and bandwidths without gradient"):
        fused_step.fixed_bandwidth_iterations(z, crf.kernels(image), crf.pairwise(), 2)
    found = "bandwidths that require grad" if learn else "normalization='after'"  # only what fails is named
    with pytest.raises(ValueError, match=f"got {found}: use mean_field_step"):
        fused_step.fixed_bandwidth_step(z, z, crf.kernels(image), crf.pairwise())


@pytest.mark.parametrize("iterations", [0, -1, 2.0, True])
def test_fused_iterations_need_a_positive_count(iterations):
    crf = MeanFieldCRF(num_classes=3, learn_bandwidths=False).train()
    image, z = torch.rand(1, 3, 5, 6) * 255, torch.randn(1, 5, 6, 3)
    with pytest.raises(ValueError, match="iterations must be an int >= 1"):
        fused_step.fixed_bandwidth_iterations(z, crf.kernels(image), crf.pairwise(), iterations)


@pytest.mark.parametrize("iterations", [-1, 2.0, True, None])
def test_mean_field_steps_need_a_count(iterations):
    crf = MeanFieldCRF(num_classes=3).train()
    image, z = torch.rand(1, 3, 5, 6) * 255, torch.randn(1, 5, 6, 3)
    with pytest.raises(ValueError, match="iterations must be an int >= 0"):
        mean_field_steps(z, crf.kernels(image), crf.pairwise(), iterations)
    assert mean_field_steps(z, crf.kernels(image), crf.pairwise(), 0) is z


def test_fused_step_gradcheck():
    crf, logits, image, mask, _ = _layer_and_inputs(2, True, 3)
    kernels = crf.kernels(image, mask)
    unary = logits.movedim(1, -1).contiguous().requires_grad_(True)
    z = (unary.detach() * 0.7).requires_grad_(True)
    pairwise = tuple(w.detach().clone().requires_grad_(True) for w in crf.pairwise(torch.float64))
    assert fused_step.applies(kernels)
    torch.autograd.gradcheck(lambda u, x, a, b: fused_step.fixed_bandwidth_step(u, x, kernels, (a, b)),
                             (unary, z, *pairwise))
    torch.autograd.gradcheck(lambda u, a, b: fused_step.fixed_bandwidth_iterations(u, kernels, (a, b), 3),
                             (unary, *pairwise))


@pytest.mark.parametrize("bilateral_filter", ["lattice", "exact"])
@pytest.mark.parametrize("learn_bandwidths", [False, True])  # the fused node / the separate nodes
def test_training_under_torch_compile_matches_eager(learn_bandwidths, bilateral_filter):
    # Dynamo cannot trace the custom autograd nodes that hold the lattice: mean_field_step runs eagerly inside a
    # compiled model (before that, a compiled training step raised, and the fused node gave wrong values)
    torch.manual_seed(0)
    crf = MeanFieldCRF(num_classes=4, train_iterations=3, learn_bandwidths=learn_bandwidths,
                       bilateral_filter=bilateral_filter).train()
    logits = torch.randn(1, 4, 12, 14)
    image = torch.rand(1, 3, 12, 14) * 255
    results = []
    for layer in (crf, torch.compile(crf, backend="eager")):
        crf.zero_grad()
        z = logits.clone().requires_grad_(True)
        out = layer(z, image)
        out.square().mean().backward()
        results.append([out.detach(), z.grad] + [p.grad for p in crf.parameters() if p.grad is not None])
    assert len(results[0]) == len(results[1]) == 2 + (6 if learn_bandwidths else 3)
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)



@pytest.mark.parametrize(
    "spatial_dims, masked, sizes, learned",
    [(2, False, (6, 9), "all"), (2, True, (6, 9), "all"), (2, False, (40, 45), "all"),  # all / sampled pairs
     (3, True, (4, 5, 6), "all"), (2, True, (40, 45), "alpha beta"), (2, False, (6, 9), "gamma")],
)
def test_learned_iterations_equal_autograd_path(monkeypatch, spatial_dims, masked, sizes, learned):
    # The learned-bandwidth iterations as one node against mean_field_step through autograd's nodes: outputs and
    # the gradients of the logits and of every parameter (bandwidths included, the same sampled pairs) in float64.
    crf, _, image, _, _ = _layer_and_inputs(spatial_dims, masked, 4)
    crf.log_theta_alpha.requires_grad_(learned != "gamma")
    crf.log_theta_beta.requires_grad_(learned != "gamma")
    crf.log_theta_gamma.requires_grad_(learned != "alpha beta")
    g = torch.Generator().manual_seed(7)
    if sizes != image.shape[2:]:
        image = torch.rand(2, 3, *sizes, generator=g, dtype=torch.float64) * 255
    logits = torch.randn(2, 4, *sizes, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(2, *sizes, generator=g) > 0.25 if masked else None
    target = torch.randn(2, 4, *sizes, generator=g, dtype=torch.float64)

    def run():
        torch.manual_seed(3)  # the sampled pairs
        crf.zero_grad()
        z = logits.clone().requires_grad_(True)
        (crf(z, image, mask) * target).sum().backward()
        params = [p.grad.clone() for p in crf.parameters() if p.grad is not None]
        return [crf(z, image, mask).detach(), z.grad] + params, len(params)

    calls = []
    node = fused_step.learned_iterations
    monkeypatch.setattr(fused_step, "learned_iterations", lambda *a: calls.append(a[-1]) or node(*a))
    fused, count = run()
    assert calls and count == 6 - (2 if learned == "gamma" else 1 if learned == "alpha beta" else 0)
    monkeypatch.setattr(fused_step, "learned_iterations", mean_field_steps)
    for a, b in zip(fused, run()[0]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_learned_iterations_gradcheck():
    # Every input the node differentiates but the bandwidths of the lattice (its forward is piecewise in them):
    # z_0, both matrices, both normalisers (as free inputs) and θγ.
    import dataclasses

    crf, logits, image, mask, _ = _layer_and_inputs(2, True, 3)
    crf.log_theta_alpha.requires_grad_(False)
    crf.log_theta_beta.requires_grad_(False)
    kernels = crf.kernels(image, mask)
    g = torch.Generator().manual_seed(5)
    # Normalisers > 0 everywhere (the layer's are 0 on masked voxels, where torch.where stops their gradient and
    # the node returns 0 for them).
    norms = [0.2 + torch.rand(n.shape, generator=g, dtype=torch.float64) for n in (kernels.norm_spatial,
                                                                                    kernels.norm_bilateral)]
    inputs = [logits.movedim(1, -1).contiguous(), *crf.pairwise(torch.float64), *norms,
              torch.tensor(1.7, dtype=torch.float64)]
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]

    def node(unary, w_s, w_b, ns, nb, theta):
        changed = dataclasses.replace(kernels, norm_spatial=ns, norm_bilateral=nb, theta_gamma=theta)
        return fused_step.learned_iterations(unary, changed, (w_s, w_b), 2)

    assert torch.autograd.gradcheck(node, tuple(inputs))


def test_learned_iterations_need_the_symmetric_normalisation():
    crf = MeanFieldCRF(num_classes=3, normalization="after").train()
    image, z = torch.rand(1, 3, 5, 6) * 255, torch.randn(1, 5, 6, 3)
    with pytest.raises(ValueError, match="symmetric normalisation"):
        fused_step.learned_iterations(z, crf.kernels(image), crf.pairwise(), 2)
    kernels = MeanFieldCRF(num_classes=3).train().kernels(image)
    with pytest.raises(ValueError, match="iterations must be an int >= 1"):
        fused_step.learned_iterations(z, kernels, crf.pairwise(), 0)


@pytest.mark.parametrize("learn_bandwidths", [False, True])  # the fixed / the learned node
def test_second_backward_through_a_retained_graph(learn_bandwidths):
    # The nodes release each iteration's arrays during backward; a second backward (retain_graph=True, e.g. two
    # losses on one output) recomputes them and gives the same gradients.
    crf, logits, image, mask, target = _layer_and_inputs(2, True, 3)
    crf.log_theta_alpha.requires_grad_(learn_bandwidths)
    crf.log_theta_beta.requires_grad_(learn_bandwidths)
    crf.log_theta_gamma.requires_grad_(learn_bandwidths)
    z = logits.clone().requires_grad_(True)
    torch.manual_seed(0)
    out = crf(z, image, mask)
    params = [z] + [p for p in crf.parameters() if p.requires_grad]
    first = torch.autograd.grad((out * target).sum(), params, retain_graph=True)
    second = torch.autograd.grad((out * target).sum(), params)
    assert len(first) == 1 + (6 if learn_bandwidths else 3)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("learn_bandwidths", [False, True])
@pytest.mark.parametrize("layout", ["channels first", "channels last"])
def test_backward_leaves_the_incoming_gradient_alone(learn_bandwidths, layout):
    # The nodes sum z_0's gradient in place into an array of their own: a contiguous copy of the incoming
    # gradient, never the caller's tensor (which arrives as it is when its memory is already channels-last).
    crf, logits, image, mask, target = _layer_and_inputs(2, True, 3)
    for p in (crf.log_theta_alpha, crf.log_theta_beta, crf.log_theta_gamma):
        p.requires_grad_(learn_bandwidths)
    gradient = target if layout == "channels first" else target.contiguous(memory_format=torch.channels_last)
    before = gradient.clone()
    z = logits.clone().requires_grad_(True)
    torch.manual_seed(0)
    out = crf(z, image, mask)
    (grad_z,) = torch.autograd.grad(out, z, gradient)
    assert torch.equal(gradient, before)
    z_reference = logits.clone().requires_grad_(True)
    torch.manual_seed(0)
    expected = torch.autograd.grad(crf(z_reference, image, mask), z_reference, target.clone())[0]
    torch.testing.assert_close(grad_z, expected, rtol=1e-12, atol=1e-14)
