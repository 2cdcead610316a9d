"""Quantization backends (pure math + a registry). Importing this package registers rtn, gptq and billm.

    from quantlab.quant import quantize_weight, hessian_from_inputs
    r = quantize_weight(W, "gptq", bits=4, group_size=128, hessian=hessian_from_inputs(X), act_order=True)
    r.codes, r.scales, r.zeros, r.g_idx, r.dequantized, r.bits_per_weight, r.error
"""

from quantlab.quant import billm, gptq, rtn  # noqa: F401  (registers the backends)
from quantlab.quant.api import check_weight, hessian_from_inputs, quantize_weight, relative_output_error
from quantlab.quant.billm import billm_solve
from quantlab.quant.gptq import gptq_solve
from quantlab.quant.registry import BACKENDS, Backend, get_backend, register_backend
from quantlab.quant.result import QuantResult
from quantlab.quant.rtn import rtn_quantize
from quantlab.quant.scheme import QuantScheme

__all__ = [
    "BACKENDS", "Backend", "QuantResult", "QuantScheme", "billm_solve", "check_weight", "get_backend",
    "gptq_solve", "hessian_from_inputs", "quantize_weight", "register_backend", "relative_output_error",
    "rtn_quantize",
]
