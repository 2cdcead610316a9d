"""GPTQ (Frantar et al., 2022): column-by-column rounding with second-order error compensation.

Paper notation as in IST-DASLab/gptq ``fasterquant``: ``H`` the layer Hessian, ``Hinv`` the upper
Cholesky factor of ``(H + λI)⁻¹``, blocks ``[i1, i2)`` of ``block_size`` columns with lazy updates, and
inside a block ``W1, Q1, Err1, Hinv1``. Internally the weight is held transposed, ``Wt [in, out]``, so
that one input column is one contiguous row (``Wt[j] == W[:, j]``); shapes are noted on each line.
The lazy update is applied on two levels: across blocks (``block_size``, as in the reference) and, inside a
block, across sub-blocks of ``SUB_BLOCK`` columns, which turns most rank-1 updates into small matmuls
(the same arithmetic, regrouped). A sub-block is also closed where a dynamic group starts, so that the
group's parameters see up-to-date weights.

Differences from the reference, all deliberate:

* Group parameters (dynamic groups) are computed from the *up-to-date* weights of the group, i.e.
  including the updates of the current block not yet written back by the lazy scheme. The reference
  reads ``W[:, j:j+g]``, which misses those updates when a group does not start a block (``g < block``).
  This is the paper's sequential algorithm; for ``g == block_size`` both agree.
* Per-channel parameters are computed after dead columns are zeroed.
* Symmetric grids are always centred (see :mod:`quantlab.quant.grid`).
* The defaults are static groups whose ranges come from a Hessian-weighted range search
  (``mse="hessian"``, :func:`quantlab.quant.grid.weighted_range_search` with ``diag(H)``), not the
  reference's dynamic min-max groups: on matrices with uneven channel scales and a few massive input
  channels, dynamic groups cost 2-4% more output error than static ones, and the weighted search removes
  a further 30-60% (eval/bench/gptq_speed.py). ``static_groups=False, mse=False`` is the reference.

With a GGUF K-quant grid (``grid="q4_k"`` etc., :mod:`quantlab.quant.kquant`) the grid's stored parameters
(fp16 ``d``/``dmin``, integer sub-block scales/mins) are chosen once from the weight before the solve, as
with ``static_groups``, and every column is rounded onto that fixed grid with the format's own arithmetic,
so ``dequantized`` is what llama.cpp decodes from the exported blocks, bit for bit.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from quantlab.quant import grid, kquant
from quantlab.quant.hessian import inverse_hessian_cholesky, working_hessian
from quantlab.quant.kquant_search import kquant_params
from quantlab.quant.registry import register_backend
from quantlab.quant.result import QuantResult, uniform_bits_per_weight
from quantlab.quant.scheme import QuantScheme

GPTQ_UNIFORM_BITS = (2, 3, 4, 8)  # the GPTQ checkpoint widths
GPTQ_BITS = (2, 3, 4, 5, 6, 8)  # 5 and 6 only with a K grid (q5_k, q6_k)
GPTQ_OPTIONS = ("damp", "block_size", "act_order", "static_groups", "mse", "grid", "awq")
MSE_CHOICES = (False, True, "hessian")  # min-max; the reference's norm-2.4 search; the diag(H)-weighted search
SUB_BLOCK = 16  # rank-1 updates stay inside 16 columns; a small matmul carries them to the rest of the block
ROWS = 512  # rows per slice where a whole-matrix temporary would be needed (energy, ranges, error)


def _group_values(W1: Tensor, Err1: Tensor, Wt: Tensor, Hinv: Tensor, i1: int, i: int, g: int) -> Tensor:
    """The up-to-date weights ``[g, out]`` of the group starting at column ``j = i1 + i``.

    Columns inside the block come from ``W1``; columns past the block ``i2`` still lack this block's
    pending lazy update ``Err1ᵀ Hinv[i1:i2, i2:j+g]``, which is applied here to a copy.
    """
    count = W1.shape[0]
    i2, j = i1 + count, i1 + i
    inside = W1[i:min(i + g, count)]  # [<=g, out]
    if j + g <= i2:
        return inside
    beyond = Wt[i2:j + g] - Hinv[i1:i2, i2:j + g].T @ Err1  # [j+g-i2, out]
    return torch.cat([inside, beyond])


def _qparams(values: Tensor, bits: int, sym: bool, mse: bool | str, hdiag: Tensor) -> tuple[Tensor, Tensor]:
    """Grid parameters of ``values [..., k]`` by the chosen range rule (``hdiag [k]``: the columns' ``H_jj``)."""
    if mse == "hessian":
        return grid.weighted_range_search(values, bits, sym, hdiag)
    return grid.compute_qparams(values, bits, sym, mse=mse)


def _energy(Hd: Tensor, Wt: Tensor) -> float:
    """``tr(W H Wᵀ)`` from ``Wt [in, out]``, :data:`ROWS` rows of ``H`` at a time (``H @ Wt`` whole would be
    two more ``[in, out]`` float32 temporaries at the solve's peak). ``H`` is symmetric, so each slice
    multiplies only its diagonal block and the columns after it, counted twice: half the products."""
    n, total = Hd.shape[0], 0.0
    for r in range(0, n, ROWS):
        e = min(r + ROWS, n)
        part = Hd[r:e, r:e] @ Wt[r:e]
        if e < n:
            part.addmm_(Hd[r:e, e:], Wt[e:], alpha=2.0)
        total += (part * Wt[r:e]).sum(dtype=torch.float64).item()
    return total


def _static_params(Wt: Tensor, group_size: int, bits: int, sym: bool, mse: bool | str, hdiag: Tensor
                   ) -> tuple[Tensor, Tensor]:
    """Every group's grid ``(scale, zero)``, each ``[out, n_groups]``, from ``Wt [in, out]``; computed for
    :data:`ROWS` output rows at a time (rows are independent) so the range search's copies stay small."""
    hgroups = grid.to_groups(hdiag[None], group_size)[0]
    # [rows, in] contiguous: reductions over a group of the transposed view would stride by ``out``
    parts = [_qparams(grid.to_groups(Wt[:, r:r + ROWS].T.contiguous(), group_size), bits, sym, mse, hgroups)
             for r in range(0, Wt.shape[1], ROWS)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _release(t: Tensor) -> None:
    """Free ``t``'s memory now, for every tensor that shares it (the caller gave it up: ``consume_hessian``)."""
    t.untyped_storage().resize_(0)


def gptq_solve(W: Tensor, H: Tensor, bits: int, group_size: int = 128, sym: bool = True, damp: float = 0.01,
               block_size: int = 128, act_order: bool = False, static_groups: bool = True,
               mse: bool | str = "hessian", *, compute_error: bool = True, kgrid: str | None = None,
               consume_hessian: bool = False) -> QuantResult:
    """Quantize ``W [out, in]`` with GPTQ against the Hessian ``H [in, in]``.

    Args:
        W: weight ``[out, in]`` (any float dtype; solved in float32).
        H: undamped Hessian ``[in, in]`` (``XᵀX / n``).
        bits: code width (2, 3, 4 or 8; with ``kgrid`` the type's, 2-6).
        group_size: columns per group, ``-1`` per channel.
        sym: symmetric grid.
        damp: relative dampening, ``λ = damp · mean(diag H)``.
        block_size: columns per lazy-update block.
        act_order: process columns by descending ``diag(H)`` (desc_act). Codes are returned in the
            original column order, with ``g_idx``.
        static_groups: compute all group parameters up front from the original ``W`` (original column
            order), so that with ``act_order`` the group index stays ``c // group_size`` (default; False
            recomputes each group's grid from the updated weights when the solve reaches it, as the reference).
        mse: each group's range: ``"hessian"`` (default) the ``diag(H)``-weighted search, ``True`` the
            reference's unweighted norm-2.4 search, ``False`` min-max. A K grid searches its own parameters
            (``mse=True`` is refused there, the other values ignored).
        compute_error: report the relative output error ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` of the float32 solution
            (one ``out·in²`` matmul for the denominator; the numerator is GPTQ's own loss, see below).
        kgrid: a GGUF K-quant grid (``q2_k`` .. ``q6_k``); bits/group_size/sym must be the type's and
            ``in % 256 == 0``; its parameters are fixed from ``W`` up front (``extra``: ``d``, ``sc``, and
            ``dmin``, ``m`` for the unsigned types).
        consume_hessian: ``H`` (float32) is used as the solve's workspace instead of a copy, and its memory is
            released once the solve no longer needs it (saves one ``[in, in]`` matrix, 0.5 GB at
            ``in = 11008``, and frees it before the result is assembled); ``H`` must not be used afterwards.

    Returns:
        A :class:`QuantResult`; ``dequantized`` equals ``dequantize()`` bit for bit.
    """
    out_f, in_f = W.shape
    kg = None if kgrid is None else kquant.check_grid(kgrid, bits, group_size, sym, in_f)
    if kg is None and bits not in GPTQ_UNIFORM_BITS:
        raise ValueError(f"gptq takes bits in {GPTQ_UNIFORM_BITS}, got {bits}; 5 and 6 bits only on a K grid "
                         "(option grid='q5_k' or 'q6_k')")
    if mse not in MSE_CHOICES or isinstance(mse, (int, float)) and not isinstance(mse, bool):
        raise ValueError(f"gptq: mse must be one of {MSE_CHOICES}, got {mse!r}")
    if kg is not None and mse is True:
        raise ValueError(f"gptq: mse does not apply to the K grid {kg.name!r}, which searches its own parameters")
    g = grid.group_width(in_f, group_size)
    n_groups = grid.num_groups(in_f, group_size)
    dev = W.device  # everything below runs where the weight is
    Wt = torch.empty(in_f, out_f, device=dev).copy_(W.detach().T)  # [in, out] contiguous: Wt[j] is column j
    Hd = working_hessian(H, consume_hessian)  # [in, in], dampened and permuted below
    dead = torch.diag(Hd) == 0
    Hd[dead, dead] = 1
    Wt[dead] = 0
    hdiag = torch.diag(Hd).clone()  # [in] H_jj in the original column order (undamped)
    energy = _energy(Hd, Wt) if compute_error else 0.0  # tr(W H Wᵀ)
    lam = damp * torch.mean(hdiag).item()  # the dampening inverse_hessian_cholesky adds (dead columns at 1)
    static = static_groups or group_size == -1 or kg is not None
    scales = torch.zeros(n_groups, out_f, device=dev)  # [n_groups, out]
    zeros = torch.zeros(n_groups, out_f, device=dev)  # [n_groups, out]; K grids: the shift (offset or zero)
    if kg is not None:
        params = kquant_params(Wt.T, kg)
        s, z = kquant.expand(params)  # [out, n_groups]
        quantize, dequantize = partial(kquant.quantize_codes, grid=kg), partial(kquant.dequantize_codes, grid=kg)
    else:
        quantize, dequantize = partial(grid.quantize_codes, bits=bits), grid.dequantize_codes
        if static:
            s, z = _static_params(Wt, group_size, bits, sym, mse, hdiag)  # [out, n_groups]
    if static:
        scales, zeros = s.T.contiguous(), z.T.contiguous()
    perm = torch.argsort(torch.diag(Hd), descending=True) if act_order else torch.arange(in_f, device=dev)
    if act_order:
        Wt, hdiag, rows = Wt[perm], hdiag[perm], Hd[perm]
        if consume_hessian and Hd.data_ptr() == H.data_ptr():
            _release(Hd)  # the caller's matrix, no longer needed
        del Hd  # two [in, in] matrices at a time while permuting, not three
        Hd = rows[:, perm]
        del rows
    group_of = perm // g if static else torch.arange(in_f, device=dev) // g  # [in] group of processed column j
    Hinv = inverse_hessian_cholesky(Hd, damp)  # [in, in] upper
    del Hd

    Qt = torch.zeros_like(Wt)  # [in, out]
    loss = torch.zeros((), dtype=torch.float64, device=dev)  # Σ_j |w_j - q_j|² / U_jj² = tr(ΔW (H + λI) ΔWᵀ)
    codes_t = torch.zeros(in_f, out_f, dtype=torch.uint8, device=dev)  # [in, out]
    gid = group_of.tolist()
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        count = i2 - i1
        W1 = Wt[i1:i2].clone()  # [count, out]
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]  # [count, count]
        s = 0  # columns [s, i) of W1 have propagated their error only inside [s, e) (two-level lazy update)
        for i in range(count):
            j = i1 + i
            new_group = not static and j % g == 0
            if i > s and (i - s == SUB_BLOCK or new_group):
                e = min(s + SUB_BLOCK, count)
                W1[e:].addmm_(Hinv1[s:i, e:].T, Err1[s:i], alpha=-1)  # flush: W1 is up to date from i on
                s = i
            if new_group:
                sc, zc = _qparams(_group_values(W1, Err1, Wt, Hinv, i1, i, g).T, bits, sym, mse, hdiag[j:j + g])
                scales[gid[j]], zeros[gid[j]] = sc, zc
            scale, zero = scales[gid[j]], zeros[gid[j]]  # [out]
            w = W1[i]  # [out]
            d = Hinv1[i, i]
            codes_t[j] = quantize(w, scale, zero)
            q = dequantize(codes_t[j], scale, zero)
            Q1[i] = q
            err1 = (w - q) / d
            Err1[i] = err1
            e = min(s + SUB_BLOCK, count)
            W1[i + 1:e].addr_(Hinv1[i, i + 1:e], err1, alpha=-1)  # W1[i+1:e] -= Hinv1[i, i+1:e]ᵀ err1
        Qt[i1:i2] = Q1
        loss += Err1.square().sum(dtype=torch.float64)
        Wt[i2:].addmm_(Hinv[i1:i2, i2:].T, Err1, alpha=-1)  # [in-i2, out] lazy batch update

    if consume_hessian and Hinv.data_ptr() == H.data_ptr():
        _release(Hinv)  # the caller's matrix (factored in place): its memory is not needed to finish
    del Hinv, Wt
    invperm = torch.argsort(perm)
    if act_order:  # back to the original column order (rebinding frees the permuted copies)
        codes_t, Qt = codes_t[invperm], Qt[invperm]
    codes = codes_t.T.contiguous()  # [out, in]
    del codes_t
    q = Qt.T  # [out, in] float32 (a view)
    error = None
    if compute_error:
        # Each column's rounding raises the damped objective by exactly |w_j - q_j|² / U_jj² (the OBS step
        # GPTQ takes), so ``loss`` is tr(ΔW (H + λI) ΔWᵀ); the undamped error follows without H itself.
        dw2 = sum((W[r:r + ROWS].detach().float().masked_fill(dead, 0) - q[r:r + ROWS]).square()
                  .sum(dtype=torch.float64).item() for r in range(0, out_f, ROWS))
        num = max(loss.item() - lam * dw2, 0.0)
        error = (0.0 if num == 0 else float("inf")) if energy <= 0 else num / energy
    w_hat = q.to(W.dtype, memory_format=torch.contiguous_format)  # [out, in]
    g_idx = group_of[invperm].to(torch.int32) if act_order else None  # [in] group of original column c
    args = {"damp": damp, "block_size": block_size, "act_order": act_order, "static_groups": static_groups,
            "mse": mse if kg is None else False} | ({} if kg is None else {"grid": kg.name})
    return QuantResult(
        backend="gptq", args=args, bits=bits, group_size=group_size, sym=sym,
        codes=codes, scales=scales.T.contiguous(), zeros=None if sym or kg is not None else zeros.T.contiguous(),
        g_idx=g_idx, dequantized=w_hat,
        bits_per_weight=(uniform_bits_per_weight(out_f, in_f, bits, group_size, sym, g_idx) if kg is None
                         else kg.bits_per_weight),
        extra={} if kg is None else kquant.params_extra(params),
        error=error,
    )


@register_backend("gptq", bits=GPTQ_BITS, needs_hessian=True, options=GPTQ_OPTIONS,
                  check=partial(kquant.scheme_grid_problem, plain_bits=GPTQ_UNIFORM_BITS))
def gptq_backend(weight: Tensor, scheme: QuantScheme, hessian: Tensor | None, *,
                 consume_hessian: bool = False) -> QuantResult:
    """Registry adapter for :func:`gptq_solve` (options from ``scheme.args``)."""
    assert hessian is not None, "quantize_weight checks needs_hessian"
    a = scheme.args
    return gptq_solve(weight, hessian, scheme.bits, scheme.group_size, scheme.sym, damp=float(a.get("damp", 0.01)),
                      block_size=int(a.get("block_size", 128)), act_order=bool(a.get("act_order", False)),
                      static_groups=bool(a.get("static_groups", True)), mse=a.get("mse", "hessian"),
                      kgrid=a.get("grid"), consume_hessian=consume_hessian)
