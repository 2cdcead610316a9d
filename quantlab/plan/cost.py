"""Exact storage cost of a quantization mapping, and memory estimates for a multimodal context.

Every byte count here is derived from a declared per-Linear tensor layout (:func:`linear_layout`), the
tensors an exporter writes for one Linear in each format (``docs/formats.md#gptq-v1``,
``docs/formats.md#compressed-tensors-pack-quantized``):

| fmt                  | tensors per quantized Linear (``in``/``out`` features, ``g`` groups, ``b`` bits)         |
|----------------------|------------------------------------------------------------------------------------------|
| ``compressed-tensors``| weight_packed i32 [out, ceil(in·b/32)], weight_scale <dtype> [out, g],                  |
|                      | weight_zero_point i32 [ceil(out·b/32), g] (asym only), weight_shape i64 [2], bias <dtype> |
| ``gptq`` (v1)        | qweight i32 [in·b/32, out], qzeros i32 [g, out·b/32] (always), scales f16 [g, out],      |
|                      | g_idx i32 [in], bias f16                                                                 |
| ``native``           | a backend's own codec if it has one (billm: ``quant.billm.billm_layout``), else as ``compressed-tensors`` |
| ``fp``               | weight <dtype> [out, in], bias <dtype> (fake-quantized / dequantized checkpoint)          |

``g = in / group_size`` (``group_size=-1``: ``g = 1``). compressed-tensors 0.20 never writes
``weight_g_idx``: its only act-order mode is ``actorder="weight"`` (static groups, no index), the
``"group"`` mode that stored ``g_idx`` was removed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from quantlab.export.formats import FORMATS as EXPORT_FORMATS
from quantlab.export.formats import get_format
from quantlab.export.gptq import GPTQ_BITS  # noqa: F401 - re-exported
from quantlab.models.adapter import Adapter, Component
from quantlab.quant.billm import BILLM_NOMINAL_BITS, billm_layout  # noqa: F401 - re-exported
from quantlab.quant.layout import FP16, INT32, INT64, UINT8, Layout, TensorSpec  # noqa: F401 - re-exported
from quantlab.quant.registry import get_backend
from quantlab.quant.scheme import QuantScheme


def _fp_layout(out_f: int, in_f: int, scheme: QuantScheme | None, *, bias: bool, dtype_bytes: int) -> Layout:
    lay = {"weight": TensorSpec((out_f, in_f), dtype_bytes)}
    if bias:
        lay["bias"] = TensorSpec((out_f,), dtype_bytes)
    return lay


FORMATS = (*EXPORT_FORMATS, "fp")  # "fp": a dense (fake-quantized or dequantized) checkpoint


def linear_layout(out_features: int, in_features: int, scheme: QuantScheme | None, fmt: str, *, bias: bool,
                  dtype_bytes: int = 2) -> Layout:
    """Tensors stored for one Linear: ``{suffix: TensorSpec}`` (see the module table).

    Args:
        out_features: rows of the weight.
        in_features: columns of the weight.
        scheme: the Linear's scheme; None keeps it in full precision (weight + bias at ``dtype_bytes``).
        fmt: one of :data:`FORMATS`.
        bias: whether the Linear has a bias.
        dtype_bytes: element size of the model dtype (scales in compressed-tensors, fp tensors).

    Raises:
        ValueError: unknown format, or a shape/scheme the format cannot store (the message names both).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid formats: {sorted(FORMATS)}")
    if scheme is None or fmt == "fp":
        return _fp_layout(out_features, in_features, None, bias=bias, dtype_bytes=dtype_bytes)
    return get_format(fmt).layout(out_features, in_features, scheme, bias=bias, dtype_bytes=dtype_bytes)


def linear_bytes(out_features: int, in_features: int, scheme: QuantScheme | None, fmt: str, *, bias: bool,
                 dtype_bytes: int = 2) -> int:
    """Exact stored bytes of one Linear; the sum of :func:`linear_layout`. Same arguments and errors."""
    lay = linear_layout(out_features, in_features, scheme, fmt, bias=bias, dtype_bytes=dtype_bytes)
    return sum(t.nbytes for t in lay.values())


def nominal_bits(scheme: QuantScheme | None, dtype_bytes: int = 2) -> float:
    """LUQ-style nominal width of a weight: ``bits`` (billm: 1.08), or the dtype width if kept."""
    if scheme is None:
        return 8.0 * dtype_bytes
    return get_backend(scheme.backend).nominal(scheme)


@dataclass(frozen=True)
class SizeReport:
    """Stored size of a model under a mapping and format."""

    fmt: str
    total_bytes: int
    by_component: dict[str, int] = field(default_factory=dict)
    decoder_linear_numel: int = 0  # weights of the Linears inside decoder blocks
    decoder_linear_bytes: int = 0  # their stored bytes, bias excluded
    avg_bits: float = 0.0  # exact: 8 * decoder_linear_bytes / decoder_linear_numel
    nominal_bits: float = 0.0  # LUQ style: sum(bits * numel) / numel over decoder Linears

    @property
    def decoder_block_bytes(self) -> int:
        return self.by_component.get(Component.DECODER.value, 0)

    @property
    def gib(self) -> float:
        return self.total_bytes / 2**30


def _mapping(plan_or_mapping: Any) -> Mapping[str, QuantScheme | None]:
    return getattr(plan_or_mapping, "layers", plan_or_mapping)


def _linears(model: nn.Module, mapping: Mapping[str, Any]) -> dict[str, nn.Linear]:
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    unknown = sorted(set(mapping) - set(linears))
    if unknown:
        raise ValueError(f"{len(unknown)} mapped names are not Linear modules of {type(model).__name__}: "
                         f"{unknown[:5]}")
    return linears


def _dtype_bytes(module: nn.Linear, dtype_bytes: int | None) -> int:
    return dtype_bytes or module.weight.element_size()


def model_size(model: nn.Module, adapter: Adapter, mapping: Any, fmt: str, *,
               dtype_bytes: int | None = None) -> SizeReport:
    """Exact stored bytes of a model (meta-device models work): quantized Linears by their layout, every
    other parameter (embeddings, norms, vision tower, projector, lm_head) at its dtype size.

    Args:
        model: the model; tied parameters are counted once (``named_parameters`` de-duplicates them).
        adapter: its adapter, for the per-component split.
        mapping: ``{linear name: scheme | None}`` or a Plan; unnamed Linears and None stay in full precision.
        fmt: one of :data:`FORMATS`.
        dtype_bytes: force one element size for unquantized tensors and scales; None = each tensor's dtype.
    """
    mapping = _mapping(mapping)
    linears = _linears(model, mapping)
    quantized = {n: s for n, s in mapping.items() if s is not None}
    by_comp: dict[str, int] = defaultdict(int)
    dense = EXPORT_FORMATS.get(fmt).dense_element_bytes if fmt in EXPORT_FORMATS.names() else None
    for name, p in model.named_parameters():
        if name.rpartition(".")[0] not in quantized:
            size = dtype_bytes or p.element_size()
            by_comp[adapter.component_of(name).value] += p.numel() * (size if dense is None else
                                                                      dense(adapter.legacy_name(name), p.dim(), size))
    numel = qbytes = 0
    nominal = 0.0
    for name, lin in linears.items():
        scheme, db = quantized.get(name), _dtype_bytes(lin, dtype_bytes)
        lay = linear_layout(lin.out_features, lin.in_features, scheme, fmt, bias=lin.bias is not None,
                            dtype_bytes=db)
        comp = adapter.component_of(name).value
        if scheme is not None:
            by_comp[comp] += sum(t.nbytes for t in lay.values())
        if comp == Component.DECODER.value:
            n = lin.out_features * lin.in_features
            numel += n
            qbytes += sum(t.nbytes for k, t in lay.items() if k != "bias")
            nominal += nominal_bits(scheme, db) * n
    return SizeReport(fmt=fmt, total_bytes=sum(by_comp.values()), by_component=dict(by_comp),
                      decoder_linear_numel=numel, decoder_linear_bytes=qbytes,
                      avg_bits=8 * qbytes / numel if numel else 0.0, nominal_bits=nominal / numel if numel else 0.0)
