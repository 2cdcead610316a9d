"""BiLLM-style binarization (``billm``, Huang et al. 2024, "braq"), with GPTQ-style error compensation.

Per block of ``block_size`` input columns (docs/method.md#billm-braq; ``Aaronhuang-778/BiLLM`` ``bigptq.py``):

1. Salience ``w² / [chol(H⁻¹)]_jj²`` summed over rows ranks the columns; the number ``k`` of salient
   columns (``1 <= k <= max_salient``) minimises the Hessian-weighted binarization error of the block,
   with salient columns binarized at order 2 and the rest at order 2 as a proxy (as the reference does).
2. Salient columns: residual binarization of order 2 (two ``(α, μ)`` per row).
3. The other weights are split at a break point ``p`` of ``|w|`` (searched over quantiles 0.1-0.9) into a
   small and a large group, each binarized once (one ``(α, μ)`` per row each).
4. The ``(α, μ)`` and the masks are fixed at the start of the block; the columns are then binarized one
   by one with the GPTQ update ``W1[i+1:] -= Hinv1[i, i+1:]ᵀ (w - q) / Hinv1[i, i]`` inside the block and
   the lazy update across blocks. (The reference binarizes the whole block at once and compensates only
   later blocks.) The group of a compensated weight is ``|w| >= p``.

Stored (``extra``; the layout of :func:`billm_layout`; dequantization in
:mod:`quantlab.quant.binary`):

| tensor          | dtype            | shape                       | meaning                                   |
|-----------------|------------------|-----------------------------|-------------------------------------------|
| ``sign_packed`` | uint8            | ``[out, ceil(in/8)]``       | sign bit of every weight, LSB first       |
| ``second_packed``| uint8           | ``[out, ceil(in/8)]``       | residual sign (salient) / group bit       |
| ``salient_mask``| uint8            | ``[ceil(in/8)]``            | salient-column bitmap                     |
| ``scales``      | fp16 on export   | ``[out, 4·n_blocks]``       | ``α`` (the result's ``scales``)           |
| ``means``       | fp16 on export   | ``[out, 4·n_blocks]``       | ``μ``                                     |

``bits_per_weight`` counts exactly these (about ``2 + 128/block_size`` bits). ``extra['nominal_bits']``
(0-d, not stored) is BiLLM's headline convention, ``1 + salient fraction``: one sign per weight plus one
residual sign per salient weight, ignoring the group bitmap, the column bitmap and the fp16 ``α, μ``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from quantlab.quant import binary, grid
from quantlab.quant.binary import LARGE, SALIENT_O1, SALIENT_O2, SMALL
from quantlab.quant.hessian import inverse_hessian_cholesky, relative_output_error, working_hessian
from quantlab.quant.layout import FP16, UINT8, Layout, TensorSpec
from quantlab.quant.registry import NativeCodec, register_backend
from quantlab.quant.result import QuantResult, stored_bits
from quantlab.quant.scheme import QuantScheme

BILLM_OPTIONS = ("damp", "max_salient", "break_points")


def _weighted_error(x: Tensor, q: Tensor, c: Tensor) -> Tensor:
    """``sum_j c_j ||x[:, j] - q[:, j]||²`` for ``x, q [out, k]``, column weights ``c [k]``."""
    return ((x - q).square() * c).sum()


def select_salient(Wb: Tensor, c: Tensor, max_salient: int) -> Tensor:
    """Salient-column map ``[k]`` of a block ``Wb [out, k]`` (see step 1 of the module docstring)."""
    k_cols = Wb.shape[1]
    order = torch.argsort((Wb.square() * c).sum(0), descending=True)  # columns by salience
    best, best_k = None, 0
    for k in range(1, min(max_salient, k_cols - 1) + 1):
        top, rest = order[:k], order[k:]
        err = (_weighted_error(Wb[:, top], binary.residual_binarize(Wb[:, top], 2), c[top])
               + _weighted_error(Wb[:, rest], binary.residual_binarize(Wb[:, rest], 2), c[rest]))
        if best is None or err < best:
            best, best_k = err, k
    mask = torch.zeros(k_cols, dtype=torch.bool, device=Wb.device)
    mask[order[:best_k]] = True
    return mask


def search_break(Wb: Tensor, salient: Tensor, c: Tensor, steps: int) -> float:
    """Break point ``p`` on ``|w|`` of the non-salient weights minimising the weighted error (step 3)."""
    rest = Wb[:, ~salient]  # [out, k_rest]
    if rest.numel() == 0:
        return 0.0
    cr = c[~salient]
    a = rest.abs()
    candidates = torch.quantile(a.flatten()[: 1 << 24], torch.linspace(0.1, 0.9, steps, device=a.device))
    best, best_p = None, 0.0
    for p in candidates.tolist():
        large = a >= p
        mu_s, al_s = binary.binarize_params(rest, ~large)
        mu_l, al_l = binary.binarize_params(rest, large)
        lf = large.float()  # pick the group's (μ, α) arithmetically: cheaper than torch.where here
        mu = mu_s.unsqueeze(-1) + lf * (mu_l - mu_s).unsqueeze(-1)  # [out, k_rest]
        al = al_s.unsqueeze(-1) + lf * (al_l - al_s).unsqueeze(-1)
        err = _weighted_error(rest, binary.binarize(rest, mu, al), cr)
        if best is None or err < best:
            best, best_p = err, p
    return best_p


def _block_params(Wb: Tensor, salient: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """``(α, μ)``, each ``[out, 4]``, of the four binarizations of a block ``Wb [out, k]``."""
    out_f = Wb.shape[0]
    alpha, mu = torch.zeros(out_f, 4, device=Wb.device), torch.zeros(out_f, 4, device=Wb.device)
    if salient.any():
        ws = Wb[:, salient]
        mu[:, SALIENT_O1], alpha[:, SALIENT_O1] = binary.binarize_params(ws)
        r = ws - binary.binarize(ws, mu[:, SALIENT_O1, None], alpha[:, SALIENT_O1, None])
        mu[:, SALIENT_O2], alpha[:, SALIENT_O2] = binary.binarize_params(r)
    rest = Wb[:, ~salient]
    large = rest.abs() >= p
    mu[:, SMALL], alpha[:, SMALL] = binary.binarize_params(rest, ~large)
    mu[:, LARGE], alpha[:, LARGE] = binary.binarize_params(rest, large)
    return alpha, mu


def _binarize_column(w: Tensor, salient: bool, alpha: Tensor, mu: Tensor, p: float) -> tuple[Tensor, Tensor, Tensor]:
    """One column ``w [out]`` with its block's ``(α, μ) [out, 4]`` -> ``(q, sign bit, second bit)``.

    The arithmetic is the one of :func:`quantlab.quant.binary.dequantize_binary` (bit-identical).
    """
    if salient:
        q1 = binary.binarize(w, mu[:, SALIENT_O1], alpha[:, SALIENT_O1])
        q2 = binary.binarize(w - q1, mu[:, SALIENT_O2], alpha[:, SALIENT_O2])
        return q1 + q2, binary.positive(w, mu[:, SALIENT_O1]), binary.positive(w - q1, mu[:, SALIENT_O2])
    large = w.abs() >= p
    a = torch.where(large, alpha[:, LARGE], alpha[:, SMALL])
    m = torch.where(large, mu[:, LARGE], mu[:, SMALL])
    return binary.binarize(w, m, a), binary.positive(w, m), large


def billm_solve(W: Tensor, H: Tensor, *, block_size: int = 128, damp: float = 0.01, max_salient: int = 50,
                break_points: int = 41) -> QuantResult:
    """Binarize ``W [out, in]`` BiLLM-style against the Hessian ``H [in, in]``.

    Args:
        W: weight ``[out, in]``.
        H: undamped Hessian ``[in, in]``.
        block_size: columns per block (``-1``: the whole row); salient columns and ``(α, μ)`` are per block.
        damp: relative dampening of ``H``.
        max_salient: most salient columns per block (the reference searches up to 50).
        break_points: candidate break points (quantiles 0.1-0.9 of ``|w|``).
    """
    out_f, in_f = W.shape
    B = grid.group_width(in_f, block_size)
    n_blocks = -(-in_f // B)
    dev = W.device  # everything below runs where the weight is
    Wt = torch.empty(in_f, out_f, device=dev).copy_(W.detach().T)  # [in, out] contiguous: Wt[j] is column j
    Hd = working_hessian(H, consume=False)  # H itself is needed for the error at the end
    dead = torch.diag(Hd) == 0
    Hd[dead, dead] = 1
    Wt[dead] = 0
    Hinv = inverse_hessian_cholesky(Hd, damp)  # [in, in] upper
    del Hd
    c_all = 1.0 / torch.diag(Hinv).square()  # [in] salience weights 1 / [chol(H⁻¹)]_jj²

    Qt = torch.zeros_like(Wt)  # [in, out]
    sign_t = torch.zeros(in_f, out_f, dtype=torch.bool, device=dev)
    second_t = torch.zeros(in_f, out_f, dtype=torch.bool, device=dev)
    salient_cols = torch.zeros(in_f, dtype=torch.bool, device=dev)
    alphas, mus = torch.zeros(out_f, 4 * n_blocks, device=dev), torch.zeros(out_f, 4 * n_blocks, device=dev)
    for b, i1 in enumerate(range(0, in_f, B)):
        i2 = min(i1 + B, in_f)
        W1 = Wt[i1:i2].clone()  # [count, out]
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        c = c_all[i1:i2]
        salient = select_salient(W1.T, c, max_salient)  # [count]
        p = search_break(W1.T, salient, c, break_points)
        alpha, mu = _block_params(W1.T, salient, p)  # [out, 4]
        alphas[:, 4 * b:4 * b + 4], mus[:, 4 * b:4 * b + 4] = alpha, mu
        salient_cols[i1:i2] = salient
        for i, is_salient in enumerate(salient.tolist()):  # one host sync per block, not per column
            w = W1[i]  # [out]
            q, sign_t[i1 + i], second_t[i1 + i] = _binarize_column(w, is_salient, alpha, mu, p)
            Qt[i1 + i] = q
            err1 = (w - q) / Hinv1[i, i]
            W1[i + 1:].addr_(Hinv1[i, i + 1:], err1, alpha=-1)
            Err1[i] = err1
        Wt[i2:].addmm_(Hinv[i1:i2, i2:].T, Err1, alpha=-1)  # lazy update of later blocks

    codes = (sign_t.T.to(torch.uint8) | (second_t.T.to(torch.uint8) << 1)).contiguous()  # [out, in]
    w_hat = Qt.T.contiguous().to(W.dtype)
    stored = {"sign_packed": binary.pack_bits(sign_t.T), "second_packed": binary.pack_bits(second_t.T),
              "salient_mask": binary.pack_bits(salient_cols), "means": mus}
    total_bits = stored_bits(stored, half=("means",)) + alphas.numel() * 16
    nominal = 1.0 + salient_cols.float().mean().item()
    return QuantResult(
        backend="billm", args={"damp": damp, "max_salient": max_salient, "break_points": break_points},
        bits=1, group_size=block_size, sym=True,
        codes=codes, scales=alphas, zeros=None, g_idx=None, dequantized=w_hat,
        bits_per_weight=total_bits / (out_f * in_f),
        extra={**stored, "nominal_bits": torch.tensor(nominal, device=dev)},
        error=relative_output_error(W, w_hat, H),
    )


BILLM_NOMINAL_BITS = 1.08  # LUQ's nominal width of a BiLLM layer (docs/method.md#nominal-bits)
PLANES = ("sign_packed", "second_packed", "salient_mask")


def billm_layout(out_features: int, in_features: int, *, block_size: int = 128, bias: bool,
                 dtype_bytes: int = 2) -> Layout:
    """Storage of one BiLLM-binarized Linear (quantlab's own layout; align with the billm backend).

    BiLLM ("braq", docs/method.md#billm-braq) works on blocks of ``block_size`` input columns. Per block it picks
    salient *columns* (shared by all rows) and binarizes them twice (residual order 2); the other weights
    are split at a break point into two groups, each binarized once. Stored per weight: 1 sign bit plus
    1 second bit (the order-2 residual sign for salient weights, the group-membership bit for the others),
    so 2 bits whatever the salient count. Per block: a salient-column bitmap (1 bit per column). Per row and
    block: 4 binarizations (2 salient orders, 2 groups), each with an fp16 scale ``alpha`` and an fp16
    mean ``mu`` (the reference code subtracts a row mean before each sign(), ``binary.py``), i.e. 8 fp16.

    | tensor        | dtype | shape                           |
    |---------------|-------|---------------------------------|
    | sign_packed   | u8    | [out, ceil(in/8)]               |
    | second_packed | u8    | [out, ceil(in/8)]               |
    | salient_mask  | u8    | [ceil(in/8)]                    |
    | scales        | f16   | [out, ceil(in/block_size), 4]   |
    | means         | f16   | [out, ceil(in/block_size), 4]   |
    | bias          | dtype | [out]                           |

    About 2 + 8·16/128 = 3.0 bits per weight at block 128, against LUQ's nominal 1.08.
    """
    n_blocks = math.ceil(in_features / block_size)
    row = math.ceil(in_features / 8)
    lay = {"sign_packed": TensorSpec((out_features, row), UINT8),
           "second_packed": TensorSpec((out_features, row), UINT8),
           "salient_mask": TensorSpec((row,), UINT8),
           "scales": TensorSpec((out_features, n_blocks, 4), FP16),
           "means": TensorSpec((out_features, n_blocks, 4), FP16)}
    if bias:
        lay["bias"] = TensorSpec((out_features,), dtype_bytes)
    return lay


def _native_layout(out_f: int, in_f: int, scheme: QuantScheme, *, bias: bool, dtype_bytes: int) -> Layout:
    block = in_f if scheme.group_size == -1 else scheme.group_size
    return billm_layout(out_f, in_f, block_size=block, bias=bias, dtype_bytes=dtype_bytes)


def dequantize_result(r: QuantResult) -> Tensor:
    """The weight from a BiLLM result's stored tensors (bit-exact with the solver's)."""
    salient = binary.unpack_bits(r.extra["salient_mask"], r.shape[1])
    return binary.dequantize_binary(r.codes, r.scales, r.extra["means"], salient, r.group_size)


def encode(r: QuantResult) -> dict[str, Tensor]:
    """What the native format stores: the two bit planes, the column bitmap, fp16 scales and means."""
    return {"scales": r.scales.to(torch.float16), **{k: r.extra[k] for k in PLANES},
            "means": r.extra["means"].to(torch.float16)}


def decode(fields: dict, t: dict[str, Tensor], shape: tuple[int, int], dtype: torch.dtype) -> QuantResult:
    """The result back from :func:`encode`'s tensors, with its dequantized weight."""
    in_f = shape[1]
    sign, second = binary.unpack_bits(t["sign_packed"], in_f), binary.unpack_bits(t["second_packed"], in_f)
    r = QuantResult(**fields, codes=sign.to(torch.uint8) | (second.to(torch.uint8) << 1),
                    scales=t["scales"].float(), zeros=None, g_idx=None, dequantized=torch.empty(shape, dtype=dtype),
                    extra={**{k: t[k] for k in PLANES}, "means": t["means"].float()})
    return dataclasses.replace(r, dequantized=dequantize_result(r).to(dtype))


CODEC = NativeCodec(layout=_native_layout, encode=encode, decode=decode, dequantize=dequantize_result)


@register_backend("billm", bits=(1,), needs_hessian=True, options=BILLM_OPTIONS, nominal_bits=BILLM_NOMINAL_BITS,
                  native=CODEC)
def billm_backend(weight: Tensor, scheme: QuantScheme, hessian: Tensor | None, *,
                  consume_hessian: bool = False) -> QuantResult:
    """Registry adapter for :func:`billm_solve` (``scheme.group_size`` is the block size; ``consume_hessian``
    is not used: the solve reports its error against the Hessian, so it works on a copy)."""
    assert hessian is not None, "quantize_weight checks needs_hessian"
    a = scheme.args
    return billm_solve(weight, hessian, block_size=scheme.group_size, damp=float(a.get("damp", 0.01)),
                       max_salient=int(a.get("max_salient", 50)), break_points=int(a.get("break_points", 41)))
