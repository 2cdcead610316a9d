"""Round-to-nearest (``rtn``): min/max grid per channel or per group, optional MSE range search."""

from __future__ import annotations

from torch import Tensor

from quantlab.quant import grid
from quantlab.quant.hessian import relative_output_error
from quantlab.quant.registry import register_backend
from quantlab.quant.result import QuantResult, uniform_bits_per_weight
from quantlab.quant.scheme import QuantScheme

RTN_BITS = (2, 3, 4, 5, 6, 7, 8)


def rtn_quantize(weight: Tensor, bits: int, group_size: int = 128, sym: bool = True, *, mse: bool = False,
                 hessian: Tensor | None = None) -> QuantResult:
    """Round ``weight [out, in]`` to its nearest grid point, one grid per group of ``group_size`` columns.

    Args:
        weight: ``[out, in]`` float weight.
        bits: code width (2-8).
        group_size: columns per group, ``-1`` per channel; must divide ``in``.
        sym: symmetric grid.
        mse: shrink each range to minimise ``sum |w - w_hat|^2.4`` (GPTQ's MSE grid).
        hessian: optional ``[in, in]``, only to report the relative output error.
    """
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


@register_backend("rtn", bits=RTN_BITS, options=("mse",))
def rtn_backend(weight: Tensor, scheme: QuantScheme, hessian: Tensor | None) -> QuantResult:
    """Registry adapter for :func:`rtn_quantize`."""
    return rtn_quantize(weight, scheme.bits, scheme.group_size, scheme.sym, mse=bool(scheme.args.get("mse", False)),
                        hessian=hessian)
