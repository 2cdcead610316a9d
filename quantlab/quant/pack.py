"""Dense int32 bit packing of unsigned codes (docs/formats.md#bit-packing).

Along the packed dimension, element ``i`` occupies bits ``[i·b, (i+1)·b)`` of a little-endian stream
of int32 words; values straddle word boundaries when ``32 % b != 0`` (3 bit: 32 values fill 3 words).
``n`` elements take ``ceil(n·b/32)`` words. This is compressed-tensors >= 0.18 ``pack_to_int32`` applied
to ``u - 2^(b-1)`` (it adds the offset back before packing), and, transposed, GPTQ's ``qweight``.

Shape constraints are the exporter's: GPTQ needs ``in % 32 == 0`` (``qweight``) and ``out % 32 == 0``
(``qzeros``); compressed-tensors accepts any length (the last word is zero-padded).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _check(bits: int, dim: int, ndim: int) -> int:
    if not 1 <= bits <= 8:
        raise ValueError(f"packing supports 1-8 bits, got {bits}")
    if ndim != 2 or dim not in (0, 1, -1, -2):
        raise ValueError(f"packing expects a 2-D tensor and dim 0 or 1, got {ndim}-D and dim {dim}")
    return dim % 2


def pack_int32(codes: Tensor, bits: int, dim: int = 1) -> Tensor:
    """Pack unsigned ``codes [r, n]`` (values in ``[0, 2^bits)``) along ``dim`` into int32 words.

    Returns:
        ``[r, ceil(n·bits/32)]`` for ``dim=1`` (``[ceil(r·bits/32), n]`` for ``dim=0``), int32.
    """
    dim = _check(bits, dim, codes.dim())
    v = codes.to(torch.int64)
    if dim == 0:
        v = v.T
    rows, n = v.shape
    if v.numel() and (v.min() < 0 or v.max() >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    words = math.ceil(n * bits / 32)
    start = torch.arange(n, dtype=torch.int64, device=v.device) * bits  # [n] first bit of each element
    word, off = start // 32, start % 32
    out = torch.zeros(rows, words + 1, dtype=torch.int64, device=v.device)  # one spare word for the straddling part
    out.scatter_add_(1, word.expand(rows, n), (v << off) & 0xFFFFFFFF)
    out.scatter_add_(1, (word + 1).expand(rows, n), v >> (32 - off))  # high part of straddling values
    out = out[:, :words]
    out = torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)
    return (out.T if dim == 0 else out).contiguous()


def unpack_int32(packed: Tensor, bits: int, size: int, dim: int = 1) -> Tensor:
    """Inverse of :func:`pack_int32`: ``size`` codes per packed run, as uint8."""
    dim = _check(bits, dim, packed.dim())
    p = packed.to(torch.int64) & 0xFFFFFFFF
    if dim == 0:
        p = p.T
    rows = p.shape[0]
    p = torch.cat([p, torch.zeros(rows, 1, dtype=torch.int64, device=p.device)], dim=1)
    start = torch.arange(size, dtype=torch.int64, device=p.device) * bits
    word, off = start // 32, start % 32
    stream = p[:, word] | ((p[:, word + 1] & 0xFF) << 32)  # [rows, size] window holding each value
    codes = ((stream >> off) & ((1 << bits) - 1)).to(torch.uint8)
    return (codes.T if dim == 0 else codes).contiguous()


def pack_gptq_qweight(codes: Tensor, bits: int) -> Tensor:
    """GPTQ ``qweight [in·b/32, out]`` from codes ``[out, in]`` (packed along the input dim)."""
    if codes.shape[1] % 32:
        raise ValueError(f"GPTQ qweight needs in_features % 32 == 0, got codes {tuple(codes.shape)}")
    return pack_int32(codes.T, bits, dim=0)


def pack_gptq_qzeros(zeros: Tensor, bits: int, *, v1: bool = True) -> Tensor:
    """GPTQ ``qzeros [n_groups, out·b/32]`` from integer zero points ``[out, n_groups]``.

    ``v1=True`` stores ``z - 1`` (AutoGPTQ's "gptq" format, docs/formats.md#v1-zero-points); it cannot hold ``z = 0``.
    """
    if zeros.shape[0] % 32:
        raise ValueError(f"GPTQ qzeros needs out_features % 32 == 0, got zeros {tuple(zeros.shape)}")
    z = zeros.round().to(torch.int64) - (1 if v1 else 0)
    if v1 and (z < 0).any():
        raise ValueError("GPTQ v1 qzeros cannot store a zero point of 0; use v1=False (gptq_v2)")
    return pack_int32(z.T, bits, dim=1)
