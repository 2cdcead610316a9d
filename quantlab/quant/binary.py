"""Binarization primitives for BiLLM-style backends (pure functions, rows = output channels).

A binarization of the masked entries of each row is ``ŵ = s · α + μ`` with the row mean ``μ`` and the
mean absolute deviation ``α`` of the masked entries (``high_order_residual`` in BiLLM's ``binary.py``),
and ``s = ±1``: ``+1`` where ``w - μ`` has a clear sign bit, i.e. ``w >= μ`` (a stored sign bit cannot
hold BiLLM's ``sign(0) = 0``). Rows without masked entries get ``μ = α = 0``.

Dequantization of a billm result, per output row and block ``b`` of ``block_size`` columns, with the
four binarizations ``k = 4b + {0: salient order 1, 1: salient order 2, 2: small group, 3: large group}``:

| column        | second bit (``codes >> 1``) | ``ŵ``                                               |
|---------------|-----------------------------|------------------------------------------------------|
| salient       | sign ``s2`` of the residual | ``(s·α[4b] + μ[4b]) + (s2·α[4b+1] + μ[4b+1])``        |
| not salient   | group (1 = large ``|w|``)   | ``s·α[4b+2+grp] + μ[4b+2+grp]``                      |
"""

from __future__ import annotations

import torch
from torch import Tensor

SALIENT_O1, SALIENT_O2, SMALL, LARGE = 0, 1, 2, 3  # binarization slots per block


def binarize_params(x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-row mean ``μ`` and mean absolute deviation ``α`` of ``x [rows, k]`` (of its masked entries).

    ``mask`` (bool or 0/1 float, broadcastable to ``x``) selects the entries; None takes them all.
    """
    if mask is None:
        mu = x.mean(-1)
        return mu, (x - mu.unsqueeze(-1)).abs().mean(-1)
    m = mask.to(x.dtype).expand_as(x)
    cnt = m.sum(-1).clamp_min(1)
    mu = (x * m).sum(-1) / cnt  # [rows]
    alpha = ((x - mu.unsqueeze(-1)).abs() * m).sum(-1) / cnt  # [rows]
    return mu, alpha


def positive(x: Tensor, mu: Tensor) -> Tensor:
    """The stored sign bit: True where ``x - μ`` has a clear sign bit (``x >= μ``)."""
    return ~torch.signbit(x - mu)


def binarize(x: Tensor, mu: Tensor, alpha: Tensor) -> Tensor:
    """``s · α + μ`` with ``s = +1`` where :func:`positive` (broadcasting).

    Computed as ``copysign(α, x - μ) + μ``, which is bit-identical to ``μ + α`` / ``μ - α`` (``α >= 0``).
    """
    return torch.copysign(alpha, x - mu) + mu


def residual_binarize(x: Tensor, order: int = 2) -> Tensor:
    """Order-``order`` residual binarization of every row of ``x [rows, k]`` (BiLLM's salient path)."""
    total = torch.zeros_like(x)
    for _ in range(order):
        r = x - total
        mu, alpha = binarize_params(r)
        total = total + binarize(r, mu.unsqueeze(-1), alpha.unsqueeze(-1))
    return total


def pack_bits(bits: Tensor) -> Tensor:
    """Pack a bool/0-1 tensor along its last dim, 8 per uint8, LSB first: ``[..., n] -> [..., ceil(n/8)]``."""
    n = bits.shape[-1]
    pad = (-n) % 8
    b = torch.nn.functional.pad(bits.to(torch.uint8), (0, pad)).reshape(*bits.shape[:-1], -1, 8)
    weights = (1 << torch.arange(8, dtype=torch.int32, device=bits.device)).to(torch.uint8)
    return (b * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: ``[..., ceil(n/8)] uint8 -> [..., n] bool``."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # [..., ceil(n/8), 8]
    return bits.reshape(*packed.shape[:-1], -1)[..., :n].bool()


def dequantize_binary(codes: Tensor, scales: Tensor, means: Tensor, salient: Tensor, block_size: int) -> Tensor:
    """Rebuild a billm weight ``[out, in]`` (float32) from its stored parts.

    Args:
        codes: ``[out, in]`` uint8, ``sign | second << 1``.
        scales: ``[out, 4 · n_blocks]`` ``α`` per row and binarization.
        means: ``[out, 4 · n_blocks]`` ``μ`` per row and binarization.
        salient: ``[in]`` bool salient-column map.
        block_size: columns per block (``-1``: one block).
    """
    out_f, in_f = codes.shape
    block = in_f if block_size == -1 else block_size
    pos = (codes & 1).bool()  # [out, in] sign bit: +1
    second = ((codes >> 1) & 1).long()  # [out, in]
    base = (torch.arange(in_f, device=codes.device) // block * 4).expand(out_f, in_f)  # [out, in] slot 0 of the column's block

    def level(slot: Tensor, plus: Tensor) -> Tensor:  # μ ± α of binarization ``slot`` per element
        mu, alpha = means.gather(1, slot), scales.gather(1, slot)
        return torch.where(plus, mu + alpha, mu - alpha)

    q_sal = level(base + SALIENT_O1, pos) + level(base + SALIENT_O2, second.bool())
    q_rest = level(base + SMALL + second, pos)
    return torch.where(salient.expand(out_f, in_f), q_sal, q_rest)
