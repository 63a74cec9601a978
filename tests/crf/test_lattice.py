"""The permutohedral lattice against a brute-force Gaussian, against densecrf's lattice, and its adjoint."""

import contextlib

import numpy as np
import pytest
import torch

from crfrnn_deeplab.crf import lattice as permutohedral
from crfrnn_deeplab.crf import routes
from crfrnn_deeplab.crf.reference import dense_gaussian
from crfrnn_deeplab.crf.lattice import build_lattice, lattice_gaussian
from crfrnn_deeplab.crf.sparse_rows import BlockedRows, stacked
from crfrnn_deeplab.images import all_finite

dcrf = pytest.importorskip("pydensecrf.densecrf")


def densecrf_lattice_filter(features: np.ndarray, values: np.ndarray) -> np.ndarray:
    """densecrf's own lattice ``K v`` (features [N, d], values [N]), read back from one mean-field step.

    With zero unaries, one Potts kernel of weight 1 and no normalisation, a step gives
    ``Q_l ∝ exp((K Q_in)_l)``; with ``Q_in = (0, v)`` the log-ratio of the two outputs is ``(K v)``.
    """
    n = features.shape[0]
    crf = dcrf.DenseCRF(n, 2)
    crf.setUnaryEnergy(np.zeros((2, n), np.float32))
    crf.addPairwiseEnergy(
        np.ascontiguousarray(features.T, dtype=np.float32),
        compat=1.0,
        kernel=dcrf.DIAG_KERNEL,
        normalization=dcrf.NO_NORMALIZATION,
    )
    _, tmp1, tmp2 = crf.startInference()
    q = np.zeros((2, n), np.float32)
    q[1] = values
    q = dcrf.eigen.matrixXf(q)
    crf.stepInference(q, tmp1, tmp2)
    out = np.array(q, dtype=np.float64)
    return np.log(out[1] / out[0])


def image_features(rng: np.random.Generator, h: int, w: int, d: int) -> np.ndarray:
    """Pixel positions plus (d - 2) smooth 'colour' channels with edges, scaled like a CRF would."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    chans = [xs / 4.0, ys / 4.0]
    for _ in range(d - 2):
        level = rng.uniform(0, 255, 4)[(ys > h / 2).astype(int) * 2 + (xs > w / 3).astype(int)]
        chans.append((level + rng.normal(0, 6, (h, w))) / 20.0)
    return np.stack(chans, -1).reshape(-1, d)


@pytest.mark.parametrize("d", [2, 5])
@pytest.mark.parametrize("kind", ["random", "image"])
def test_lattice_matches_brute_force_as_well_as_densecrf(d, kind):
    rng = np.random.default_rng(d)
    if kind == "random":
        feats = rng.normal(0, 1.5, (400, d))
    else:
        feats = image_features(rng, 20, 24, d)
    values = rng.uniform(0.0, 1.0, feats.shape[0])
    exact = dense_gaussian(torch.tensor(feats)) @ torch.tensor(values)
    lattice = build_lattice(torch.tensor(feats).T[None])
    ours = lattice.filter(torch.tensor(values)[None, :, None])[0, :, 0]
    theirs = torch.tensor(densecrf_lattice_filter(feats, values))
    err_ours = float((ours - exact).norm() / exact.norm())
    err_theirs = float((theirs - exact).norm() / exact.norm())
    # Same algorithm: the same approximation, to float32 rounding of densecrf's arithmetic.
    assert err_ours <= err_theirs * 1.001 + 1e-5, (err_ours, err_theirs)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_lattice_is_exact_for_coincident_points():
    # Points on one lattice vertex: K is then alpha·(blurred self-weight) times the all-ones matrix.
    feats = torch.zeros(1, 3, 10, dtype=torch.float64)
    v = torch.rand(1, 10, 2, dtype=torch.float64)
    out = build_lattice(feats).filter(v)
    assert torch.allclose(out, out[:, :1].expand_as(out))
    assert torch.allclose(out[0, 0] / v[0].sum(0), (out[0, 0] / v[0].sum(0))[0].expand(2))


def test_barycentric_weights_are_a_partition_of_unity_in_float32():
    # Pixel grids over a constant colour (the padding of a training crop) gave weights of -6e-8 in float32,
    # and then a negative K·mask and a NaN normaliser.
    ys, xs = torch.meshgrid(torch.arange(129.0), torch.arange(129.0), indexing="ij")
    colour = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1).expand(3, 129, 129)
    lattice = build_lattice(torch.cat([torch.stack([xs, ys]) / 20.0, colour / 30.0])[None])
    splat = lattice.splat.to_dense()  # 16 641 points: a blocked splat
    assert splat.min() >= 0
    torch.testing.assert_close(splat.sum(0), torch.ones(129 * 129), rtol=0, atol=1e-6)
    assert (lattice.filter(torch.ones(1, 129 * 129, 1)) > 0).all()


def test_transpose_is_the_adjoint():
    torch.manual_seed(0)
    feats = torch.randn(2, 5, 7, 9, dtype=torch.float64) * 2
    lattice = build_lattice(feats)
    v = torch.randn(2, 63, 3, dtype=torch.float64)
    g = torch.randn(2, 63, 3, dtype=torch.float64)
    lhs = (lattice.filter(v) * g).sum()
    rhs = (v * lattice.filter(g, transpose=True)).sum()
    torch.testing.assert_close(lhs, rhs)
    assert not torch.allclose(lattice.filter(v), lattice.filter(v, transpose=True))


def test_gradcheck_values():
    torch.manual_seed(0)
    raw = torch.randn(2, 6, 3, dtype=torch.float64) * 3
    scale = torch.tensor([0.5, 0.7, 1.1], dtype=torch.float64)
    lattice = build_lattice((raw * scale).transpose(1, 2))
    v = torch.randn(2, 6, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: lattice_gaussian(x, raw, scale, lattice), (v,))


def test_gradcheck_mixed_weighted_lattice():
    # The folded form the CRF uses with fixed bandwidths: diag(n) K diag(n) v @ mix, mixed on the lattice.
    torch.manual_seed(0)
    raw = torch.randn(2, 6, 3, dtype=torch.float64) * 3
    scale = torch.tensor([0.5, 0.7, 1.1], dtype=torch.float64)
    n = torch.rand(2, 6, dtype=torch.float64) + 0.5
    lattice = build_lattice((raw * scale).transpose(1, 2)).weighted(n, n)
    v = torch.randn(2, 6, 2, dtype=torch.float64, requires_grad=True)
    mix = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, m: lattice_gaussian(x, raw, scale, lattice, mix=m), (v, mix))
    dense = n[..., None] * build_lattice((raw * scale).transpose(1, 2)).filter(n[..., None] * v.detach())
    torch.testing.assert_close(lattice_gaussian(v, raw, scale, lattice, mix=mix).detach(), dense @ mix.detach())


def test_scale_gradient_matches_exact_gaussian_derivative():
    # ∂/∂s Σ g ⊙ K(s) v with the lattice's K replaced by the exact kernel in the moment expansion: compare
    # against the exact kernel's analytic derivative (the lattice only approximates K itself).
    torch.manual_seed(1)
    raw = torch.randn(1, 200, 2, dtype=torch.float64) * 2
    scale = torch.tensor([0.6, 0.9], dtype=torch.float64, requires_grad=True)
    v = torch.rand(1, 200, 3, dtype=torch.float64)
    g = torch.rand(1, 200, 3, dtype=torch.float64)
    lattice = build_lattice((raw * scale.detach()).transpose(1, 2))
    (lattice_gaussian(v, raw, scale, lattice) * g).sum().backward()
    exact_scale = scale.detach().clone().requires_grad_(True)
    ((dense_gaussian(raw[0] * exact_scale) @ v[0]) * g[0]).sum().backward()
    cos = torch.nn.functional.cosine_similarity(scale.grad, exact_scale.grad, dim=0)
    assert cos > 0.99, (scale.grad, exact_scale.grad)
    # The same with a channel mix applied on the lattice.
    mix = torch.rand(3, 2, dtype=torch.float64)
    scale.grad = None
    (lattice_gaussian(v, raw, scale, lattice, mix=mix) * g[..., :2]).sum().backward()
    exact_scale.grad = None
    ((dense_gaussian(raw[0] * exact_scale) @ v[0] @ mix) * g[0, :, :2]).sum().backward()
    assert torch.nn.functional.cosine_similarity(scale.grad, exact_scale.grad, dim=0) > 0.99


def test_batch_has_no_cross_talk():
    torch.manual_seed(0)
    feats = torch.randn(2, 5, 6, 7) * 2
    feats[1] = feats[0] + 0.01  # nearly identical images: a shared lattice would mix them
    v = torch.rand(2, 42, 4)
    together = build_lattice(feats).filter(v)
    for i in range(2):
        alone = build_lattice(feats[i : i + 1]).filter(v[i : i + 1])
        torch.testing.assert_close(together[i : i + 1], alone)


def test_points_off_the_lattice_neither_send_nor_receive():
    rng = np.random.default_rng(5)
    feats = torch.tensor(rng.normal(0, 2.0, (2, 3, 90)))
    valid = torch.tensor(rng.uniform(size=(2, 90)) < 0.6)
    values = torch.tensor(rng.uniform(size=(2, 90, 4)))
    out = build_lattice(feats, valid).filter(values)
    assert (out[~valid] == 0).all()
    for i in range(2):  # each image's valid points alone: the same filter, bit for bit up to summation order
        alone = build_lattice(feats[i : i + 1, :, valid[i]]).filter(values[i : i + 1, valid[i]])
        torch.testing.assert_close(out[i, valid[i]], alone[0], rtol=1e-12, atol=1e-12)
    everything = build_lattice(feats).filter(values)
    assert (everything[valid] - out[valid]).abs().max() > 1e-3  # the invalid points did change the lattice


@pytest.mark.parametrize("valid, match", [(torch.ones(2, 42, dtype=torch.bool), r"matching features \(1, 5, 6, 7\)"),
                                          (torch.ones(1, 42), "bool Tensor"),
                                          # the same count of points, another grid: was taken, rows for columns
                                          (torch.ones(1, 7, 6, dtype=torch.bool), r"got \(1, 7, 6\)")])
def test_bad_valid_mask(valid, match):
    with pytest.raises(ValueError, match=match):
        build_lattice(torch.randn(1, 5, 6, 7), valid)


def test_a_lists_mask_may_have_any_grid_of_its_points():
    feats, valid = torch.randn(2, 4, 60, dtype=torch.float64), torch.rand(2, 60) < 0.7
    values = torch.rand(2, 60, 3, dtype=torch.float64)
    torch.testing.assert_close(build_lattice(feats, valid.view(2, 3, 4, 5)).filter(values),
                               build_lattice(feats, valid).filter(values), rtol=0, atol=0)


def test_filtering_names_values_and_scales_that_do_not_fit_the_lattice():
    raw = torch.randn(2, 6, 3, dtype=torch.float64) * 3
    scale = torch.tensor([0.5, 0.7, 1.1], dtype=torch.float64)
    lattice = build_lattice((raw * scale).transpose(1, 2))
    v = torch.randn(2, 6, 2, dtype=torch.float64)
    for bad in (v[:1], v[:, :5], v[0]):
        with pytest.raises(ValueError, match=r"values must be a Tensor\[B, N, C\] = \[2, 6, C\]"):
            lattice.filter(bad)
    with pytest.raises(ValueError, match=r"scale must be a Tensor\[d\] = \[3\]"):
        lattice_gaussian(v, raw, scale[:2], lattice)
    with pytest.raises(ValueError, match=r"raw_features must be the lattice's Tensor\[B, N, d\] = \[2, 6, 3\]"):
        lattice_gaussian(v, raw[:, :, :2], scale, lattice)
    with pytest.raises(ValueError, match="transpose needs a symmetric one"):
        lattice.weighted(torch.ones(2, 6, dtype=torch.float64), torch.full((2, 6), 2.0, dtype=torch.float64)).filter(
            v, transpose=True)


def test_unpackable_keys_fall_back_to_row_unique(monkeypatch):
    torch.manual_seed(0)
    feats = torch.randn(2, 5, 40, dtype=torch.float64) * 3
    v = torch.rand(2, 40, 3, dtype=torch.float64)
    packed = build_lattice(feats).filter(v)
    monkeypatch.setattr(permutohedral, "_PACK_LIMIT", 0)
    rows = build_lattice(feats)
    assert rows.num_vertices == build_lattice(feats[:1]).num_vertices + build_lattice(feats[1:]).num_vertices
    torch.testing.assert_close(rows.filter(v), packed)


def test_lattice_is_the_same_without_packed_sorts(monkeypatch):
    # the packed sorts (vertex numbering, the splat's order) against numpy's unique and stable argsort
    torch.manual_seed(0)
    feats = torch.randn(1, 5, 500, dtype=torch.float64) * 3
    v = torch.rand(1, 500, 3, dtype=torch.float64)
    short = build_lattice(feats)
    monkeypatch.setattr(permutohedral, "_PACKED_SORT_BITS", 0)
    monkeypatch.setattr(permutohedral, "_NARROW_KEYS", 0)  # int64 remainder-0 points as well
    wide = build_lattice(feats)
    assert torch.equal(short.slice.to_dense(), wide.slice.to_dense())
    assert torch.equal(short.splat.to_dense(), wide.splat.to_dense())
    torch.testing.assert_close(short.filter(v), wide.filter(v), rtol=0, atol=0)


@pytest.mark.parametrize("masked", [False, True])
def test_splat_rows_list_their_points_in_ascending_order(masked):
    # the splat sorts each column of vertex ids on its own; its rows must still be the slice's transpose with
    # every row's points in ascending order (the order the sums run in)
    torch.manual_seed(0)
    feats = torch.randn(2, 5, 300) * 2
    valid = torch.rand(2, 300) > 0.3 if masked else None
    lattice = build_lattice(feats, valid)
    splat, slice_ = lattice.splat, lattice.slice
    vertex, entry = torch.sort(slice_.columns.long(), stable=True)
    assert torch.equal(splat.offsets.long(), torch.searchsorted(vertex, torch.arange(lattice.num_vertices + 1)))
    assert torch.equal(splat.columns.long(), slice_.rows()[entry])
    assert torch.equal(splat.weights * lattice.alpha, slice_.weights[entry])


@pytest.mark.parametrize("masked", [False, True])
def test_blocked_splat_sums_each_vertex_block_by_block(masked, monkeypatch):
    # Above _SPLAT_BLOCK points the CPU splat is split into parts, one per (block of points, vertex): each part
    # lists its block's points in ascending order, and the combine sums a vertex's parts in block order; the
    # product is the plain splat's (the slice's transpose) up to the order of the additions.
    torch.manual_seed(0)
    feats = torch.randn(2, 5, 300, dtype=torch.float64) * 0.3  # ~150 vertices: fewer than a block's 64·6 entries
    valid = torch.rand(2, 300) > 0.3 if masked else None
    v = torch.rand(600, 3, dtype=torch.float64)
    plain = build_lattice(feats, valid)
    monkeypatch.setattr(permutohedral, "_SPLAT_BLOCK", 64)
    lattice = build_lattice(feats, valid)
    # more vertices than a block has entries: parts of one entry or so would not pay, the splat stays plain
    assert isinstance(build_lattice(feats * 7, valid).splat, permutohedral.SparseRows)
    splat, kept = lattice.splat, int(plain.slice.offsets.diff().gt(0).sum())
    assert isinstance(plain.splat, permutohedral.SparseRows) and isinstance(splat, BlockedRows)
    parts, combine = splat.parts, splat.combine
    order = torch.cumsum(plain.slice.offsets.diff().gt(0), 0) - 1  # each point's rank among the kept ones
    part_block = order[parts.columns.long()][parts.offsets[:-1].long()] // 64
    for r in range(parts.num_rows):  # one block per part, ascending points
        points = parts.columns[parts.offsets[r] : parts.offsets[r + 1]].long()
        assert points.numel() > 0 and (points.diff() > 0).all() and (order[points] // 64 == part_block[r]).all()
    assert (part_block.diff() >= 0).all()  # parts stored block after block
    for vertex in range(combine.num_rows):  # a vertex's parts in block order, unit weights
        own = combine.columns[combine.offsets[vertex] : combine.offsets[vertex + 1]].long()
        assert (part_block[own].diff() > 0).all()
    assert (combine.weights == 1).all() and combine.num_columns == parts.num_rows
    assert int(part_block.max()) == (kept - 1) // 64
    torch.testing.assert_close(splat.to_dense(), plain.splat.to_dense(), rtol=0, atol=1e-15)
    torch.testing.assert_close(lattice.filter(v.view(2, 300, 3)), plain.filter(v.view(2, 300, 3)), rtol=1e-12, atol=0)


@pytest.mark.parametrize("case", ["steps", "random", "masked"])
def test_blocked_splat_has_one_part_per_block_and_vertex(case, monkeypatch):
    # The parts are exactly the (block of points, vertex) pairs with entries, block by block, and each vertex's
    # parts are combined in block order. On steps (1-D features constant within each block of points, rising from
    # block to block by about a vertex spacing) a block's largest vertex is often the next block's smallest, so
    # the entries sorted by vertex within each block run on across the block's end with one vertex: the run must
    # split there.
    monkeypatch.setattr(permutohedral, "_SPLAT_BLOCK", 64)
    g = torch.Generator().manual_seed(5)
    valid = None
    if case == "steps":
        feats = (torch.arange(1000, dtype=torch.float64) // 64 * 0.85).view(1, 1, -1)
    else:
        feats = torch.randn(2, 4, 700, generator=g, dtype=torch.float64) * 0.3
        valid = torch.rand(2, 700, generator=g) > 0.4 if case == "masked" else None
    lattice = build_lattice(feats, valid)
    splat, m = lattice.splat, lattice.num_vertices
    assert isinstance(splat, BlockedRows)
    rank = torch.cumsum(lattice.slice.offsets.diff().gt(0), 0) - 1  # each point's rank among those on the lattice
    block, vertex = rank[lattice.slice.rows()] // 64, lattice.slice.columns.long()
    pairs, counts = torch.unique(block * m + vertex, return_counts=True)  # block-major, then vertex
    part_vertex = pairs % m
    assert torch.equal(splat.parts.offsets.diff().long(), counts)
    assert torch.equal(splat.combine.columns.long(), torch.sort(part_vertex, stable=True).indices)
    assert torch.equal(splat.combine.offsets.diff().long(), torch.bincount(part_vertex, minlength=m))
    if case == "steps":  # the case the test is for is there
        largest = torch.zeros(int(block.max()) + 1, dtype=torch.long).scatter_reduce(0, block, vertex, "amax")
        smallest = torch.full_like(largest, m).scatter_reduce(0, block, vertex, "amin")
        assert (largest[:-1] == smallest[1:]).any()


def test_lattice_does_not_depend_on_the_thread_count():
    from crfrnn_deeplab.crf.threads import set_inference_threads, thread_policy

    feats = torch.randn(1, 5, 40_000, generator=torch.Generator().manual_seed(0))
    threads, policy = torch.get_num_threads(), thread_policy()
    for scale in (4, 1):  # 198 k vertices (a plain splat), 7.7 k (a blocked one)
        lattices = []
        try:
            torch.set_num_threads(2)
            for chosen in (1, 2):
                set_inference_threads(chosen)
                lattices.append(build_lattice(feats * scale))
        finally:
            torch.set_num_threads(threads)
            set_inference_threads(policy)
        one, two = lattices
        assert isinstance(one.splat, BlockedRows) == (scale == 1)
        pairs = [(one.splat.parts, two.splat.parts), (one.splat.combine, two.splat.combine)] if scale == 1 else [
            (one.splat, two.splat)]
        for a, b in [*pairs, (one.slice, two.slice), *zip(one.blur, two.blur)]:
            assert torch.equal(a.columns, b.columns) and torch.equal(a.offsets, b.offsets)
            assert torch.equal(a.weights, b.weights)


@pytest.mark.parametrize("k", range(1, 8))
def test_sort_columns_sorts_every_column(k):
    # 0-1 principle: a comparator network that sorts every 0/1 column sorts every column
    bits = ((torch.arange(2**k)[:, None] >> torch.arange(k)) & 1).T.double()  # [k, 2^k]: every 0/1 column
    torch.testing.assert_close(torch.stack(permutohedral._sort_columns(bits)), bits.sort(0).values, rtol=0, atol=0)
    x = torch.randint(0, 4, (k, 300)).float()  # with ties
    torch.testing.assert_close(torch.stack(permutohedral._sort_columns(x)), x.sort(0).values, rtol=0, atol=0)


@pytest.mark.parametrize("k", [1, 2, 5, 64, 65])
def test_rank_descending_is_a_stable_descending_sort(k):
    # int8 ranks up to 64 rows, int16 above; ties (few distinct values) go to the earlier row, as in densecrf
    g = torch.Generator().manual_seed(k)
    x = torch.randint(0, 3, (k, 200), generator=g).float()
    rank = permutohedral._rank_descending(x)
    assert rank.dtype == (torch.int8 if k <= 64 else torch.int16)
    order = torch.from_numpy(np.argsort(-x.numpy(), axis=0, kind="stable"))  # row of the r-th largest
    expected = torch.empty_like(order)
    expected.scatter_(0, order, torch.arange(k)[:, None].expand(k, 200).contiguous())
    assert torch.equal(rank.long(), expected)


def test_float32_matches_float64():
    torch.manual_seed(0)
    feats = torch.randn(1, 5, 300, dtype=torch.float64) * 2
    v = torch.rand(1, 300, 3, dtype=torch.float64)
    out64 = build_lattice(feats).filter(v)
    out32 = build_lattice(feats.float()).filter(v.float())
    torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros(5, 3), "Tensor\\[B, d, H, W\\]"),
        (torch.zeros(1, 2, 4, dtype=torch.long), "floating-point"),
        (torch.full((1, 2, 4), float("nan")), "NaN"),
        # finite, but beyond what the int64 vertex keys hold (the filter used to come out silently wrong)
        (torch.tensor([[[0.0, 1.0, 2.0, 3e18]]]), r"features reach 3e\+18 in magnitude, beyond the 1.15e\+18 .*d = 1"),
    ],
)
def test_bad_features(bad, match):
    with pytest.raises(ValueError, match=match):
        build_lattice(bad)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    feats = torch.randn(2, 5, 30, 40) * 2
    v = torch.rand(2, 1200, 6)
    cpu = build_lattice(feats).filter(v)
    gpu = build_lattice(feats.cuda()).filter(v.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)


def test_all_finite_checks_every_entry_even_when_the_sum_overflows():
    big = torch.full((4,), 3e38)  # finite, but the sum is inf in float32
    assert all_finite(big)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = big.clone()
        x[2] = bad
        assert not all_finite(x)
        assert not all_finite(torch.tensor([1.0, bad, 2.0]))


@pytest.mark.parametrize("blocked", [False, True])
def test_lattice_operators_equal_their_dense_matrices(blocked, monkeypatch):
    # The embedding_bag products against explicit matrices, with points off the lattice (empty slice rows).
    if blocked:
        monkeypatch.setattr(permutohedral, "_SPLAT_BLOCK", 16)
    torch.manual_seed(0)
    feats = torch.randn(2, 3, 40, dtype=torch.float64) * (0.3 if blocked else 2)  # blocked: fewer vertices
    valid = torch.rand(2, 40) < 0.7
    lattice = build_lattice(feats, valid)
    assert isinstance(lattice.splat, BlockedRows) == blocked
    v = torch.rand(80, 4, dtype=torch.float64)
    splat, slice_ = lattice.splat.to_dense(), lattice.slice.to_dense()
    assert splat.shape == (lattice.num_vertices, 80) and slice_.shape == (80, lattice.num_vertices)
    assert (slice_[~valid.reshape(-1)] == 0).all() and (splat[:, ~valid.reshape(-1)] == 0).all()
    torch.testing.assert_close(slice_, lattice.alpha * splat.T)  # symmetric: slice = alpha·splatᵀ
    on_lattice = torch.rand(lattice.num_vertices, 4, dtype=torch.float64)
    for blur in lattice.blur:
        matrix = blur.to_dense()
        torch.testing.assert_close(matrix, matrix.T)  # I + (P + Pᵀ)/2
        assert torch.equal(matrix.diagonal(), torch.ones(lattice.num_vertices, dtype=torch.float64))
        torch.testing.assert_close(blur @ on_lattice, matrix @ on_lattice)
        splat = matrix @ splat  # the blurs follow the splat, direction 0 first
    torch.testing.assert_close(lattice.filter(v.view(2, 40, 4)).view(80, 4), slice_ @ splat @ v)


@pytest.mark.parametrize("blocked", [False, True])
def test_sparse_rows_scale_rows_and_columns(blocked, monkeypatch):
    if blocked:
        monkeypatch.setattr(permutohedral, "_SPLAT_BLOCK", 8)
    torch.manual_seed(0)
    feats = torch.randn(1, 3, 30, dtype=torch.float64) * (0.2 if blocked else 2)  # blocked: fewer vertices
    valid = torch.rand(1, 30) < 0.7
    for lattice in (build_lattice(feats), build_lattice(feats, valid)):  # fixed and variable row lengths
        assert isinstance(lattice.splat, BlockedRows) == blocked
        for rows in (lattice.splat, lattice.slice):
            dense = rows.to_dense()
            left, right = torch.rand(dense.shape[0], dtype=torch.float64), torch.rand(dense.shape[1], dtype=torch.float64)
            torch.testing.assert_close(rows.scale_rows(left).to_dense(), left[:, None] * dense)
            torch.testing.assert_close(rows.scale_columns(right).to_dense(), dense * right)


def test_sparse_rows_selection_is_the_0_1_matrix_it_names():
    present = torch.tensor([False, True, True, False, True])
    columns = torch.tensor([3, 0, 2], dtype=torch.int32)
    chosen = permutohedral.SparseRows.selection(columns, present, 4, torch.float64)
    expected = torch.zeros(5, 4, dtype=torch.float64)
    expected[1, 3] = expected[2, 0] = expected[4, 2] = 1.0
    assert torch.equal(chosen.to_dense(), expected) and chosen.row_length is None
    every = permutohedral.SparseRows.selection(columns, None, 4, torch.float32)
    assert torch.equal(every.to_dense(), torch.eye(4)[[3, 0, 2]]) and every.row_length == 1
    with pytest.raises(ValueError, match=r"present must mark one row per column \(3\), got 2 rows"):
        permutohedral.SparseRows.selection(columns, torch.tensor([True, False, True]), 4, torch.float32)


def _random_rows(num_rows, num_columns, seed, dtype=torch.int32):
    """A SparseRows with rows of 0–3 entries (some empty) and its dense matrix."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 4, (num_rows,), generator=g)
    offsets = torch.zeros(num_rows + 1, dtype=torch.long)
    torch.cumsum(counts, 0, out=offsets[1:])
    columns = torch.randint(0, num_columns, (int(offsets[-1]),), generator=g)
    rows = permutohedral.SparseRows(columns.to(dtype), offsets.to(dtype),
                                    torch.rand(columns.numel(), generator=g, dtype=torch.float64), num_columns)
    return rows, rows.to_dense()


def test_sparse_rows_beside_spread_and_stacked_are_the_matrices_they_name(monkeypatch):
    left, left_dense = _random_rows(9, 5, 0)
    right, right_dense = _random_rows(9, 4, 1)
    whole = left.beside(right)
    assert torch.equal(whole.to_dense(), torch.cat([left_dense, right_dense], 1))
    x = torch.rand(9, 3, dtype=torch.float64)
    torch.testing.assert_close(whole @ x, torch.cat([left_dense, right_dense], 1) @ x, rtol=1e-15, atol=0)
    rows = torch.tensor([0, 2, 3, 7, 8, 10, 11, 12, 14])
    spread = left.spread_rows(rows, 16)
    expected = torch.zeros(16, 5, dtype=torch.float64)
    expected[rows] = left_dense
    assert torch.equal(spread.to_dense(), expected)
    bottom, bottom_dense = _random_rows(6, 5, 2)
    assert torch.equal(stacked(left, bottom).to_dense(), torch.cat([left_dense, bottom_dense]))
    # a blocked splat stays blocked, its parts' sums and the new rows one product
    monkeypatch.setattr(permutohedral, "_SPLAT_BLOCK", 8)
    torch.manual_seed(0)
    blocked = build_lattice(torch.randn(1, 3, 30, dtype=torch.float64) * 0.2).splat
    assert isinstance(blocked, BlockedRows)
    extra, extra_dense = _random_rows(4, 30, 3)
    both = stacked(blocked, extra)
    assert isinstance(both, BlockedRows)
    torch.testing.assert_close(both.to_dense(), torch.cat([blocked.to_dense(), extra_dense]), rtol=0, atol=1e-15)
    x = torch.rand(30, 2, dtype=torch.float64)
    torch.testing.assert_close(both @ x, torch.cat([blocked @ x, extra_dense @ x]), rtol=1e-14, atol=0)


def test_sparse_rows_beside_spread_and_stacked_name_bad_input():
    rows, _ = _random_rows(5, 4, 0)
    with pytest.raises(ValueError, match="right must be a SparseRows of 5 rows, got 6"):
        rows.beside(_random_rows(6, 4, 1)[0])
    with pytest.raises(ValueError, match="rows must give the new row of each of the 5 rows"):
        rows.spread_rows(torch.arange(4), 9)
    with pytest.raises(ValueError, match=r"rows must ascend strictly within \[0, 9\)"):
        rows.spread_rows(torch.tensor([0, 1, 1, 2, 3]), 9)
    with pytest.raises(ValueError, match=r"within \[0, 4\)"):
        rows.spread_rows(torch.arange(5), 4)
    with pytest.raises(ValueError, match="stacked rows need the same columns, got 4 and 3"):
        stacked(rows, _random_rows(2, 3, 1)[0])
    with pytest.raises(TypeError, match="stacked takes SparseRows"):
        stacked(rows, rows.to_dense())


def test_sparse_rows_reject_bad_input():
    rows = build_lattice(torch.randn(1, 2, 30)).slice  # Tensor[30, M]
    m = rows.num_columns
    with pytest.raises(ValueError, match=f"Tensor\\[{m}, C\\]"):
        rows @ torch.rand(m + 1, 3)  # wrong number of rows
    with pytest.raises(ValueError, match="float32"):
        rows @ torch.rand(m, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="Tensor\\["):
        rows @ torch.rand(m)
    with pytest.raises(TypeError, match="int32 or int64"):
        permutohedral.SparseRows(rows.columns.float(), rows.offsets, rows.weights, m)
    with pytest.raises(ValueError, match="weights"):
        permutohedral.SparseRows(rows.columns, rows.offsets, rows.weights[1:], m)
    with pytest.raises(ValueError, match="1-D"):
        permutohedral.SparseRows(rows.columns.view(-1, 1), rows.offsets, rows.weights, m)
    for bad in (torch.rand(m + 1), torch.rand(m - 1), torch.rand(m, dtype=torch.float64)):
        with pytest.raises(ValueError, match=f"K = {m} values"):
            rows.scale_columns(bad)
    with pytest.raises(ValueError, match="R = 30 values"):
        rows.scale_rows(torch.rand(31))


@pytest.mark.parametrize("route", ["numpy", "torch", "generic"])
@pytest.mark.parametrize("num_keys", [5, 2**15, 2**16, 2**16 + 1, 2**20, 2**33, 2**55])
@pytest.mark.parametrize("block", [None, 7, 1000])
def test_stable_sort_is_stable_within_each_block(num_keys, block, route, monkeypatch):
    # The splat's sort, by either route of the CPU's: torch's stable sort, or numpy's sort of packed int32 scalars
    # (few keys), int64 (more), numpy's stable argsort (2^55 keys: too wide); or by the generic route (other
    # devices). It gives the order and the keys in that order, in the keys' dtype.
    generic = route == "generic"
    monkeypatch.setattr(permutohedral, "_SORT_ROUTE", "numpy" if generic else route)
    g = torch.Generator().manual_seed(num_keys % 1000)
    keys = torch.randint(0, num_keys, (3001,), generator=g, dtype=torch.long)
    keys[::3] = keys[1]  # ties, whose order must be kept
    keys[5] = num_keys - 1  # the largest key
    for dtype in (torch.int32, torch.long) if num_keys < 2**31 else (torch.long,):
        with routes.generic_routes() if generic else contextlib.nullcontext():
            order, ordered = permutohedral._stable_sort(keys.to(dtype), num_keys, block)
        size = keys.numel() if block is None else block
        expected = torch.cat([torch.from_numpy(np.argsort(keys[s : s + size].numpy(), kind="stable")) + s
                              for s in range(0, keys.numel(), size)])
        assert torch.equal(order, expected)
        assert ordered.dtype == dtype and torch.equal(ordered, keys.to(dtype)[expected])


@pytest.mark.parametrize("span, dtype, low", [(1, torch.int32, 0), (7, torch.int32, 0), (2**20, torch.int32, -5),
                                              (2**30, torch.int32, 0), (7, torch.int64, 0), (2**40, torch.int64, 0),
                                              (2**62, torch.int64, 0), (7, torch.int64, 2**40)])
@pytest.mark.parametrize("route", ["numpy", "torch"])
def test_unique_matches_numpy(span, dtype, low, route, monkeypatch):
    # torch's stable sort, or numpy's sort of packed int32 / int64 scalars (also a narrow span of large codes), or
    # (span 2^62 × 2^12 entries: too wide) numpy's argsort
    monkeypatch.setattr(permutohedral, "_SORT_ROUTE", route)
    g = torch.Generator().manual_seed(span % 997)
    x = torch.randint(0, span, (40, 101), generator=g, dtype=torch.long).add_(low - span // 3).to(dtype)
    x[3, :7] = x[0, 0]  # repeated values
    values, inverse = permutohedral._unique(x)
    expected_values, expected_inverse = np.unique(x.numpy(), return_inverse=True)
    assert values.dtype == x.dtype and torch.equal(values, torch.from_numpy(expected_values))
    assert inverse.shape == x.shape and torch.equal(inverse.long(), torch.from_numpy(expected_inverse).view(x.shape))


def test_sort_route_is_measured_once_and_changes_no_lattice(monkeypatch):
    # The route is timed on the first sort of the process and kept; a lattice built by either route is the same.
    monkeypatch.setattr(permutohedral, "_SORT_ROUTE", None)
    route = permutohedral._sort_route()
    assert route in ("numpy", "torch") and permutohedral._SORT_ROUTE == route
    assert permutohedral._sort_route() == route
    features = torch.rand(2, 5, 23, 31, generator=torch.Generator().manual_seed(3)) * 9
    built = {}
    for other in ("numpy", "torch"):
        monkeypatch.setattr(permutohedral, "_SORT_ROUTE", other)
        lattice = build_lattice(features)
        built[other] = (lattice.num_vertices, lattice.slice.columns, lattice.slice.weights,
                        lattice.filter(torch.rand(2, 23 * 31, 3, generator=torch.Generator().manual_seed(4))))
    assert built["numpy"][0] == built["torch"][0]
    assert all(torch.equal(a, b) for a, b in zip(built["numpy"][1:], built["torch"][1:]))


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("num_keys, num_queries", [(1, 1), (1, 50), (2000, 3), (2000, 2000), (300, 0), (0, 4)])
def test_counts_at_most_is_a_right_searchsorted(dtype, num_keys, num_queries):
    # The neighbour search's merge: keys and queries sorted, queries below, among (ties, with equal queries
    # too) and above the keys.
    rng = np.random.default_rng(num_keys + num_queries)
    keys = np.sort(rng.integers(-1000, 1000, num_keys)).astype(dtype)
    queries = np.sort(rng.integers(-1100, 1100, num_queries)).astype(dtype)
    if num_keys and num_queries > 2:
        queries[1:3] = keys[num_keys // 2]
        queries.sort()
    got = permutohedral._counts_at_most(keys, queries)
    assert np.array_equal(got, np.searchsorted(keys, queries, side="right"))


def test_blocked_rows_reject_mismatched_parts(monkeypatch):
    monkeypatch.setattr(permutohedral, "_SPLAT_BLOCK", 8)
    splat = build_lattice(torch.randn(1, 3, 30, dtype=torch.float64) * 0.2).splat
    assert isinstance(splat, BlockedRows)
    with pytest.raises(ValueError, match="one column per row of parts"):
        BlockedRows(splat.parts, splat.parts)
    with pytest.raises(TypeError, match="must be SparseRows"):
        BlockedRows(splat, splat.combine)


def test_index_dtype_takes_int32_while_columns_and_entries_fit():
    from crfrnn_deeplab.crf.sparse_rows import index_dtype

    assert index_dtype(2**31 - 1, 2**31 - 1) == torch.int32
    assert index_dtype(2**31, 5) == torch.long and index_dtype(5, 2**31) == torch.long
    for bad in (-1, 2.0, True, None):
        with pytest.raises(ValueError, match="index_dtype: num_entries must be an int >= 0"):
            index_dtype(5, bad)
