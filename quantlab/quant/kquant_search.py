"""Choosing the stored parameters of a GGUF K-quant grid (fp16 ``d``/``dmin``, integer ``sc``/``m``) for a weight.

The search starts the way llama.cpp's reference quantizers do (ggml-org/llama.cpp
``ggml/src/ggml-quants.c``: ``quantize_row_q*_K_ref``, ``make_qkx2_quants``, ``make_qx_quants``) and then
measures every choice on the integer grid the format stores:

1. per sub-block a float scale (and min) by weighted least squares over a sweep of candidate ranges
   (unsigned types: ``x ≈ scale·l − min``, ``l ∈ [0, maxq]``; signed types: ``x ≈ scale·l``,
   ``l ∈ [−zero, zero−1]``, with the largest ``|x|`` on either end of the code range);
2. per super-block the fp16 ``d`` (then ``dmin``) among ``max / (limit + δ)`` for a few ``δ``, by the
   error of the weights rounded onto the resulting integer grid (llama.cpp takes ``δ = 0``);
3. per sub-block the integer ``sc`` (and ``m``) among the neighbours of the rounded value, by the same
   error (llama.cpp takes the rounded value).

Errors are ``Σ importance · (ŵ − w)²``, with an optional per-column importance (e.g. ``diag H``, as
llama.cpp's imatrix weights), uniform by default. Tensors inside: ``x [out, n_super, n_sub, sub]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from quantlab.quant.kquant import (
    QK_K,
    KGrid,
    KParams,
    dequantize_codes,
    get_grid,
    quantize_codes,
)

_SWEEP = 10  # candidate ranges per sub-block in step 1 (llama.cpp sweeps 15-20; more does not help here)
_D_CANDIDATES = (-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0)  # step 2: d = max / (limit + δ)
_F16_MAX = 65504.0


def _wsum(w: Tensor | None, a: Tensor, b: Tensor | None = None) -> Tensor:
    """``Σ w·a(·b)`` over the last dimension (``w`` None: uniform)."""
    prod = a if b is None else a * b
    return (prod if w is None else w * prod).sum(-1)


def _sub_error(x: Tensor, w: Tensor | None, scale: Tensor, shift: Tensor, g: KGrid) -> Tensor:
    """``Σ w·(ŵ − x)²`` per sub-block ``[out, n_super, n_sub]`` on the grid ``(scale, shift)`` per sub-block."""
    s, z = scale.unsqueeze(-1), shift.unsqueeze(-1)
    err = dequantize_codes(quantize_codes(x, s, z, g), s, z, g) - x
    return _wsum(w, err, err)


def _fit_unsigned(x: Tensor, w: Tensor | None, nmax: int) -> tuple[Tensor, Tensor]:
    """Float sub-block ``(scale, mn) ≥ 0`` with ``x ≈ scale·l − mn`` (``make_qkx2_quants``'s sweep; errors in
    closed form from the sums)."""
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    rng = x.amax(-1, keepdim=True) - lo
    rng = torch.where(rng > 0, rng, torch.ones_like(rng))
    xs = x - lo
    sw = torch.full_like(rng.squeeze(-1), x.shape[-1]) if w is None else w.expand_as(x).sum(-1)
    sx, sx2 = _wsum(w, x), _wsum(w, x, x)
    best = torch.full_like(sw, float("inf"))
    scale, mn = (rng / nmax).squeeze(-1), -lo.squeeze(-1)
    for k in range(_SWEEP + 1):
        l = (xs * ((nmax - 1 + k * 2 / _SWEEP) / rng)).round_().clamp_(0, nmax)
        sl, sl2, sxl = _wsum(w, l), _wsum(w, l, l), _wsum(w, l, x)
        det = sw * sl2 - sl * sl
        ok = det > 0
        det = torch.where(ok, det, torch.ones_like(det))
        s, b = (sw * sxl - sx * sl) / det, (sl2 * sx - sl * sxl) / det  # x ≈ s·l + b
        clip = b > 0  # a positive min would need a negative dmin: fit the scale alone
        s = torch.where(clip, sxl / sl2.clamp(min=1e-30), s)
        b = torch.where(clip, torch.zeros_like(b), b)
        err = s * s * sl2 + 2 * s * b * sl + b * b * sw - 2 * s * sxl - 2 * b * sx + sx2
        better = ok & (err < best) & (s > 0)
        best, scale, mn = torch.where(better, err, best), torch.where(better, s, scale), torch.where(better, -b, mn)
    return scale, mn


def _fit_signed(x: Tensor, w: Tensor | None, nmax: int) -> Tensor:
    """Float signed sub-block scale with ``x ≈ scale·l``, ``l ∈ [−nmax, nmax−1]`` (``make_qx_quants`` puts the
    peak on ``−nmax`` only; here both ends are tried)."""
    peak = x.gather(-1, x.abs().argmax(-1, keepdim=True))  # the signed value of largest |x|
    peak = torch.where(peak == 0, torch.ones_like(peak), peak)
    xp = x / peak
    best = torch.full(x.shape[:-1], float("inf"), dtype=x.dtype, device=x.device)
    scale = (-peak / nmax).squeeze(-1)
    sx2 = _wsum(w, x, x)
    for k in range(-4, 5):
        for target in (-(nmax + 0.2 * k), nmax - 1 + 0.2 * k):  # the peak on the long or the short side
            l = (xp * target).round_().clamp_(-nmax, nmax - 1)
            sl2, sxl = _wsum(w, l, l), _wsum(w, l, x)
            s = sxl / sl2.clamp(min=1e-30)
            err = sx2 - s * sxl
            better = (sl2 > 0) & (err < best)
            best, scale = torch.where(better, err, best), torch.where(better, s, scale)
    return scale


def _round_factor(value: Tensor, factor: Tensor, lo: int, hi: int) -> Tensor:
    """``clamp(round(value / factor), lo, hi)`` per sub-block (0 where ``factor == 0``); value ``[..., n_sub]``,
    factor ``[...]``."""
    f = factor.unsqueeze(-1)
    q = torch.round(value / torch.where(f == 0, torch.ones_like(f), f))
    return torch.where(f == 0, torch.zeros_like(q), q).clamp(lo, hi)


def _pick_factor(x: Tensor, w: Tensor | None, g: KGrid, peak: Tensor, limits: tuple[int, ...],
                 grid_of: Callable[[Tensor], tuple[Tensor, Tensor]]) -> Tensor:
    """The fp16-representable super-block factor ``[out, n_super]`` among ``peak / (limit + δ)`` with the least
    error; ``grid_of(factor)`` gives the sub-block ``(scale, shift)`` of a candidate."""
    best_err, best = None, None
    for limit in limits:
        for delta in _D_CANDIDATES:
            f = (peak / (limit + delta)).clamp(-_F16_MAX, _F16_MAX).half().float()
            err = _sub_error(x, w, *grid_of(f), g).sum(-1)  # [out, n_super]
            better = torch.ones_like(err, dtype=torch.bool) if best is None else err < best_err
            best_err = err if best is None else torch.where(better, err, best_err)
            best = f if best is None else torch.where(better, f, best)
    return best


def _pick_each(x: Tensor, w: Tensor | None, g: KGrid, grids: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Per sub-block, the index of the candidate ``(scale, shift)`` with the least error ``[out, n_super, n_sub]``."""
    return torch.stack([_sub_error(x, w, s, z, g) for s, z in grids]).argmin(0)


def _choose(cands: list[Tensor], pick: Tensor) -> Tensor:
    """Per element, ``cands[pick]``."""
    return torch.stack(cands).gather(0, pick.unsqueeze(0)).squeeze(0)


def _signed_params(x: Tensor, w: Tensor | None, g: KGrid) -> tuple[Tensor, Tensor]:
    """``(d, sc)`` of a signed type: fp16-valued ``[out, n_super]`` and integer-valued ``[out, n_super, n_sub]``."""
    lo, hi = g.sc_range
    s = _fit_signed(x, w, g.zero)
    zero = torch.full_like(s, float(g.zero))
    peak = s.gather(-1, s.abs().argmax(-1, keepdim=True)).squeeze(-1)
    d = _pick_factor(x, w, g, peak, (lo, hi), lambda f: (f.unsqueeze(-1) * _round_factor(s, f, lo, hi), zero))
    base = _round_factor(s, d, lo, hi)
    cands = [(base + k).clamp(lo, hi) for k in (-1, 0, 1)]
    return d, _choose(cands, _pick_each(x, w, g, [(d.unsqueeze(-1) * c, zero) for c in cands]))


def _unsigned_params(x: Tensor, w: Tensor | None, g: KGrid) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(d, sc, dmin, m)`` of an unsigned type (fp16-valued factors, integer-valued sub-block values)."""
    hi, mhi = g.sc_range[1], g.m_max
    s, mn = _fit_unsigned(x, w, g.maxq)
    dmin = (mn.amax(-1) / mhi).clamp(max=_F16_MAX).half().float()
    m = _round_factor(mn, dmin, 0, mhi)
    d = _pick_factor(x, w, g, s.amax(-1), (hi,),
                     lambda f: (f.unsqueeze(-1) * _round_factor(s, f, 0, hi), -(dmin.unsqueeze(-1) * m)))
    sc = _round_factor(s, d, 0, hi)
    dmin = _pick_factor(x, w, g, mn.amax(-1), (mhi,),
                        lambda f: (d.unsqueeze(-1) * sc, -(f.unsqueeze(-1) * _round_factor(mn, f, 0, mhi))))
    m = _round_factor(mn, dmin, 0, mhi)
    pairs = [((sc + a).clamp(0, hi), (m + b).clamp(0, mhi)) for a in (-1, 0, 1) for b in (-1, 0, 1)]
    pick = _pick_each(x, w, g, [(d.unsqueeze(-1) * c, -(dmin.unsqueeze(-1) * q)) for c, q in pairs])
    return d, _choose([c for c, _ in pairs], pick), dmin, _choose([q for _, q in pairs], pick)


def kquant_params(weight: Tensor, grid: str | KGrid, importance: Tensor | None = None) -> KParams:
    """Stored K-quant parameters of ``weight [out, in]`` (``in % 256 == 0``), chosen for the least error.

    Args:
        weight: ``[out, in]`` float weight.
        grid: ``q2_k`` .. ``q6_k`` (or a :class:`KGrid`).
        importance: optional ``[in]`` non-negative weight of each column's squared error (e.g. ``diag H``).
    """
    g = grid if isinstance(grid, KGrid) else get_grid(grid)
    out_f, in_f = weight.shape
    if in_f % QK_K:
        raise ValueError(f"{g.name}: in_features must be a multiple of {QK_K}, got {in_f}")
    n_super = in_f // QK_K
    x = weight.detach().float().contiguous().reshape(out_f, n_super, g.n_sub, g.sub)  # layout-independent sums
    w = None if importance is None else importance.detach().float().clamp(min=0).reshape(1, n_super, g.n_sub, g.sub)
    if g.signed:
        d, sc = _signed_params(x, w, g)
        return KParams(g, d.half().reshape(out_f, n_super), sc.to(torch.int8).reshape(out_f, -1))
    d, sc, dmin, m = _unsigned_params(x, w, g)
    return KParams(g, d.half().reshape(out_f, n_super), sc.to(torch.uint8).reshape(out_f, -1),
                   dmin.half().reshape(out_f, n_super), m.to(torch.uint8).reshape(out_f, -1))
