"""Grid parameters, codes and group helpers."""

from __future__ import annotations

import pytest
import torch

from quantlab.quant import grid


def test_sym_known_answer():
    w = torch.tensor([[-1.5, -0.2, 0.0, 0.3, 1.5, 1.1]])
    scale, zero = grid.compute_qparams(w, 4, sym=True)
    assert scale.item() == pytest.approx(3.0 / 15) and zero.item() == 8
    codes = grid.quantize_codes(w, scale[:, None], zero[:, None], 4)
    assert codes.tolist() == [[0, 7, 8, 10, 15, 14]]  # -7.5 -> -8 (half to even), +7.5 -> clamped at 15


def test_asym_range_uses_every_code_end():
    w = torch.tensor([[-0.4, 0.1, 1.1, 0.7]])
    scale, zero = grid.compute_qparams(w, 3, sym=False)
    assert scale.item() == pytest.approx(1.5 / 7) and zero.item() == 2  # round(0.4 / (1.5/7)) = round(1.87)
    codes = grid.quantize_codes(w, scale[:, None], zero[:, None], 3)
    assert codes.min() == 0 and codes.max() == 7


def test_range_always_contains_zero_and_sym_is_centred():
    w = torch.tensor([[0.5, 1.0, 2.0]])  # all positive
    s_asym, z_asym = grid.compute_qparams(w, 4, sym=False)
    assert z_asym.item() == 0 and s_asym.item() == pytest.approx(2.0 / 15)
    s_sym, z_sym = grid.compute_qparams(w, 4, sym=True)
    assert z_sym.item() == 8 and s_sym.item() == pytest.approx(4.0 / 15)
    # zero is exactly representable in both
    assert grid.fake_quantize(torch.zeros(1, 1), s_sym[:, None], z_sym[:, None], 4).item() == 0


def test_all_zero_group_gets_unit_range():
    scale, zero = grid.compute_qparams(torch.zeros(2, 8), 2, sym=False)
    assert torch.allclose(scale, torch.full((2,), 2 / 3)) and torch.equal(zero, torch.full((2,), 2.0))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_groups_use_their_own_scale(bits):
    w = torch.cat([torch.linspace(-1, 1, 32), 128 * torch.linspace(-1, 1, 32)]).unsqueeze(0)  # [1, 64]
    codes, scale, zero = grid.quantize_grouped(w, bits, 32, sym=False)
    assert scale.shape == (1, 2) and scale[0, 1] == 128 * scale[0, 0]
    assert torch.equal(codes[:, :32], codes[:, 32:])  # same pattern (exact power-of-two scaling), own scales
    per_channel = grid.quantize_grouped(w, bits, -1, sym=False)
    assert per_channel[1].shape == (1, 1)


def test_group_helpers():
    w = torch.arange(24.0).reshape(2, 12)
    assert grid.to_groups(w, 4).shape == (2, 3, 4)
    assert grid.to_groups(w, -1).shape == (2, 1, 12)
    assert grid.trivial_g_idx(12, 4).tolist() == [0] * 4 + [1] * 4 + [2] * 4
    with pytest.raises(ValueError, match="does not divide"):
        grid.to_groups(w, 5)


def test_mse_search_never_worse_in_its_norm():
    torch.manual_seed(0)
    w = torch.randn(64, 128) * torch.rand(64, 1)
    w[:, 0] = 8.0  # outliers make shrinking attractive
    for sym in (True, False):
        base = grid.compute_qparams(w, 3, sym)
        best = grid.compute_qparams(w, 3, sym, mse=True)

        def err(p):
            return (grid.fake_quantize(w, p[0][:, None], p[1][:, None], 3) - w).abs().pow(2.4).sum(1)

        assert torch.all(err(best) <= err(base) + 1e-6)
        assert err(best).sum() < err(base).sum()
