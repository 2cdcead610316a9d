"""GGUF K-quant grids (Q2_K .. Q6_K) that rtn and gptq round onto exactly (pure functions).

llama.cpp stores a row in super-blocks of ``QK_K = 256`` weights, each cut into sub-blocks of 16 or 32
weights. A sub-block's scale (and min) is an integer relative to fp16 super-block factors ``d`` (and
``dmin``). Per sub-block ``j`` of a super-block, code ``q`` of a weight decodes as (float32 arithmetic,
in this order; ggml-org/llama.cpp ``ggml/src/ggml-quants.c`` ``dequantize_row_q*_K``,
``gguf-py/gguf/quants.py`` ``Q*_K.dequantize_blocks``; block structs in ``ggml/src/ggml-common.h``):

| type | sub | q | sub-block scale / min | value |
|------|-----|---|------------------------|-------|
| Q2_K | 16 | 0..3  | ``sc, m`` 4 bit unsigned | ``(d·sc)·q − (dmin·m)`` |
| Q3_K | 16 | 0..7  | ``sc`` 6 bit, −32..31     | ``(d·sc)·(q − 4)`` |
| Q4_K | 32 | 0..15 | ``sc, m`` 6 bit unsigned | ``(d·sc)·q − (dmin·m)`` |
| Q5_K | 32 | 0..31 | ``sc, m`` 6 bit unsigned | ``(d·sc)·q − (dmin·m)`` |
| Q6_K | 16 | 0..63 | ``sc`` int8, −128..127    | ``(d·sc)·(q − 32)`` |

quantlab's convention (:func:`expand`): per sub-block a float32 ``scale = d·sc`` and a ``shift``. For the
unsigned types the shift is the offset ``−(dmin·m)`` and ``w = scale·q + offset``; for the signed types
(Q3_K, Q6_K) it is the zero point ``2^(bits−1)`` and ``w = scale·(q − zero)``, the symmetric grid of
:mod:`quantlab.quant.grid`. Both evaluate bit for bit as gguf's numpy dequantizers do (``a + (−b)`` is
``a − b`` in IEEE arithmetic). The products are exact in float32 (fp16 × ≤ 8-bit × ≤ 6-bit integers;
Q6_K's last one rounds once in either order), so the rounding that matters is the unsigned types' final
subtraction: the uniform form ``scale·(q − z)`` with a float zero point ``z = dmin·m / (d·sc)`` is close,
not bit-exact, which is why K-grid results dequantize through this module.

Codes are ``clamp(round((w − offset) / scale), 0, maxq)`` (signed: ``clamp(round(w / scale) + zero, 0,
maxq)``); a sub-block with ``scale == 0`` decodes to one value whatever its code, and gets code 0 (signed:
the zero point).

Parameters are chosen by :func:`quantlab.quant.kquant_search.kquant_params`; the bytes are written by
:mod:`quantlab.quant.kquant_ggml`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from quantlab.quant.result import QuantResult

QK_K = 256  # weights per super-block (ggml-common.h)


@dataclass(frozen=True)
class KGrid:
    """One K-quant type: code width, sub-block size and the integer widths of its sub-block scales/mins."""

    name: str  # quantlab's key, e.g. "q4_k"
    bits: int
    sub: int  # weights per sub-block (the scheme's group_size)
    signed: bool  # w = scale·(q − zero) with signed sub-block scales, no mins
    sc_bits: int
    m_bits: int  # 0 for the signed types

    @property
    def ggml_name(self) -> str:
        """The ggml type name, e.g. ``Q4_K``."""
        return self.name.upper()

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    @property
    def zero(self) -> int:
        """Zero point of a signed type (``2^(bits−1)``), 0 for the unsigned ones."""
        return 1 << (self.bits - 1) if self.signed else 0

    @property
    def n_sub(self) -> int:
        """Sub-blocks per super-block."""
        return QK_K // self.sub

    @property
    def sc_range(self) -> tuple[int, int]:
        """Integer range of a sub-block scale."""
        half = 1 << (self.sc_bits - 1)
        return (-half, half - 1) if self.signed else (0, 2 * half - 1)

    @property
    def m_max(self) -> int:
        return (1 << self.m_bits) - 1

    @property
    def type_size(self) -> int:
        """Bytes per super-block: codes, packed sub-block scales/mins, fp16 d (and dmin)."""
        return QK_K * self.bits // 8 + self.n_sub * (self.sc_bits + self.m_bits) // 8 + 2 * (1 if self.signed else 2)

    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8 / QK_K


K_GRIDS: dict[str, KGrid] = {g.name: g for g in (
    KGrid("q2_k", 2, 16, False, 4, 4), KGrid("q3_k", 3, 16, True, 6, 0), KGrid("q4_k", 4, 32, False, 6, 6),
    KGrid("q5_k", 5, 32, False, 6, 6), KGrid("q6_k", 6, 16, True, 8, 0))}


@dataclass(frozen=True)
class KParams:
    """Stored parameters of a K-quant matrix ``[out, in]`` (exactly what the format holds, besides codes).

    Attributes:
        grid: the type.
        d: ``[out, in/256]`` float16 super-block scale factor.
        sc: ``[out, in/sub]`` integer sub-block scales (int8 for signed types, else uint8).
        dmin: ``[out, in/256]`` float16 super-block min factor; None for signed types.
        m: ``[out, in/sub]`` uint8 sub-block mins; None for signed types.
    """

    grid: KGrid
    d: Tensor
    sc: Tensor
    dmin: Tensor | None = None
    m: Tensor | None = None


def get_grid(name: str) -> KGrid:
    """The K grid called ``name`` (``q2_k`` .. ``q6_k``, any case); ``ValueError`` naming the valid ones."""
    key = str(name).lower()
    if key not in K_GRIDS:
        raise ValueError(f"unknown grid {name!r}; K-quant grids: {sorted(K_GRIDS)}")
    return K_GRIDS[key]


def check_grid(name: str, bits: int, group_size: int, sym: bool, in_features: int) -> KGrid:
    """The grid ``name`` if the scheme agrees with it and ``in_features`` is a multiple of 256, else ``ValueError``."""
    g = get_grid(name)
    if (bits, group_size, sym) != (g.bits, g.sub, g.signed):
        raise ValueError(f"grid {g.name!r} needs bits={g.bits}, group_size={g.sub}, sym={g.signed}; "
                         f"got bits={bits}, group_size={group_size}, sym={sym}")
    if in_features % QK_K:
        raise ValueError(f"grid {g.name!r} needs in_features to be a multiple of {QK_K}, got {in_features}")
    return g


def scheme_grid_problem(scheme, in_features: int | None = None, *, plain_bits: tuple[int, ...]) -> str | None:
    """Why ``scheme`` (a QuantScheme) cannot run, as far as K grids go: an unknown grid, a grid whose
    bits/group/sym disagree, rows not a multiple of 256 (when ``in_features`` is known), or without a grid
    a width outside ``plain_bits``. None: it can. The backends' ``check`` hook (plan and preflight ask it)."""
    name = scheme.args.get("grid")
    if name is None:
        return None if scheme.bits in plain_bits else (
            f"backend {scheme.backend!r} takes bits in {list(plain_bits)}, got {scheme.bits} (other widths only "
            "on a K grid: option grid q5_k / q6_k)")
    try:
        check_grid(name, scheme.bits, scheme.group_size, scheme.sym, QK_K if in_features is None else in_features)
    except (KeyError, ValueError) as err:
        return str(err)
    return None


def grid_of(result: QuantResult) -> KGrid | None:
    """The K grid a result was solved on (``result.args['grid']``), None for plain uniform results."""
    name = result.args.get("grid")
    return None if name is None else get_grid(name)


# ---------------------------------------------------------------------------------------------------------
# The grid: expand, quantize, dequantize
# ---------------------------------------------------------------------------------------------------------
def expand(params: KParams) -> tuple[Tensor, Tensor]:
    """Per sub-block ``(scale, shift)``, float32 ``[out, in/sub]``: ``scale = d·sc``; ``shift`` the offset
    ``−(dmin·m)`` (unsigned types) or the zero point ``2^(bits−1)`` (signed types)."""
    g = params.grid
    scale = params.d.float().repeat_interleave(g.n_sub, dim=1) * params.sc.float()
    if g.signed:
        return scale, torch.full_like(scale, float(g.zero))
    return scale, -(params.dmin.float().repeat_interleave(g.n_sub, dim=1) * params.m.float())


def quantize_codes(w: Tensor, scale: Tensor, shift: Tensor, grid: KGrid) -> Tensor:
    """Codes of ``w`` on the grid (broadcasting), uint8: nearest step, clamped to ``[0, maxq]``."""
    w = w.float()
    flat = scale == 0
    safe = torch.where(flat, torch.ones_like(scale), scale)
    u = torch.round(w / safe) + shift if grid.signed else torch.round((w - shift) / safe)
    u = torch.where(flat, shift if grid.signed else torch.zeros_like(shift), u)
    return torch.clamp(u, 0, grid.maxq).to(torch.uint8)


def dequantize_codes(codes: Tensor, scale: Tensor, shift: Tensor, grid: KGrid) -> Tensor:
    """The stored value of ``codes`` (float32, broadcasting), in gguf's order of operations."""
    if grid.signed:
        return (codes.float() - shift) * scale
    return codes.float() * scale + shift


def quantize_matrix(weight: Tensor, params: KParams) -> tuple[Tensor, Tensor]:
    """Round-to-nearest of ``weight [out, in]`` on the fixed grid: ``(codes uint8, w_hat float32)``, ``[out, in]``."""
    g = params.grid
    out_f, in_f = weight.shape
    scale, shift = (t.unsqueeze(-1) for t in expand(params))  # [out, in/sub, 1]
    x = weight.float().reshape(out_f, in_f // g.sub, g.sub)
    codes = quantize_codes(x, scale, shift, g)
    return codes.reshape(out_f, in_f), dequantize_codes(codes, scale, shift, g).reshape(out_f, in_f)


# ---------------------------------------------------------------------------------------------------------
# QuantResult <-> stored parameters
# ---------------------------------------------------------------------------------------------------------
def params_extra(params: KParams) -> dict[str, Tensor]:
    """The parameters as ``QuantResult.extra``: ``d``, ``sc`` (and ``dmin``, ``m``)."""
    out = {"d": params.d, "sc": params.sc}
    if not params.grid.signed:
        out.update(dmin=params.dmin, m=params.m)
    return out


def params_of(result: QuantResult) -> KParams:
    """The stored parameters of a K-grid result (from its ``extra``)."""
    g = grid_of(result)
    if g is None:
        raise ValueError(f"{result.backend} result has no K grid (args {result.args})")
    e = result.extra
    return KParams(g, e["d"], e["sc"], e.get("dmin"), e.get("m"))


def dequantize_result(result: QuantResult) -> Tensor:
    """The float32 weight a K-grid result stores (its codes on the grid of its ``extra``)."""
    params = params_of(result)
    g = params.grid
    out_f, in_f = result.codes.shape
    scale, shift = (t.unsqueeze(-1) for t in expand(params))
    codes = result.codes.reshape(out_f, in_f // g.sub, g.sub)
    return dequantize_codes(codes, scale, shift, g).reshape(out_f, in_f)
