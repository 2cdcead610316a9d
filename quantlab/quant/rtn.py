"""Round-to-nearest (``rtn``): min/max grid per channel or per group, optional MSE range search, or a fixed
GGUF K-quant grid (``grid``, see :mod:`quantlab.quant.kquant`)."""

from __future__ import annotations

from torch import Tensor

from quantlab.quant import grid, kquant
from quantlab.quant.hessian import relative_output_error
from quantlab.quant.kquant_search import kquant_params
from quantlab.quant.registry import HESSIAN_OPTIONS, register_backend
from quantlab.quant.result import QuantResult, uniform_bits_per_weight
from quantlab.quant.scheme import QuantScheme

RTN_BITS = (2, 3, 4, 5, 6, 7, 8)


def _rtn_kgrid(weight: Tensor, bits: int, group_size: int, sym: bool, kgrid: str,
               hessian: Tensor | None) -> QuantResult:
    """Round ``weight`` onto the K-quant grid ``kgrid`` whose parameters it chose (see :func:`rtn_quantize`)."""
    g = kquant.check_grid(kgrid, bits, group_size, sym, weight.shape[1])
    params = kquant_params(weight, g)
    codes, w_hat = kquant.quantize_matrix(weight, params)
    w_hat = w_hat.to(weight.dtype)
    return QuantResult(
        backend="rtn", args={"mse": False, "grid": g.name}, bits=bits, group_size=group_size, sym=sym,
        codes=codes, scales=kquant.expand(params)[0], zeros=None, g_idx=None, dequantized=w_hat,
        bits_per_weight=g.bits_per_weight, extra=kquant.params_extra(params),
        error=None if hessian is None else relative_output_error(weight, w_hat, hessian),
    )


def rtn_quantize(weight: Tensor, bits: int, group_size: int = 128, sym: bool = True, *, mse: bool = False,
                 hessian: Tensor | None = None, kgrid: str | None = None) -> QuantResult:
    """Round ``weight [out, in]`` to its nearest grid point, one grid per group of ``group_size`` columns.

    Args:
        weight: ``[out, in]`` float weight.
        bits: code width (2-8).
        group_size: columns per group, ``-1`` per channel; must divide ``in``.
        sym: symmetric grid.
        mse: shrink each range to minimise ``sum |w - w_hat|^2.4`` (GPTQ's MSE grid).
        hessian: optional ``[in, in]``, only to report the relative output error.
        kgrid: a GGUF K-quant grid (``q2_k`` .. ``q6_k``); bits/group_size/sym must be the type's and
            ``in % 256 == 0``. The result's ``extra`` holds the stored ``d``/``sc`` (and ``dmin``/``m``).
    """
    if kgrid is not None:
        if mse:
            raise ValueError(f"rtn: mse does not apply to the K grid {kgrid!r}, which searches its own parameters")
        return _rtn_kgrid(weight, bits, group_size, sym, kgrid, hessian)
    codes, scale, zero = grid.quantize_grouped(weight, bits, group_size, sym, mse=mse)
    g = grid.group_width(weight.shape[1], group_size)
    w_hat = grid.dequantize_codes(grid.to_groups(codes, g), scale.unsqueeze(-1), zero.unsqueeze(-1))
    w_hat = w_hat.reshape(weight.shape).to(weight.dtype)
    out_f, in_f = weight.shape
    return QuantResult(
        backend="rtn", args={"mse": mse}, bits=bits, group_size=group_size, sym=sym,
        codes=codes, scales=scale, zeros=None if sym else zero, g_idx=None, dequantized=w_hat,
        bits_per_weight=uniform_bits_per_weight(out_f, in_f, bits, group_size, sym),
        error=None if hessian is None else relative_output_error(weight, w_hat, hessian),
    )


def _rtn_problem(scheme: QuantScheme, in_features: int | None = None) -> str | None:
    """Token weights on rtn weigh AWQ's scale-search loss only (MBQ's balanced search: AWQ then RTN), since RTN
    itself reads no calibration data; then the K-grid checks."""
    weighted = sorted(k for k in HESSIAN_OPTIONS if k in scheme.args)
    if weighted and not scheme.args.get("awq"):
        return (f"{', '.join(weighted)} on backend 'rtn' weighs AWQ's scale search, which this scheme does not run: "
                "add awq: true (MBQ's balanced AWQ), or use gptq, whose Hessian it weighs")
    return kquant.scheme_grid_problem(scheme, in_features, plain_bits=RTN_BITS)


# image_weight / token_weight: the token weights of AWQ's search loss (with awq: true; see _rtn_problem)
@register_backend("rtn", bits=RTN_BITS, options=("mse", "grid", "awq", *HESSIAN_OPTIONS), check=_rtn_problem)
def rtn_backend(weight: Tensor, scheme: QuantScheme, hessian: Tensor | None) -> QuantResult:
    """Registry adapter for :func:`rtn_quantize`."""
    return rtn_quantize(weight, scheme.bits, scheme.group_size, scheme.sym, mse=bool(scheme.args.get("mse", False)),
                        hessian=hessian, kgrid=scheme.args.get("grid"))
