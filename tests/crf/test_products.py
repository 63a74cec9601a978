"""Products of tall value arrays (crf/products.py): the blocked Gram product and the channel mix's gradients."""

import pytest
import torch

from crfrnn_deeplab.crf import products
from crfrnn_deeplab.crf.products import channel_mix, gram


@pytest.mark.parametrize("n", [1, 100, 2 * 4096 - 1, 2 * 4096, 3 * 4096 + 17, 40_000])
def test_gram_equals_the_transposed_product(n):
    generator = torch.Generator().manual_seed(n)
    a = torch.randn(n, 21, dtype=torch.float64, generator=generator)
    b = torch.randn(n, 5, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(gram(a, b), a.T @ b, rtol=1e-12, atol=1e-10)
    wide = torch.randn(n, 42, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(gram(wide[:, ::2], b), wide[:, ::2].T @ b, rtol=1e-12, atol=1e-10)  # strided


def test_gram_rejects_mismatched_arrays():
    with pytest.raises(ValueError, match="Tensor\\[N, C\\]"):
        gram(torch.zeros(10, 3), torch.zeros(11, 3))
    with pytest.raises(ValueError, match="Tensor\\[N, C\\]"):
        gram(torch.zeros(10, 3, 1), torch.zeros(10, 3))


def test_channel_mix_gradients(monkeypatch):
    x = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    mix = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(channel_mix, (x, mix))
    # Above the block size: both gradients equal autograd's through x @ mix.
    monkeypatch.setattr(products, "_BLOCK_ROWS", 64)
    x = torch.randn(1000, 21, dtype=torch.float64, requires_grad=True)
    mix = torch.randn(21, 21, dtype=torch.float64, requires_grad=True)
    g = torch.randn(1000, 21, dtype=torch.float64)
    got = torch.autograd.grad(channel_mix(x, mix), (x, mix), g)
    expected = torch.autograd.grad(x @ mix, (x, mix), g)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-10)
    only_x = torch.autograd.grad(channel_mix(x, mix.detach()), x, g)[0]  # the mix without gradient: not saved
    torch.testing.assert_close(only_x, expected[0], rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("x, mix", [((10, 3), (4, 2)), ((2, 10, 3), (3, 2)), ((10, 3), (3,))])
def test_channel_mix_rejects_mismatched_arrays(x, mix):
    with pytest.raises(ValueError, match="channel_mix takes Tensor\\[N, C\\] and Tensor\\[C, C'\\]"):
        channel_mix(torch.zeros(x), torch.zeros(mix))
