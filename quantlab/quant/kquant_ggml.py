"""ggml's byte layout of the K-quant blocks, written from a K-grid :class:`QuantResult` (numpy, pure).

One super-block of 256 weights per row and block, fields in struct order (ggml-org/llama.cpp
``ggml/src/ggml-common.h`` ``block_q*_K``; packing as ``quantize_row_q*_K_ref`` in
``ggml/src/ggml-quants.c``, read back by ``gguf-py/gguf/quants.py``). ``L`` are the 256 codes of the block:

* Q2_K: ``scales[16] = sc | m << 4``; ``qs[64]``: for half ``h`` and ``l < 32``,
  ``qs[32h + l] = Σ_i L[128h + 32i + l] << 2i``; fp16 ``d``, ``dmin``.
* Q3_K: ``hmask[32]``: bit ``b`` of ``hmask[l]`` is bit 2 of ``L[32b + l]``; ``qs[64]`` the low 2 bits as
  Q2_K; ``scales[12]`` the 6-bit ``sc + 32``: low nibbles of sub-blocks ``j`` and ``j + 8`` in byte ``j``
  (``j < 8``), the high 2 bits of sub-block ``4i + k`` at bits ``2i`` of byte ``8 + k``; fp16 ``d``.
* Q4_K: fp16 ``d``, ``dmin``; ``scales[12]`` (``get_scale_min_k4``): for ``j < 4`` byte ``j`` holds
  ``sc[j]`` and the high 2 bits of ``sc[j+4]`` (bits 6-7), byte ``j + 4`` ``m[j]`` and those of ``m[j+4]``,
  byte ``j + 8`` the low nibbles of ``sc[j+4]`` and ``m[j+4]``; ``qs[128]``: ``qs[32c + l] = L[64c + l] |
  L[64c + 32 + l] << 4``.
* Q5_K: as Q4_K with ``qh[32]`` before ``qs``: bit ``i`` of ``qh[l]`` is bit 4 of ``L[32i + l]``.
* Q6_K: ``ql[128]``: for half ``h``, ``ql[64h + l] = L[128h + l] | L[128h + 64 + l] << 4`` and
  ``ql[64h + 32 + l] = L[128h + 32 + l] | L[128h + 96 + l] << 4`` (low nibbles); ``qh[64]``:
  ``qh[32h + l] = Σ_i (L[128h + 32i + l] >> 4) << 2i``; ``scales[16]`` int8; fp16 ``d``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from quantlab.quant.kquant import K_GRIDS, QK_K, KGrid, grid_of, params_of

if TYPE_CHECKING:
    from quantlab.quant.result import QuantResult

BYTES_PER_BLOCK: dict[str, int] = {name: GGML_QUANT_SIZES[GGMLQuantizationType[g.ggml_name]][1]
                                   for name, g in K_GRIDS.items()}  # bytes per 256 weights, gguf's own table


def ggml_type(result: QuantResult) -> GGMLQuantizationType:
    """The ggml tensor type of a K-grid result (``ValueError`` for other results)."""
    g = grid_of(result)
    if g is None:
        raise ValueError(f"{result.backend} result was not solved on a K grid (args {result.args})")
    return GGMLQuantizationType[g.ggml_name]


def _f16(t) -> np.ndarray:
    """fp16 ``[B]`` as little-endian bytes ``[B, 2]``."""
    return t.cpu().numpy().astype("<f2").reshape(-1, 1).view(np.uint8)


def _crumbs(L: np.ndarray, width: int) -> np.ndarray:
    """``[B, k, n, 32]`` values of ``width`` bits -> ``[B, k·32]`` bytes, value ``i`` at bits ``width·i``."""
    return np.bitwise_or.reduce(L << (width * np.arange(L.shape[2], dtype=np.uint8)).reshape(1, 1, -1, 1),
                                axis=2).reshape(L.shape[0], -1)


def _scales_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K 6-bit ``sc, m`` ``[B, 8]`` -> ``[B, 12]``."""
    lo = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mid = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    return np.concatenate([lo, mid, hi], axis=1)


def _scales_q3(sc: np.ndarray) -> np.ndarray:
    """Q3_K signed 6-bit scales ``[B, 16]`` -> ``[B, 12]``."""
    u = (sc.astype(np.int16) + 32).astype(np.uint8)
    low = (u[:, :8] & 0xF) | ((u[:, 8:] & 0xF) << 4)
    high = _crumbs(((u >> 4) & 3).reshape(-1, 1, 4, 4), 2)  # [B, 4]: sub-block 4i + k at bits 2i
    return np.concatenate([low, high], axis=1)


def _blocks(g: KGrid, L: np.ndarray, d, sc: np.ndarray, dmin, m) -> np.ndarray:
    """Codes ``L [B, 256]`` and parameters of ``B`` super-blocks -> ``[B, type_size]`` bytes."""
    n = L.shape[0]
    if g.name == "q2_k":
        return np.concatenate([sc | (m << 4), _crumbs(L.reshape(n, 2, 4, 32), 2), _f16(d), _f16(dmin)], axis=1)
    if g.name == "q3_k":
        hmask = _crumbs(((L >> 2) & 1).reshape(n, 1, 8, 32), 1)
        return np.concatenate([hmask, _crumbs((L & 3).reshape(n, 2, 4, 32), 2), _scales_q3(sc), _f16(d)], axis=1)
    if g.name in ("q4_k", "q5_k"):
        qs = _crumbs((L & 0xF).reshape(n, 4, 2, 32), 4)
        qh = [_crumbs(((L >> 4) & 1).reshape(n, 1, 8, 32), 1)] if g.name == "q5_k" else []
        return np.concatenate([_f16(d), _f16(dmin), _scales_k4(sc, m), *qh, qs], axis=1)
    low = (L & 0xF).reshape(n, 2, 2, 2, 32).transpose(0, 1, 3, 2, 4)  # [B, half, pair (i, i+2), i, 32]
    ql = _crumbs(low.reshape(n * 2, 2, 2, 32), 4).reshape(n, 128)
    qh = _crumbs((L >> 4).reshape(n, 2, 4, 32), 2)
    return np.concatenate([ql, qh, sc.view(np.uint8), _f16(d)], axis=1)


def encode_blocks(result: QuantResult) -> np.ndarray:
    """ggml's bytes of a K-grid result: uint8 ``[out, (in/256)·type_size]``, rows as gguf stores them.

    ``gguf.quants.dequantize(encode_blocks(r), ggml_type(r))`` equals :func:`quantlab.quant.kquant.dequantize_result`
    (float32) bit for bit, and so ``r.dequantized`` when the weight was float32 (else its rounding to that dtype).
    """
    p = params_of(result)
    g = p.grid
    out_f, in_f = result.codes.shape
    n = out_f * (in_f // QK_K)
    L = result.codes.cpu().numpy().astype(np.uint8).reshape(n, QK_K)
    sc = p.sc.cpu().numpy().reshape(n, g.n_sub)
    m = None if g.signed else p.m.cpu().numpy().astype(np.uint8).reshape(n, g.n_sub)
    blocks = _blocks(g, L, p.d.reshape(-1), sc, None if g.signed else p.dmin.reshape(-1), m)
    assert blocks.shape[1] == BYTES_PER_BLOCK[g.name], (g.name, blocks.shape)
    return np.ascontiguousarray(blocks.reshape(out_f, -1))
