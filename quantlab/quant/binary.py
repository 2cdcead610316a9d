"""Binarization primitives for BiLLM-style backends (pure functions, rows = output channels).

A binarization of the masked entries of each row is ``ŵ = s · α + μ`` with ``s = ±1`` (``+1`` where
``w - μ >= 0``; a stored sign bit cannot hold BiLLM's ``sign(0) = 0``), the row mean ``μ`` and the mean
absolute deviation ``α`` of the masked entries (``high_order_residual`` in BiLLM's ``binary.py``).
Rows without masked entries get ``μ = α = 0``.

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


def binarize_params(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row mean ``μ`` and mean absolute deviation ``α`` of the masked entries of ``x [rows, k]``."""
    m = mask.to(x.dtype).expand_as(x)
    cnt = m.sum(-1).clamp_min(1)
    mu = (x * m).sum(-1) / cnt  # [rows]
    alpha = ((x - mu.unsqueeze(-1)).abs() * m).sum(-1) / cnt  # [rows]
    return mu, alpha


def signs(x: Tensor, mu: Tensor) -> Tensor:
    """``±1`` (float) with ``+1`` where ``x - μ >= 0``."""
    return torch.where(x - mu >= 0, 1.0, -1.0)


def binarize(x: Tensor, mu: Tensor, alpha: Tensor) -> Tensor:
    """``s · α + μ`` with ``s = signs(x, μ)`` (broadcasting)."""
    return signs(x, mu) * alpha + mu


def residual_binarize(x: Tensor, mask: Tensor, order: int = 2) -> Tensor:
    """Masked order-``order`` residual binarization of ``x [rows, k]`` (0 outside ``mask``)."""
    total = torch.zeros_like(x)
    m = mask.expand_as(x)
    for _ in range(order):
        r = x - total
        mu, alpha = binarize_params(r, m)
        total = total + torch.where(m, binarize(r, mu.unsqueeze(-1), alpha.unsqueeze(-1)), 0.0)
    return total


def pack_bits(bits: Tensor) -> Tensor:
    """Pack a bool/0-1 tensor along its last dim, 8 per uint8, LSB first: ``[..., n] -> [..., ceil(n/8)]``."""
    n = bits.shape[-1]
    pad = (-n) % 8
    b = torch.nn.functional.pad(bits.to(torch.uint8), (0, pad)).reshape(*bits.shape[:-1], -1, 8)
    weights = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)
    return (b * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: ``[..., ceil(n/8)] uint8 -> [..., n] bool``."""
    shifts = torch.arange(8, dtype=torch.uint8)
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
    s = ((codes & 1).float() * 2 - 1)  # [out, in] ±1
    second = ((codes >> 1) & 1).long()  # [out, in]
    base = (torch.arange(in_f) // block * 4).expand(out_f, in_f)  # [out, in] slot 0 of the column's block
    sal = salient.expand(out_f, in_f)
    s2 = second.float() * 2 - 1
    q_sal = ((s * scales.gather(1, base + SALIENT_O1) + means.gather(1, base + SALIENT_O1))
             + (s2 * scales.gather(1, base + SALIENT_O2) + means.gather(1, base + SALIENT_O2)))
    k = base + SMALL + second
    q_rest = s * scales.gather(1, k) + means.gather(1, k)
    return torch.where(sal, q_sal, q_rest)
