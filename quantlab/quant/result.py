"""What a backend returns for one Linear: codes, grid parameters, the dequantized weight and its cost."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from quantlab.quant import grid, kquant
from quantlab.quant.registry import get_backend

SCALE_BITS = 16  # scales (and billm means) are exported as fp16/bf16
G_IDX_BITS = 32  # g_idx is int32


@dataclass(frozen=True)
class QuantResult:
    """One quantized weight matrix ``[out, in]`` (frozen; tensors on the device the solver ran on; :meth:`to` moves them).

    Uniform backends (rtn, gptq) follow the layout table of :mod:`quantlab.quant.grid`:
    ``dequantize() == scales[:, g] * (codes - zeros[:, g])`` with ``g = g_idx`` (``c // group_size`` when
    ``g_idx`` is None) and ``zeros = 2^(bits-1)`` when ``sym``.

    billm (see :mod:`quantlab.quant.billm`): ``codes`` hold 2 bits per weight, ``sign | second << 1``
    (``second`` = residual sign on salient columns, group bit elsewhere); ``scales`` and
    ``extra['means']`` are ``[out, 4 * n_blocks]`` (4 binarizations per row and block); the salient
    column bitmap is ``extra['salient_mask']``; ``group_size`` is the block size.

    GGUF K grids (rtn/gptq with ``args['grid']``, see :mod:`quantlab.quant.kquant`): ``group_size`` is the
    sub-block; ``extra`` holds what the format stores, fp16 ``d`` ``[out, in/256]`` and integer ``sc``
    ``[out, in/sub]`` (unsigned types also ``dmin`` and ``m``); ``scales = d·sc`` (float32, exact) and
    ``zeros`` is None (an unsigned type's offset ``−dmin·m`` is no integer zero point: uniform exporters
    cannot store these results); ``bits_per_weight`` is the type's ``type_size·8/256``.

    Attributes:
        backend: registered backend name.
        args: backend options used (damp, act_order, mse, ...).
        bits: code width (billm: 1, its nominal width).
        group_size: columns per group, ``-1`` per channel (billm: block size).
        sym: symmetric grid (no stored zero points).
        codes: ``[out, in]`` uint8 unsigned codes in ``[0, 2^bits - 1]`` (billm: in ``[0, 3]``).
        scales: ``[out, n_groups]`` float32.
        zeros: ``[out, n_groups]`` float32, integer-valued; None when ``sym``.
        g_idx: ``[in]`` int32 group of each input column (act-order), else None.
        dequantized: the quantized weight, shape and dtype of the input weight.
        bits_per_weight: exact storage cost in bits / ``out·in``: codes + scales (16 bit) + zeros (at
            ``bits``) + g_idx (32 bit, only if act-order made it non-trivial) + backend extras.
        extra: backend-specific stored tensors; 0-d tensors are diagnostics and are not stored.
        error: relative output error ``||WX - ŴX||² / ||WX||²`` = ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)``, None
            when no Hessian was given.
        input_scales: ``[in]`` AWQ's scales (:mod:`quantlab.quant.awq`): the codes quantize ``W diag(s)`` and
            the Linear that produces this one's input (a norm, or a Linear's rows) was divided by ``s``; not
            stored in the checkpoint's entry for this Linear (the producer holds the fold). None: no AWQ.
    """

    backend: str
    args: dict[str, Any]
    bits: int
    group_size: int
    sym: bool
    codes: Tensor = field(repr=False)
    scales: Tensor = field(repr=False)
    zeros: Tensor | None = field(repr=False)
    g_idx: Tensor | None = field(repr=False)
    dequantized: Tensor = field(repr=False)
    bits_per_weight: float
    extra: dict[str, Tensor] = field(default_factory=dict, repr=False)
    error: float | None = None
    input_scales: Tensor | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)``."""
        return tuple(self.codes.shape)

    def to(self, device: torch.device | str) -> QuantResult:
        """The same result with every tensor on ``device`` (a no-op copy-free call when already there)."""
        def mv(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return dataclasses.replace(self, codes=mv(self.codes), scales=mv(self.scales), zeros=mv(self.zeros),
                                   g_idx=mv(self.g_idx), dequantized=mv(self.dequantized),
                                   extra={k: mv(v) for k, v in self.extra.items()}, input_scales=mv(self.input_scales))

    def dequantize(self) -> Tensor:
        """Recompute the weight from the stored tensors (bit-exact with ``dequantized`` for rtn/gptq/billm)."""
        dtype = self.dequantized.dtype
        if kquant.grid_of(self) is not None:  # GGUF K grid: from the stored d/sc (dmin/m)
            return kquant.dequantize_result(self).to(dtype)
        codec = get_backend(self.backend).native
        if codec is not None:  # codes of the backend's own kind (BiLLM's bit planes)
            return codec.dequantize(self).to(dtype)
        in_f = self.shape[1]
        zeros = self.zeros if self.zeros is not None else torch.full_like(self.scales, float(grid.sym_zero(self.bits)))
        if g_idx_is_trivial(self.g_idx, in_f, self.group_size):
            # contiguous groups: broadcast each group's scale and zero over a view instead of expanding them
            # to two [out, in] float32 matrices (the same arithmetic, a third of the memory)
            w = grid.dequantize_codes(grid.to_groups(self.codes, self.group_size), self.scales.unsqueeze(-1),
                                      zeros.unsqueeze(-1))
            return w.reshape(self.shape).to(dtype)
        g_idx = self.g_idx
        w = grid.dequantize_codes(self.codes, grid.expand_groups(self.scales, g_idx), grid.expand_groups(zeros, g_idx))
        return w.to(dtype)


def g_idx_is_trivial(g_idx: Tensor | None, in_features: int, group_size: int) -> bool:
    """True when ``g_idx`` is absent or equals ``c // group_size`` (nothing to store)."""
    return g_idx is None or torch.equal(g_idx.long(), grid.trivial_g_idx(in_features, group_size, g_idx.device).long())


def uniform_bits_per_weight(out_features: int, in_features: int, bits: int, group_size: int, sym: bool,
                            g_idx: Tensor | None = None) -> float:
    """Exact storage of a uniform grid per weight, as compressed-tensors packs it.

    codes: ``out · ceil(in·b/32)`` int32 words; scales: 16 bit each; zeros (asymmetric only):
    ``ceil(out·b/32)`` words per group; g_idx: ``in`` int32 when act-order made it non-trivial.
    """
    n_groups = grid.num_groups(in_features, group_size)
    total = out_features * math.ceil(in_features * bits / 32) * 32
    total += out_features * n_groups * SCALE_BITS
    if not sym:
        total += math.ceil(out_features * bits / 32) * 32 * n_groups
    if not g_idx_is_trivial(g_idx, in_features, group_size):
        total += in_features * G_IDX_BITS
    return total / (out_features * in_features)


def stored_bits(tensors: dict[str, Tensor], *, half: tuple[str, ...] = ()) -> int:
    """Bits of the stored tensors: integer tensors at their itemsize, names in ``half`` at 16 bit each.

    0-d tensors are diagnostics and cost nothing.
    """
    total = 0
    for name, t in tensors.items():
        if t.dim() == 0:
            continue
        total += t.numel() * (SCALE_BITS if name in half else t.element_size() * 8)
    return total
