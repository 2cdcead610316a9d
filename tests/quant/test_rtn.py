"""Round-to-nearest: known answers, grids, cost, determinism."""

from __future__ import annotations

import pytest
import torch

from quantlab.quant import quantize_weight, rtn_quantize
from tests.quant.test_gptq import on_grid_weight


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64])
def test_on_grid_weight_is_exact(bits, group_size):
    W, codes = on_grid_weight(8, 128, bits, group_size, seed=bits)
    r = rtn_quantize(W, bits, group_size, sym=False)
    assert torch.equal(r.codes.long(), codes) and torch.equal(r.dequantized, W)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_sym_vs_asym(bits):
    torch.manual_seed(bits)
    W = torch.randn(16, 64) + 0.5
    s = rtn_quantize(W, bits, 32, sym=True)
    a = rtn_quantize(W, bits, 32, sym=False)
    assert s.zeros is None and a.zeros is not None and a.zeros.shape == (16, 2)
    assert torch.all(a.zeros == a.zeros.round()) and a.zeros.min() >= 0 and a.zeros.max() <= 2 ** bits - 1
    maxq = 2 ** bits - 1
    assert s.codes.max() <= maxq and a.codes.max() <= maxq
    # symmetric: scale = 2·max|w| / maxq per group; asymmetric: (max - min) / maxq with 0 inside
    g = W.reshape(16, 2, 32)
    assert torch.allclose(s.scales, 2 * g.abs().amax(-1) / maxq)
    assert torch.allclose(a.scales, (g.amax(-1).clamp(min=0) - g.amin(-1).clamp(max=0)) / maxq)
    # a shifted distribution is served better by the asymmetric grid
    assert (a.dequantized - W).square().sum() < (s.dequantized - W).square().sum()
    for r in (s, a):
        assert torch.equal(r.dequantize(), r.dequantized)


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_shapes_and_bits_per_weight(group_size):
    W = torch.randn(96, 256, dtype=torch.float16)
    r = quantize_weight(W, "rtn", bits=3, group_size=group_size, sym=False)
    n_groups = 1 if group_size == -1 else 256 // group_size
    assert r.codes.shape == (96, 256) and r.codes.dtype == torch.uint8
    assert r.scales.shape == (96, n_groups) and r.scales.dtype == torch.float32
    assert r.dequantized.dtype == torch.float16 and r.error is None
    # codes 3 bits; fp16 scales and 3-bit zeros (96·3/32 = 9 words per group) per group
    assert r.bits_per_weight == pytest.approx(3 + n_groups * (96 * 16 + 9 * 32) / (96 * 256))


def test_deterministic_and_mse_option():
    torch.manual_seed(0)
    W = torch.randn(32, 128)
    a, b = rtn_quantize(W, 4, 64), rtn_quantize(W.clone(), 4, 64)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)
    m = quantize_weight(W, "rtn", bits=2, group_size=64, sym=False, mse=True)
    assert m.args == {"mse": True} and torch.equal(m.dequantize(), m.dequantized)
