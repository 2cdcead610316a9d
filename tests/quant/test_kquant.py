"""GGUF K-quant grids: bit-exact against gguf's dequantizers, exact sizes, GPTQ beats RTN on the same grid,
and the grid's error against a reimplementation of llama.cpp's reference quantizers.

The ``gguf`` package (0.19) implements dequantization of every K type but quantization of none of them,
so the reference here is ggml's ``quantize_row_q*_K_ref`` (ggml-org/llama.cpp ``ggml/src/ggml-quants.c``:
``make_qkx2_quants``, ``make_q3_quants``, ``make_qx_quants``), re-written with numpy over all sub-blocks
at once (float32; sums are pairwise instead of sequential, which only moves ties).
"""

from __future__ import annotations

import dataclasses

import gguf.quants as gq
import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from quantlab.quant import (
    QuantScheme,
    gptq_solve,
    kquant,
    quantize_weight,
    relative_output_error,
    rtn_quantize,
)
from quantlab.quant.kquant import K_GRIDS
from quantlab.quant.kquant_ggml import BYTES_PER_BLOCK, encode_blocks, ggml_type
from quantlab.quant.results_io import results_from_tensors, results_to_tensors
from quantlab.quant.steps import as_stored
from tests.quant.conftest import make_layer

NAMES = sorted(K_GRIDS)


# ---------------------------------------------------------------------------------------------------------
# ggml's reference quantizers (no imatrix), returning the dequantized weight [out, in] float32
# ---------------------------------------------------------------------------------------------------------
def _qkx2(x, w, nmax, rmin, rdelta, nstep, use_mad):
    """make_qkx2_quants over rows of x [R, n]: (scale [R], the_min [R] >= 0, L [R, n])."""
    f = np.float32
    lo = np.minimum(x.min(1), f(0))
    hi = x.max(1)
    flat = hi == lo
    rng = np.where(flat, f(1), hi - lo)
    sum_w, sum_x = w.sum(1), (w * x).sum(1)

    def err(scale, mn, L):
        diff = scale[:, None] * L + mn[:, None] - x
        return (w * (np.abs(diff) if use_mad else diff * diff)).sum(1)

    iscale = f(nmax) / rng
    L = np.clip(np.rint(iscale[:, None] * (x - lo[:, None])), 0, nmax).astype(f)
    scale, mn = f(1) / iscale, lo.copy()
    best = err(scale, mn, L)
    for i in range(nstep + 1):
        isc = (f(rmin) + f(rdelta) * f(i) + f(nmax)) / rng
        La = np.clip(np.rint(isc[:, None] * (x - lo[:, None])), 0, nmax).astype(f)
        sl, sl2, sxl = (w * La).sum(1), (w * La * La).sum(1), (w * La * x).sum(1)
        D = sum_w * sl2 - sl * sl
        ok = D > 0
        D = np.where(ok, D, f(1))
        ts, tm = (sum_w * sxl - sum_x * sl) / D, (sl2 * sum_x - sl * sxl) / D
        pos = tm > 0
        ts = np.where(pos, sxl / np.where(sl2 > 0, sl2, f(1)), ts)
        tm = np.where(pos, f(0), tm)
        cur = err(ts, tm, La)
        better = ok & (cur < best)
        L = np.where(better[:, None], La, L)
        best, scale, mn = np.where(better, cur, best), np.where(better, ts, scale), np.where(better, tm, mn)
    scale = np.where(flat, f(0), scale)
    L = np.where(flat[:, None], f(0), L)
    return scale.astype(f), (-mn).astype(f), L


def _peak(x):
    return np.take_along_axis(x, np.abs(x).argmax(1)[:, None], 1)[:, 0]


def _q3(x, nmax):
    """make_q3_quants(do_rmse=true) over rows: (scale [R], L [R, n] in [0, 2·nmax))."""
    f = np.float32
    mx = _peak(x)
    zero = np.abs(mx) < 1e-15
    iscale = -f(nmax) / np.where(zero, f(1), mx)
    L = np.clip(np.rint(iscale[:, None] * x), -nmax, nmax - 1).astype(f)
    w = x * x
    sumlx, suml2 = (w * x * L).sum(1), (w * L * L).sum(1)
    for _ in range(5):
        for i in range(x.shape[1]):
            xi, wi, Li = x[:, i], w[:, i], L[:, i]
            slx = sumlx - wi * xi * Li
            sl2 = suml2 - wi * Li * Li
            new = np.clip(np.rint(xi * sl2 / np.where(slx > 0, slx, f(1))), -nmax, nmax - 1).astype(f)
            slx2, sl22 = slx + wi * xi * new, sl2 + wi * new * new
            take = (slx > 0) & (new != Li) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[:, i] = np.where(take, new, Li)
            sumlx, suml2 = np.where(take, slx2, sumlx), np.where(take, sl22, suml2)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, f(1)), f(0))
    return np.where(zero, f(0), scale), np.where(zero[:, None], f(0), L + nmax)


def _qx(x, nmax):
    """make_qx_quants(rmse_type=1, no weights) over rows: (scale [R], L [R, n] in [0, 2·nmax))."""
    f = np.float32
    mx = _peak(x)
    zero = np.abs(mx) < 1e-15
    mx = np.where(zero, f(1), mx)
    w = x * x

    def fit(isc):
        l = np.clip(np.rint(isc[:, None] * x), -nmax, nmax - 1).astype(f)
        return l, (w * x * l).sum(1), (w * l * l).sum(1)

    L, sumlx, suml2 = fit(-f(nmax) / mx)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, f(1)), f(0))
    best = scale * sumlx
    for i in range(-9, 10):
        if i == 0:
            continue
        l, slx, sl2 = fit(-(f(nmax) + f(0.1) * f(i)) / mx)
        take = (sl2 > 0) & (slx * slx > best * sl2)
        L = np.where(take[:, None], l, L)
        scale = np.where(take, slx / np.where(sl2 > 0, sl2, f(1)), scale)
        best = np.where(take, scale * slx, best)
    return np.where(zero, f(0), scale), np.where(zero[:, None], f(0), L + nmax)


def _h(v):
    """fp32 -> fp16 -> fp32 (GGML_FP32_TO_FP16 rounds to nearest even)."""
    return v.astype(np.float16).astype(np.float32)


def ggml_reference(W: torch.Tensor, name: str) -> torch.Tensor:
    """What ``quantize_row_<name>_ref`` followed by ggml's dequantization gives for ``W [out, in]``."""
    g = K_GRIDS[name]
    f = np.float32
    out_f, in_f = W.shape
    nb = out_f * in_f // 256
    x = W.float().numpy().reshape(nb, g.n_sub, g.sub)
    xs = x.reshape(-1, g.sub)
    if not g.signed:
        if name == "q2_k":
            wts, args = np.abs(xs), (-0.5, 0.1, 15, True)
        else:
            av = np.sqrt((xs * xs).sum(1, keepdims=True) / f(32))
            wts, args = av + np.abs(xs), ((-1.0, 0.1, 20, False) if name == "q4_k" else (-0.5, 0.1, 15, False))
        s, mn, L = _qkx2(xs, wts, g.maxq, *args)
        s, mn, L = s.reshape(nb, g.n_sub), mn.reshape(nb, g.n_sub), L.reshape(nb, g.n_sub, g.sub)
        lim = g.sc_range[1]
        ms, mm = np.maximum(s.max(1), f(0)), np.maximum(mn.max(1), f(0))
        inv_s = np.where(ms > 0, f(lim) / np.where(ms > 0, ms, f(1)), f(0))
        inv_m = np.where(mm > 0, f(lim) / np.where(mm > 0, mm, f(1)), f(0))
        sc = np.minimum(np.rint(inv_s[:, None] * s), lim)
        m = np.minimum(np.rint(inv_m[:, None] * mn), lim)
        d, dmin = _h(ms / f(lim)), _h(mm / f(lim))
        dl, ml = d[:, None] * sc.astype(f), dmin[:, None] * m.astype(f)
        Lq = np.clip(np.rint((x + ml[..., None]) / np.where(dl == 0, f(1), dl)[..., None]), 0, g.maxq)
        L = np.where(dl[..., None] == 0, L, Lq)
        return torch.from_numpy((dl[..., None] * L - ml[..., None]).reshape(out_f, in_f).astype(f))
    nmax, lim = g.zero, -g.sc_range[0]
    s, L = (_q3(xs, nmax) if name == "q3_k" else _qx(xs, nmax))
    s, L = s.reshape(nb, g.n_sub), L.reshape(nb, g.n_sub, g.sub)
    peak = _peak(s)
    nz = np.abs(peak) >= 1e-15 if name == "q6_k" else peak != 0  # Q6_K: GROUP_MAX_EPS; Q3_K: `if (max_scale)`
    iscale = -f(lim) / np.where(nz, peak, f(1))
    sc = np.rint(iscale[:, None] * s)
    sc = np.clip(sc, -32, 31) if name == "q3_k" else np.minimum(sc, 127)
    d = np.where(nz, _h(f(1) / iscale), f(0))
    dl = d[:, None] * sc.astype(f)
    Lq = np.clip(np.rint(x / np.where(dl == 0, f(1), dl)[..., None]), -nmax, nmax - 1) + nmax
    L = np.where(dl[..., None] == 0, L, Lq)
    return torch.from_numpy((dl[..., None] * (L - nmax)).reshape(out_f, in_f).astype(f))


# ---------------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------------
def random_weight(seed: int = 0, outliers: bool = False) -> torch.Tensor:
    """``[64, 512]`` Gaussian; with ``outliers``, a few rows ×8 and a few single weights ×30."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(64, 512, generator=g) * 0.02
    if outliers:
        W[::9] *= 8
        idx = torch.randint(0, W.numel(), (40,), generator=g)
        W.view(-1)[idx] *= 30
    return W


def gguf_dequantize(r) -> torch.Tensor:
    b = encode_blocks(r)
    return torch.from_numpy(gq.dequantize(b, ggml_type(r)).reshape(r.shape).copy())


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Identical float32 bit patterns (``torch.equal`` would let ``-0.0 == 0.0`` pass)."""
    return a.dtype == b.dtype == torch.float32 and torch.equal(a.view(torch.int32), b.view(torch.int32))


def solve(W, H, name, backend):
    g = K_GRIDS[name]
    scheme = QuantScheme(backend=backend, bits=g.bits, group_size=g.sub, sym=g.signed, args={"grid": name})
    return quantize_weight(W, scheme, hessian=H)


# ---------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------
def test_type_table_matches_gguf():
    for name, g in K_GRIDS.items():
        qt = GGMLQuantizationType[name.upper()]
        assert GGML_QUANT_SIZES[qt] == (256, g.type_size) and BYTES_PER_BLOCK[name] == g.type_size
    assert [K_GRIDS[n].type_size for n in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")] == [84, 110, 144, 176, 210]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("outliers", [False, True])
@pytest.mark.parametrize("backend", ["rtn", "gptq"])
def test_gguf_decodes_the_blocks_bit_for_bit(name, outliers, backend):
    W = random_weight(NAMES.index(name), outliers)
    _, H = make_layer(8, 512, seed=3)
    r = solve(W, H, name, backend)
    g = K_GRIDS[name]
    b = encode_blocks(r)
    assert b.dtype == np.uint8 and b.shape == (64, 2 * GGML_QUANT_SIZES[ggml_type(r)][1])
    assert ggml_type(r) == GGMLQuantizationType[name.upper()]
    assert bits_equal(gguf_dequantize(r), r.dequantized)
    assert bits_equal(r.dequantize(), r.dequantized)
    assert r.bits_per_weight == g.type_size * 8 / 256
    assert r.codes.max() <= g.maxq and r.group_size == g.sub and r.scales.shape == (64, 512 // g.sub)
    s, _ = kquant.expand(kquant.params_of(r))
    assert bits_equal(r.scales, s)


def test_expand_and_dequantize_follow_ggml_arithmetic():
    """Random stored parameters over their whole ranges decode as gguf does: ``(d·sc)·q − dmin·m``."""
    g = K_GRIDS["q4_k"]
    torch.manual_seed(0)
    d = (torch.rand(32, 1) * 0.01 + 1e-3).half()
    dmin = (torch.rand(32, 1) * 0.01).half()
    sc = torch.randint(0, 64, (32, 8), dtype=torch.uint8)
    m = torch.randint(0, 64, (32, 8), dtype=torch.uint8)
    codes = torch.randint(0, 16, (32, 256), dtype=torch.uint8)
    p = kquant.KParams(g, d, sc, dmin, m)
    scale, offset = kquant.expand(p)
    ours = kquant.dequantize_codes(codes.reshape(32, 8, 32), scale[..., None], offset[..., None], g).reshape(32, 256)
    r = rtn_quantize(torch.randn(32, 256), 4, 32, False, kgrid="q4_k")
    r = dataclasses.replace(r, codes=codes, extra=kquant.params_extra(p))
    assert bits_equal(gguf_dequantize(r), ours)
    # the uniform grid's form scale·(q − z) with a float zero point z = −offset/scale is not the same value
    z = (-offset / scale)[..., None]
    uniform = ((codes.reshape(32, 8, 32).float() - z) * scale[..., None]).reshape(32, 256)
    assert not bits_equal(uniform, ours)


@pytest.mark.parametrize("name", NAMES)
def test_gptq_beats_rtn_on_the_same_grid(name):
    W, H = make_layer(64, 512, seed=1)
    r, q = solve(W, H, name, "rtn"), solve(W, H, name, "gptq")
    assert q.error < 0.5 * r.error, (name, q.error, r.error)
    # gptq's error comes from its own per-column losses (float32 sums): equal to 1e-5, not to the last bit
    assert q.error == pytest.approx(relative_output_error(W, q.dequantized, H), rel=1e-5)
    assert torch.equal(q.extra["d"], r.extra["d"]) and torch.equal(q.extra["sc"], r.extra["sc"])  # one fixed grid


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("outliers", [False, True])
def test_rtn_error_below_ggml_reference(name, outliers):
    """The parameter search beats ggml's reference quantizer (measured: 3-30% lower MSE; ≥ 1% asserted)."""
    W = random_weight(10 + NAMES.index(name), outliers)
    ours = (rtn_quantize(W, K_GRIDS[name].bits, K_GRIDS[name].sub, K_GRIDS[name].signed, kgrid=name).dequantized
            - W).pow(2).mean().item()
    ref = (ggml_reference(W, name) - W).pow(2).mean().item()
    assert ours <= 0.99 * ref, (name, ours, ref)


def test_reference_reimplementation_is_faithful():
    """The reimplemented reference reaches the relative errors ggml's quantizers are known for at these widths
    (so that beating it is no accident of a broken reference)."""
    W = random_weight(5)
    for name in NAMES:
        ref = ggml_reference(W, name)
        rel = ((ref - W).pow(2).mean() / W.pow(2).mean()).item()
        assert rel < {"q2_k": 0.2, "q3_k": 0.06, "q4_k": 0.01, "q5_k": 0.003, "q6_k": 0.001}[name], (name, rel)


def test_validation():
    W = torch.randn(8, 512)
    _, H = make_layer(8, 512)
    with pytest.raises(ValueError, match="needs bits=4, group_size=32, sym=False"):
        quantize_weight(W, "rtn", bits=4, group_size=32, sym=True, grid="q4_k")
    with pytest.raises(ValueError, match="needs bits=6, group_size=16, sym=True"):
        quantize_weight(W, "gptq", bits=6, group_size=32, sym=True, hessian=H, grid="q6_k")
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_weight(torch.randn(8, 128), "rtn", bits=4, group_size=32, sym=False, grid="q4_k")
    with pytest.raises(ValueError, match="unknown grid"):
        quantize_weight(W, "rtn", bits=4, group_size=32, sym=False, grid="q4_0")
    with pytest.raises(ValueError, match=r"got 5 \(other widths only on a K grid"):
        quantize_weight(W, "gptq", bits=5, group_size=32, sym=False, hessian=H)
    with pytest.raises(ValueError, match="mse does not apply"):
        quantize_weight(W, "rtn", bits=4, group_size=32, sym=False, grid="q4_k", mse=True)


def test_results_survive_as_stored_and_results_io():
    W, H = make_layer(16, 512, seed=2)
    for name in ("q4_k", "q6_k"):
        r = solve(W, H, name, "gptq")
        assert as_stored(r) is r
        tensors, scalars = results_to_tensors({"m": r}, with_dequantized=False)
        back = results_from_tensors(tensors, scalars)["m"]
        assert back.args["grid"] == name and bits_equal(back.dequantized, r.dequantized)
        assert np.array_equal(encode_blocks(back), encode_blocks(r))


def test_act_order_and_dead_columns():
    W, H = make_layer(32, 512, seed=4)
    H[7, :] = 0
    H[:, 7] = 0
    r = gptq_solve(W, H, 3, 16, True, act_order=True, kgrid="q3_k")
    assert torch.equal(r.g_idx.long(), torch.arange(512) // 16)  # static sub-blocks: the grid is not permuted
    assert bits_equal(gguf_dequantize(r), r.dequantized)
    assert r.error < rtn_quantize(W, 3, 16, True, kgrid="q3_k", hessian=H).error
