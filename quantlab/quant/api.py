"""``quantize_weight``: the one entry point from a weight and a scheme to a :class:`QuantResult`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from quantlab.quant.hessian import hessian_from_inputs, relative_output_error
from quantlab.quant.registry import get_backend
from quantlab.quant.result import QuantResult
from quantlab.quant.scheme import QuantScheme

__all__ = ["quantize_weight", "hessian_from_inputs", "relative_output_error", "check_weight"]


def check_weight(weight: Tensor, scheme: QuantScheme, hessian: Tensor | None) -> None:
    """Raise ``ValueError`` (naming the shape and the reason) if ``scheme`` cannot quantize ``weight``.

    Checked: 2-D floating weight; the backend accepts ``scheme.bits`` and ``scheme.args``; ``group_size``
    divides ``in_features``; a Hessian ``[in, in]`` of finite values where the backend needs one.
    Packing constraints (GPTQ ``in % 32``) are the exporter's, not checked here.
    """
    backend = get_backend(scheme.backend)
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"expected a 2-D floating weight [out, in], got {tuple(weight.shape)} {weight.dtype}")
    out_f, in_f = weight.shape
    where = f"{scheme.label()}: weight {out_f}x{in_f} (out x in)"
    why = backend.problem(scheme, in_f)
    if why is not None:
        raise ValueError(f"{where}: {why}")
    if scheme.group_size != -1 and in_f % scheme.group_size:
        raise ValueError(f"{where}: group_size {scheme.group_size} does not divide in_features {in_f}; "
                         "use a divisor of in_features or group_size=-1 (per channel)")
    if hessian is None:
        if backend.needs_hessian:
            raise ValueError(f"{where}: backend {backend.name!r} needs a Hessian [in, in] = XᵀX/n of the layer "
                             "inputs (pass hessian=..., see hessian_from_inputs)")
        return
    if tuple(hessian.shape) != (in_f, in_f):
        raise ValueError(f"{where}: Hessian must be [{in_f}, {in_f}], got {tuple(hessian.shape)}")
    if not all_finite(hessian):
        raise ValueError(f"{where}: Hessian has non-finite entries")


ROWS_PER_CHECK = 512  # rows of a Hessian checked at once (isfinite makes float and bool temporaries)


def all_finite(t: Tensor) -> bool:
    """``torch.isfinite(t).all()`` a slice of rows at a time: on a whole ``[in, in]`` Hessian, isfinite's
    temporaries (``abs`` and two boolean masks) are 1.5x the matrix, 0.7 GB at ``in = 11008``."""
    return all(bool(torch.isfinite(part).all()) for part in t.split(ROWS_PER_CHECK))


def quantize_weight(weight: Tensor, backend: str | QuantScheme, *, bits: int | None = None,
                    group_size: int | None = None, sym: bool | None = None, hessian: Tensor | None = None,
                    consume_hessian: bool = False, **backend_args: Any) -> QuantResult:
    """Quantize one Linear weight ``[out, in]``.

    Args:
        weight: ``[out, in]`` floating weight; not modified.
        backend: a registered backend name (``rtn``, ``gptq``, ``billm``) or a full :class:`QuantScheme`.
        bits: code width; required with a backend name (billm: 1).
        group_size: columns per group, ``-1`` per channel (billm: block size); default 128.
        sym: symmetric grid; default True.
        hessian: ``[in, in]`` ``XᵀX/n`` of the layer inputs; required by gptq and billm, optional for rtn
            (then only used for ``error``). Moved to the weight's device: the solve runs there, and the
            result's tensors are on that device.
        consume_hessian: the backend may overwrite ``hessian`` and drop it as it goes, instead of working on
            a copy (one ``[in, in]`` float32 matrix less at the peak); do not use it afterwards.
        **backend_args: backend options (gptq: damp, block_size, act_order, static_groups, mse; rtn: mse;
            billm: damp, max_salient, break_points).

    With a :class:`QuantScheme`, ``bits``/``group_size``/``sym``/options come from it and must not be
    passed again.

    Raises:
        KeyError: unknown backend (the message lists the registered ones).
        ValueError: a shape, option or Hessian the scheme cannot take (see :func:`check_weight`).
    """
    if isinstance(backend, QuantScheme):
        given = {k: v for k, v in (("bits", bits), ("group_size", group_size), ("sym", sym)) if v is not None}
        if given or backend_args:
            raise ValueError(f"pass either a QuantScheme or bits/group_size/sym/options, not both "
                             f"(got {sorted(given) + sorted(backend_args)})")
        scheme = backend
    else:
        if bits is None:
            raise ValueError(f"quantize_weight({backend!r}): bits is required with a backend name")
        scheme = QuantScheme(backend=backend, bits=bits, group_size=128 if group_size is None else group_size,
                             sym=True if sym is None else sym, args=backend_args)
    check_weight(weight, scheme, hessian)
    if hessian is not None:
        hessian = hessian.to(weight.device)  # the solve runs where the weight is
    with torch.no_grad():
        return get_backend(scheme.backend)(weight, scheme, hessian, consume_hessian=consume_hessian)
