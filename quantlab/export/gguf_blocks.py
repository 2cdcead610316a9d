"""GGUF blocks from quantlab codes and fp16 scales, bit for bit (pure numpy; ``docs/formats.md#gguf``).

One block holds 32 consecutive weights of a row (``QK4_0 = QK4_1 = QK8_0 = 32``); layouts are ggml's
``block_q4_0`` / ``block_q4_1`` / ``block_q8_0`` (``ggml/src/ggml-common.h``), decoded by
``gguf-py/gguf/quants.py``:

| type | bytes | layout                                                   | weight ``j`` of the block  |
|------|-------|----------------------------------------------------------|----------------------------|
| Q4_0 | 18    | ``d`` fp16, ``qs[16]``: byte ``j`` = ``q[j] + 16·q[j+16]`` | ``d · (q[j] − 8)``         |
| Q4_1 | 20    | ``d`` fp16, ``m`` fp16, ``qs[16]`` as Q4_0                | ``d · q[j] + m``           |
| Q8_0 | 34    | ``d`` fp16, ``q[32]`` int8                               | ``d · q[j]``               |

quantlab dequantizes ``scale · (u − z)`` in float32 with an fp16-exact ``scale``
(``quantlab/quant/grid.py``); with ``d = scale`` the products are the same float32 numbers:

- symmetric ``b ≤ 4`` bits (``z = 2^(b−1)``) -> Q4_0 with ``q = u + 8 − 2^(b−1)``;
- symmetric ``b ≤ 8`` bits -> Q8_0 with ``q = u − 2^(b−1)``;
- asymmetric 4 bits -> Q4_1 with ``q = u``, ``m = −scale · z``, exact only where ``m`` is an fp16 number
  (:func:`q4_1_exact`), which a 4-bit ``z`` times an 11-bit significand usually is not.

Every group must cover whole blocks: ``group_size`` a multiple of 32, or per channel with ``in % 32 == 0``.
"""

from __future__ import annotations

import numpy as np

BLOCK = 32


def check_blocks(in_features: int, group_size: int) -> None:
    """Refuse groups that do not cover whole 32-column blocks (``ValueError`` with the reason)."""
    g = in_features if group_size == -1 else group_size
    if in_features % BLOCK or g % BLOCK:
        raise ValueError(f"GGUF blocks hold {BLOCK} columns: need in_features % {BLOCK} == 0 and group_size "
                         f"a multiple of {BLOCK} (or per channel); got in={in_features}, group_size={group_size}")


def block_scales(scales: np.ndarray, in_features: int, group_size: int) -> np.ndarray:
    """Per-group values ``[out, groups]`` repeated to one per 32-column block ``[out, in/32]``."""
    check_blocks(in_features, group_size)
    g = in_features if group_size == -1 else group_size
    return np.repeat(scales, g // BLOCK, axis=1)


def _fp16_bytes(values: np.ndarray, what: str) -> np.ndarray:
    """``values`` (float32, fp16-exact) as fp16 bytes ``[..., 2]``; refuses values fp16 would round."""
    half = values.astype(np.float16)
    if not np.array_equal(half.astype(np.float32), values.astype(np.float32)):
        raise ValueError(f"{what} are not fp16 numbers: the block would round them (store results as_stored)")
    return half[..., None].view(np.uint8)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """``[out, nb, 32]`` 4-bit values -> ``[out, nb, 16]`` bytes, element ``j`` low, ``j + 16`` high."""
    return (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)


def _blocks(codes: np.ndarray) -> np.ndarray:
    out_f, in_f = codes.shape
    return codes.reshape(out_f, in_f // BLOCK, BLOCK)


def q4_0(codes: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """Symmetric ``bits ≤ 4`` codes ``[out, in]`` and block scales ``[out, in/32]`` -> Q4_0 bytes ``[out, in/32·18]``."""
    if bits > 4:
        raise ValueError(f"Q4_0 holds 4-bit codes, got {bits}-bit")
    q = _blocks(codes.astype(np.uint8) + np.uint8(8 - (1 << (bits - 1))))
    out = np.concatenate([_fp16_bytes(scales, "scales"), _nibbles(q)], axis=-1)
    return out.reshape(codes.shape[0], -1)


def q8_0(codes: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """Symmetric ``bits ≤ 8`` codes and block scales -> Q8_0 bytes ``[out, in/32·34]``."""
    q = (codes.astype(np.int16) - (1 << (bits - 1))).astype(np.int8).view(np.uint8)
    out = np.concatenate([_fp16_bytes(scales, "scales"), _blocks(q)], axis=-1)
    return out.reshape(codes.shape[0], -1)


def q4_1_offsets(scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    """``m = −scale · z`` in float32 (exact: an 11-bit significand times a 4-bit integer)."""
    return (-scales.astype(np.float32) * zeros.astype(np.float32)).astype(np.float32)


def q4_1_exact(scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    """Where Q4_1's fp16 ``m`` equals ``−scale · z`` (the only groups Q4_1 stores without loss)."""
    m = q4_1_offsets(scales, zeros)
    return m.astype(np.float16).astype(np.float32) == m


def q4_1(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    """Asymmetric 4-bit codes, block scales and block zero points -> Q4_1 bytes ``[out, in/32·20]``.

    Raises:
        ValueError: some ``−scale · z`` is not an fp16 number (Q4_1 would change those weights).
    """
    exact = q4_1_exact(scales, zeros)
    if not exact.all():
        raise ValueError(f"Q4_1 would round m = -scale*z to fp16 in {int((~exact).sum())} of {exact.size} blocks")
    m = q4_1_offsets(scales, zeros)
    q = _blocks(codes.astype(np.uint8))
    out = np.concatenate([_fp16_bytes(scales, "scales"), _fp16_bytes(m, "offsets"), _nibbles(q)], axis=-1)
    return out.reshape(codes.shape[0], -1)
