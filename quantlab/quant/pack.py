"""Dense int32 bit packing of unsigned codes: the one packer every format uses (docs/formats.md#bit-packing).

Along the packed dimension, element ``i`` occupies bits ``[i·b, (i+1)·b)`` of a little-endian stream
of int32 words; values straddle word boundaries when ``32 % b != 0`` (3 bit: 32 values fill 3 words).
``n`` elements take ``ceil(n·b/32)`` words. The packing itself is compressed-tensors' ``pack_to_int32``
(>= 0.18, dense), which takes signed values ``q = u - 2^(b-1)``; this module speaks unsigned codes, and
GPTQ's ``qweight`` / ``qzeros`` are the same stream transposed.

Shape constraints are the exporter's: GPTQ needs ``in % 32 == 0`` (``qweight``) and ``out % 32 == 0``
(``qzeros``); compressed-tensors accepts any length (the last word is zero-padded).
"""

from __future__ import annotations

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from torch import Tensor


def _check(bits: int, dim: int, ndim: int) -> int:
    if not 1 <= bits <= 8:
        raise ValueError(f"packing supports 1-8 bits, got {bits}")
    if ndim != 2 or dim not in (0, 1, -1, -2):
        raise ValueError(f"packing expects a 2-D tensor and dim 0 or 1, got {ndim}-D and dim {dim}")
    return dim % 2


# Rows packed at once: each row is packed on its own, and a whole Linear's int32 copies (two of them, 8 bytes
# a weight) were a streamed 7B export's peak (0.36 GB for a 4096x11008 down_proj)
PACK_ROWS = 256


def _pack_rows(codes: Tensor, bits: int) -> Tensor:
    """``codes [r, n]`` packed along dim 1, :data:`PACK_ROWS` rows at a time."""
    parts = []
    for r in range(0, max(codes.shape[0], 1), PACK_ROWS):
        v = codes[r:r + PACK_ROWS].to(torch.int32)
        if v.numel() and (v.min() < 0 or v.max() >= 1 << bits):
            raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing")
        parts.append(pack_to_int32((v - (1 << (bits - 1))).to(torch.int8).contiguous(), bits))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def pack_int32(codes: Tensor, bits: int, dim: int = 1) -> Tensor:
    """Pack unsigned ``codes [r, n]`` (values in ``[0, 2^bits)``) along ``dim`` into int32 words.

    Returns:
        ``[r, ceil(n·bits/32)]`` for ``dim=1`` (``[ceil(r·bits/32), n]`` for ``dim=0``), int32.
    """
    dim = _check(bits, dim, codes.dim())
    if dim == 0:  # compressed-tensors' packed_dim=0 path needs contiguous rows; pack the transpose instead
        return _pack_rows(codes.T, bits).T.contiguous()
    return _pack_rows(codes, bits)


def unpack_int32(packed: Tensor, bits: int, size: int, dim: int = 1) -> Tensor:
    """Inverse of :func:`pack_int32`: ``size`` codes per packed run, as uint8."""
    dim = _check(bits, dim, packed.dim())
    p = packed.T if dim == 0 else packed
    signed = unpack_from_int32(p.contiguous(), bits, torch.Size([p.shape[0], size]))
    codes = (signed.to(torch.int32) + (1 << (bits - 1))).to(torch.uint8)
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
