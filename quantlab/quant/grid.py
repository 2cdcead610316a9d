"""Uniform integer grids: quantization parameters, codes and their dequantization (pure functions).

Layout conventions shared by every uniform backend (rtn, gptq) and the exporters
(``docs/formats.md#code-convention``):

| name      | shape                 | dtype   | meaning                                                          |
|-----------|-----------------------|---------|------------------------------------------------------------------|
| ``W``     | ``[out, in]``         | float   | Linear weight, groups run along ``in`` (the input dimension)     |
| ``g``     | int                   |         | ``group_size``; ``-1`` = one group per output row (per channel)  |
| groups    | ``[out, in/g, g]``    | float   | :func:`to_groups` view of ``W``                                  |
| ``codes`` | ``[out, in]``         | uint8   | unsigned code ``u`` in ``[0, 2^b - 1]``                          |
| ``scale`` | ``[out, in/g]``       | float32 | step of the grid, > 0                                            |
| ``zero``  | ``[out, in/g]``       | float32 | integer-valued zero point; symmetric: ``2^(b-1)`` (not stored)   |
| ``g_idx`` | ``[in]``              | int32   | group of each input column; ``c // g`` unless act-order          |

Quantize: ``u = clamp(round(w / scale) + zero, 0, 2^b - 1)`` (round half to even, as ``torch.round``).
Dequantize: ``w_hat = scale * (u - zero)``; symmetric grids use ``zero = 2^(b-1)`` (vLLM ``uint4b8``).

Parameters follow the GPTQ reference ``Quantizer.find_params`` (IST-DASLab/gptq ``quant.py``): the range
``[min(x, 0), max(x, 0)]`` always contains 0; asymmetric ``scale = (xmax - xmin) / maxq`` and
``zero = round(-xmin / scale)``; symmetric ``xmax = max(|xmin|, xmax)``, ``xmin = -xmax``,
``zero = (maxq + 1) / 2``; an all-zero group gets the range ``[-1, 1]``. One deviation: the reference
keeps ``xmin = 0`` for a symmetric group without negative values, which wastes half the grid; here
every symmetric group is centred (as compressed-tensors' ``calculate_qparams`` does).
The optional MSE search (``mse=True``) is the reference's: shrink the range by ``p = 1 - i/grid``
for ``i < maxshrink·grid`` and keep, per row, the ``p`` with the least ``sum |w - w_hat|^norm``.
:func:`weighted_range_search` is the same search with each column's squared error weighted (GPTQ passes
the Hessian diagonal: ``H_jj · δ_j²`` is the output error of rounding column ``j`` alone, the quantity
OBQ/GPTQ, Frantar & Alistarh 2022, arXiv 2208.11580, minimise), over a coarser grid of shrink factors.
"""

from __future__ import annotations

import torch
from torch import Tensor


def max_code(bits: int) -> int:
    """Largest unsigned code ``2^bits - 1``."""
    return (1 << bits) - 1


def sym_zero(bits: int) -> int:
    """Implicit zero point of a symmetric grid, ``2^(bits-1)``."""
    return 1 << (bits - 1)


def group_width(in_features: int, group_size: int) -> int:
    """Columns per group: ``group_size``, or ``in_features`` for per-channel (``-1``)."""
    return in_features if group_size == -1 else group_size


def num_groups(in_features: int, group_size: int) -> int:
    """Groups per row; raises ``ValueError`` if ``group_size`` does not divide ``in_features``."""
    g = group_width(in_features, group_size)
    if in_features % g:
        raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
    return in_features // g


def to_groups(w: Tensor, group_size: int) -> Tensor:
    """View ``[out, in]`` as ``[out, in/g, g]`` (``g = in`` for per channel)."""
    out_f, in_f = w.shape
    g = group_width(in_f, group_size)
    num_groups(in_f, group_size)
    return w.reshape(out_f, in_f // g, g)  # [out, in/g, g]


def trivial_g_idx(in_features: int, group_size: int, device: torch.device | str = "cpu") -> Tensor:
    """``g_idx`` without act-order: ``c // g`` as int32 ``[in]``."""
    return (torch.arange(in_features, device=device) // group_width(in_features, group_size)).to(torch.int32)


def _minmax_params(xmin: Tensor, xmax: Tensor, bits: int, sym: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero of the ranges ``[xmin, xmax]`` (both already contain 0)."""
    maxq = max_code(bits)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, float(sym_zero(bits))) if sym else torch.round(-xmin / scale)
    return scale, zero


def compute_qparams(w: Tensor, bits: int, sym: bool, *, mse: bool = False, grid: int = 100,
                    maxshrink: float = 0.8, norm: float = 2.4) -> tuple[Tensor, Tensor]:
    """Grid parameters of each row of ``w``, reducing over the last dimension.

    Args:
        w: ``[..., k]`` values sharing one grid per leading index (a group, or a whole row).
        bits: code width.
        sym: symmetric grid (``zero = 2^(bits-1)``).
        mse: search shrunken ranges for the least ``sum |w - w_hat|^norm`` (GPTQ's ``mse=True``).
        grid, maxshrink, norm: the MSE search grid (reference defaults 100, 0.8, 2.4).

    Returns:
        ``(scale, zero)``, each ``[...]`` float32; ``zero`` is integer-valued.
    """
    w = w.float()
    zeros = torch.zeros(w.shape[:-1], dtype=w.dtype, device=w.device)
    xmin = torch.minimum(w.amin(-1), zeros)
    xmax = torch.maximum(w.amax(-1), zeros)
    scale, zero = _minmax_params(xmin, xmax, bits, sym)
    if not mse:
        return scale, zero
    best = torch.full_like(scale, float("inf"))
    for i in range(int(maxshrink * grid)):
        p = 1 - i / grid
        scale1, zero1 = _minmax_params(p * xmin, p * xmax, bits, sym)
        q = fake_quantize(w, scale1.unsqueeze(-1), zero1.unsqueeze(-1), bits)
        err = (q - w).abs_().pow_(norm).sum(-1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, scale1, scale)
        zero = torch.where(better, zero1, zero)
    return scale, zero


def _weighted_loss(w: Tensor, scale: Tensor, zero: Tensor | int, maxq: int, weight: Tensor, buf: Tensor
                   ) -> Tensor:
    """``sum_j weight_j (w_j - fake_quantize(w_j))²`` per row, computed in ``buf`` without allocating (the
    range search evaluates it eight times over the whole matrix). ``zero``: per row, or the symmetric
    grid's constant (then the clamp bounds are constants too: two passes fewer)."""
    s = scale.unsqueeze(-1)
    torch.div(w, s, out=buf).round_()
    if isinstance(zero, int):
        buf.clamp_(-zero, maxq - zero)
    else:
        z = zero.unsqueeze(-1)
        buf.add_(z).clamp_(0, maxq).sub_(z)
    buf.mul_(s).sub_(w).square_().mul_(weight)
    return buf.sum(-1)


def weighted_range_search(w: Tensor, bits: int, sym: bool, weight: Tensor, *, coarse: int = 4,
                          lowest: float = 0.5, refine: int = 2) -> tuple[Tensor, Tensor]:
    """Grid parameters minimising ``sum_j weight_j (w_j - w_hat_j)²`` per row of ``w``.

    The min-max range is shrunk by a factor ``p``: first ``p`` in ``linspace(1, lowest, coarse)``, then
    ``refine`` times each row tries half the previous spacing on both sides of its best ``p`` (4 + 4
    evaluations find ``p`` to 1/24 on ``[0.5, 1]``; more points bought less than 3% of GPTQ's error on
    eval/bench/gptq_speed.py's matrices, fewer cost more). A candidate replaces the best only when strictly
    better, and ``p = 1`` is min-max itself, so the result is never worse than min-max on this loss.

    Args:
        w: ``[..., k]`` values sharing one grid per leading index.
        bits, sym: the grid.
        weight: ``[k]`` (or broadcastable to ``w``) non-negative column weights, e.g. ``diag(H)``.

    Returns:
        ``(scale, zero)``, each ``[...]`` float32.
    """
    w = w.float().contiguous()  # a transposed view would make every pass below strided (several times slower)
    weight = weight.float()
    maxq = max_code(bits)
    zeros = torch.zeros(w.shape[:-1], dtype=w.dtype, device=w.device)
    xmin = torch.minimum(w.amin(-1), zeros)
    xmax = torch.maximum(w.amax(-1), zeros)
    buf = torch.empty_like(w)

    def evaluate(p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        scale, zero = _minmax_params(p * xmin, p * xmax, bits, sym)
        return _weighted_loss(w, scale, sym_zero(bits) if sym else zero, maxq, weight, buf), scale, zero

    best_p = torch.ones_like(xmin)
    best, scale, zero = evaluate(best_p)

    def consider(p: Tensor) -> None:
        nonlocal best, scale, zero, best_p
        err, scale1, zero1 = evaluate(p)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, scale1, scale)
        zero = torch.where(better, zero1, zero)
        best_p = torch.where(better, p, best_p)

    step = (1.0 - lowest) / max(coarse - 1, 1)
    for i in range(1, coarse):  # plain floats: no tensor on the default device (the device-clean rule)
        consider(torch.full_like(xmin, 1.0 - i * step))
    for _ in range(refine):
        step /= 2
        centre = best_p
        for p in (centre - step, (centre + step).clamp(max=1.0)):
            consider(p)
    return scale, zero


def quantize_codes(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Unsigned codes ``clamp(round(w / scale) + zero, 0, 2^bits - 1)`` as uint8 (broadcasting)."""
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, max_code(bits)).to(torch.uint8)


def dequantize_codes(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """``scale * (codes - zero)`` in float32 (broadcasting). The one dequantization formula.

    Computed in place on a float32 copy of ``codes`` (the same two roundings as ``(codes - zero) * scale``):
    one temporary the size of the weight instead of three."""
    return codes.to(torch.float32, copy=True).sub_(zero).mul_(scale)


def fake_quantize(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Round ``w`` to the grid and back (float32)."""
    return dequantize_codes(quantize_codes(w, scale, zero, bits), scale, zero)


def expand_groups(t: Tensor, g_idx: Tensor) -> Tensor:
    """Per-group ``[out, n_groups]`` values expanded to per-column ``[out, in]`` through ``g_idx``."""
    return t[:, g_idx.long()]


def quantize_grouped(w: Tensor, bits: int, group_size: int, sym: bool,
                     *, mse: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest of a whole ``[out, in]`` matrix with contiguous groups.

    Returns:
        ``(codes [out, in] uint8, scale [out, in/g], zero [out, in/g])``.
    """
    groups = to_groups(w.float(), group_size)  # [out, in/g, g]
    scale, zero = compute_qparams(groups, bits, sym, mse=mse)  # [out, in/g]
    codes = quantize_codes(groups, scale.unsqueeze(-1), zero.unsqueeze(-1), bits)  # [out, in/g, g]
    return codes.reshape(w.shape), scale, zero
