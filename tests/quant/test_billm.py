"""BiLLM-style binarization: quality against plain sign binarization, exact storage count, round trip."""

from __future__ import annotations

import pytest
import torch

from quantlab.quant import billm_solve, quantize_weight, relative_output_error
from quantlab.quant.binary import pack_bits, unpack_bits
from tests.quant.conftest import make_layer


def sign_binarize(W: torch.Tensor) -> torch.Tensor:
    """One scale per row: ``sign(w) · mean|w|`` (XNOR-style)."""
    return torch.where(W >= 0, 1.0, -1.0) * W.abs().mean(1, keepdim=True)


@pytest.mark.parametrize("seed", [0, 1])
def test_better_than_sign_binarization(seed):
    W, H = make_layer(32, 256, seed=seed)
    r = quantize_weight(W, "billm", bits=1, group_size=128, hessian=H, max_salient=20, break_points=21)
    base = relative_output_error(W, sign_binarize(W), H)
    assert r.error < 0.6 * base, (r.error, base)
    assert r.error == pytest.approx(relative_output_error(W, r.dequantized, H))
    assert torch.equal(r.dequantize(), r.dequantized)


def test_bits_per_weight_hand_count():
    W, H = make_layer(16, 40, seed=2)
    r = billm_solve(W, H, block_size=16, max_salient=4, break_points=9)  # 3 blocks: 16 + 16 + 8 columns
    sign = second = 16 * 5 * 8  # [16, ceil(40/8)] uint8
    salient_map = 5 * 8  # [ceil(40/8)] uint8
    scales = means = 16 * 3 * 4 * 16  # [16, 4 per block] fp16
    assert r.bits_per_weight == pytest.approx((sign + second + salient_map + scales + means) / (16 * 40))
    assert r.extra["sign_packed"].shape == (16, 5) and r.extra["salient_mask"].shape == (5,)
    assert r.scales.shape == (16, 12) and r.extra["means"].shape == (16, 12)
    salient = unpack_bits(r.extra["salient_mask"], 40)
    assert r.extra["nominal_bits"].item() == pytest.approx(1 + salient.float().mean().item())
    assert 1 <= salient[:16].sum() <= 4  # at least one and at most max_salient salient columns per block
    # the packed planes are the code bits
    assert torch.equal(unpack_bits(r.extra["sign_packed"], 40), (r.codes & 1).bool())
    assert torch.equal(unpack_bits(r.extra["second_packed"], 40), (r.codes >> 1).bool())
    assert torch.equal(r.dequantize(), r.dequantized)


def test_levels_per_row_and_block():
    W, H = make_layer(8, 64, seed=4)
    r = billm_solve(W, H, block_size=64, max_salient=8, break_points=9)
    salient = unpack_bits(r.extra["salient_mask"], 64)
    # non-salient weights take one of 4 values per row, salient ones one of 4 other values
    for row in range(8):
        assert r.dequantized[row, ~salient].unique().numel() <= 4
        assert r.dequantized[row, salient].unique().numel() <= 4


def test_pack_bits_round_trip():
    b = torch.rand(3, 21) > 0.5
    assert torch.equal(unpack_bits(pack_bits(b), 21), b)
    assert pack_bits(torch.tensor([True] + [False] * 7 + [True])).tolist() == [1, 1]
