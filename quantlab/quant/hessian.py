"""Layer Hessians ``H = XᵀX / n`` and the quantities derived from them (pure functions).

``H`` is ``[in, in]`` for a Linear with inputs ``X [n, in]``. The reference GPTQ uses ``2/n · XᵀX``; the
factor does not matter here: dampening is relative to ``mean(diag H)`` and the error is a ratio.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch
from torch import Tensor


def hessian_from_inputs(x: Tensor) -> Tensor:
    """``XᵀX / n`` in float32 from inputs ``x [..., in]`` (all leading dims are tokens)."""
    x = x.reshape(-1, x.shape[-1]).float()  # [n, in]
    if x.shape[0] == 0:
        raise ValueError("hessian_from_inputs: no input rows")
    return x.T @ x / x.shape[0]


def weighted_hessian_from_inputs(x: Tensor, weights: Tensor) -> Tensor:
    """``XᵀDX / ΣD`` in float32: token ``t``'s outer product ``x_t x_tᵀ`` weighted by ``weights[t] >= 0``.

    Token weighting (VLMQ, arXiv 2508.03351; MBQ's modality balance, arXiv 2412.19509) makes GPTQ's objective
    ``Σ_t w_t ||ΔW x_t||²``: a token weighted 0 does not count, one weighted 2 counts twice. Uniform weights
    give :func:`hessian_from_inputs`. ``x [..., in]``, ``weights`` with one entry per token row of ``x``.
    """
    x = x.reshape(-1, x.shape[-1]).float()
    w = weights.reshape(-1).float().to(x.device)
    if w.shape[0] != x.shape[0]:
        raise ValueError(f"weighted_hessian_from_inputs: {w.shape[0]} weights for {x.shape[0]} token rows")
    if bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError("weighted_hessian_from_inputs: weights must be non-negative with a positive sum")
    return (x * w[:, None]).T @ x / w.sum()


def relative_output_error(weight: Tensor, weight_hat: Tensor, hessian: Tensor) -> float:
    """``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` = ``||WX - ŴX||² / ||WX||²`` for ``H = XᵀX``.

    Args:
        weight: original ``[out, in]``.
        weight_hat: quantized ``[out, in]``.
        hessian: ``[in, in]`` undamped Hessian.
    """
    w = weight.float()
    dw = w - weight_hat.float()
    h = hessian.float()
    num = ((dw @ h) * dw).sum(dtype=torch.float64).item()
    den = ((w @ h) * w).sum(dtype=torch.float64).item()
    if den <= 0:
        return 0.0 if num == 0 else float("inf")
    return num / den


def working_hessian(hessian: Tensor, consume: bool) -> Tensor:
    """A float32 ``H`` a solver may modify in place: ``hessian`` itself when the caller gives it up
    (``consume``, float32 already), else a copy."""
    h = hessian.detach().float()
    return h if consume and h.data_ptr() == hessian.data_ptr() else h.clone()


def inverse_hessian_cholesky(hessian: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` with ``λ = damp · mean(diag H)``, so ``H⁻¹ = UᵀU``.

    ``hessian`` (float32, contiguous) is overwritten: dampened, factored, inverted and factored again in
    its own storage, and returned as ``U``; pass a copy if you need it. At ``n = 11008`` every ``[n, n]``
    float32 matrix is 0.5 GB, so on the CPU the three steps are LAPACK's in-place routines (``potrf``,
    ``potri``, ``potrf`` through SciPy, no workspace copy); elsewhere torch's (one workspace copy).
    Raises ``ValueError`` when the dampened Hessian is not positive definite.
    """
    n = hessian.shape[0]
    hessian.diagonal().add_(damp * torch.mean(torch.diag(hessian)))
    if hessian.device.type == "cpu" and hessian.dtype == torch.float32 and hessian.is_contiguous():
        return _inverse_cholesky_in_place(hessian, damp)
    info = torch.empty((), dtype=torch.int32, device=hessian.device)
    torch.linalg.cholesky_ex(hessian, out=(hessian, info))  # L, lower
    _check(info.item(), n, damp, inverse=False)
    torch.cholesky_inverse(hessian, out=hessian)  # (L Lᵀ)⁻¹
    torch.linalg.cholesky_ex(hessian, upper=True, out=(hessian, info))  # U
    _check(info.item(), n, damp, inverse=True)
    return hessian


def _check(info: int, n: int, damp: float, *, inverse: bool) -> None:
    if info == 0:
        return
    if inverse:
        raise ValueError(f"inverse Hessian [{n}, {n}] lost positive definiteness in float32 (damp={damp}); "
                         "increase damp")
    raise ValueError(f"Hessian [{n}, {n}] is not positive definite after dampening with damp={damp}; "
                     "increase damp or collect more calibration tokens")


def _inverse_cholesky_in_place(hessian: Tensor, damp: float) -> Tensor:
    """The CPU path of :func:`inverse_hessian_cholesky` (``hessian`` already dampened).

    LAPACK sees the row-major matrix as its column-major transpose, which is the same matrix (H is
    symmetric). ``potrf`` (lower) leaves ``L`` in that view's lower triangle, ``potri`` the lower triangle
    of ``H⁻¹``, and ``potrf`` (lower) again ``L2`` with ``H⁻¹ = L2 L2ᵀ``; read row-major, the upper triangle
    now holds ``L2ᵀ = U`` (``UᵀU = H⁻¹``), and the other triangle (stale values) is zeroed.
    """
    from scipy.linalg import lapack

    n = hessian.shape[0]
    # column-major, sharing the tensor's memory through its address: ``Tensor.numpy()`` would mark the
    # storage as not resizable for good, and a consuming solver frees it (gptq's ``consume_hessian``)
    view = np.ctypeslib.as_array((ctypes.c_float * (n * n)).from_address(hessian.data_ptr())).reshape(n, n).T
    for step, (fn, kw) in enumerate(((lapack.spotrf, {"overwrite_a": 1, "clean": 0}),
                                     (lapack.spotri, {"overwrite_c": 1}),
                                     (lapack.spotrf, {"overwrite_a": 1, "clean": 0}))):
        out, info = fn(view, lower=1, **kw)
        _check(int(info), n, damp, inverse=step == 2)
        if not np.shares_memory(out, view):  # LAPACK worked on a copy: keep the result all the same
            view[...] = out
    return hessian.triu_()
