"""What every planner works from: :class:`PlanInputs`, the Linears it decides (``plan.components``), the
format its byte counts assume, and the byte arithmetic they share (stored bytes after the shape fallback,
the bytes a planner does not decide)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from quantlab.calib.executor import CalibSample
from quantlab.core.errors import problems_error
from quantlab.models.adapter import Component
from quantlab.models.load import LoadedModel
from quantlab.plan.cost import linear_bytes, model_size, nominal_bits
from quantlab.plan.fit import (
    Fitted,
    ShapeFallback,
    fit_scheme,
    group_by_block,
    placement_problem,
)
from quantlab.plan.spec import PlanSpec
from quantlab.quant.registry import get_backend
from quantlab.quant.scheme import QuantScheme


def plan_format(schemes: Sequence[QuantScheme | None], requested: str) -> str:
    """The export format a plan's byte counts assume: ``auto`` picks native only when some scheme's codes are
    not a uniform grid (BiLLM), which no third-party format stores."""
    if requested != "auto":
        return requested
    uniform = all(s is None or get_backend(s.backend).uniform_grid for s in schemes)
    return "compressed-tensors" if uniform else "native"


PLANNABLE = {"decoder": Component.DECODER, "vision": Component.VISION, "projector": Component.PROJECTOR}


def planned_linears(names: Sequence[str], adapter, spec: PlanSpec, pinned: Mapping[str, Any]) -> list[str]:
    """The Linears the planner decides: those of ``plan.components`` that no rule pins (module order)."""
    wanted = {PLANNABLE[c] for c in spec.components}
    return [n for n in names if n not in pinned and adapter.component_of(n) in wanted]


def outside_problem(candidate: QuantScheme, component: Component, fmt: str) -> str | None:
    """Why the budget planner does not offer ``candidate`` to a vision or projector unit (None: it does): it
    cannot run there or be exported (``fit.placement_problem``; AWQ on the projector, for one)."""
    return placement_problem(candidate, component, fmt)


def model_linears(loaded: LoadedModel) -> dict[str, nn.Linear]:
    return {n: m for n, m in loaded.model.named_modules() if isinstance(m, nn.Linear)}


def stored_bytes(mod: nn.Linear, scheme: QuantScheme | None, fmt: str, fallback: ShapeFallback = "smaller_group") -> int:
    """Stored bytes of one Linear under ``scheme`` after the shape fallback (what the plan will assign)."""
    scheme = fit_scheme(mod.out_features, mod.in_features, scheme, fmt, fallback).scheme
    return linear_bytes(mod.out_features, mod.in_features, scheme, fmt, bias=mod.bias is not None,
                        dtype_bytes=2)


def fit_shapes(mapping: dict[str, QuantScheme | None], linears: dict[str, nn.Linear], fmt: str,
               fallback: ShapeFallback) -> tuple[dict[str, QuantScheme | None], dict[str, str]]:
    """Apply ``plan.shape_fallback`` to every module: the mapping to use, and a note per changed module.

    Raises:
        UserError: ``fallback="error"`` and some module's shape cannot take its scheme (all are named).
    """
    fitted: dict[str, Fitted] = {n: fit_scheme(linears[n].out_features, linears[n].in_features, s, fmt, fallback)
                                 for n, s in mapping.items()}
    notes = {n: f.note for n, f in fitted.items() if f.note is not None}
    if fallback == "error" and notes:
        raise problems_error(f"{len(notes)} module(s) cannot take their scheme in {fmt}",
                             [f"{names}: {why}" for names, why in group_by_block(list(notes.items()))],
                             "set plan.shape_fallback to smaller_group, per_channel or keep, or pin these "
                             "modules with a rule")
    return {n: f.scheme for n, f in fitted.items()}, notes


def fixed_bytes(loaded: LoadedModel, linears: dict[str, nn.Linear], planned: set[str], fmt: str,
                 fixed: Mapping[str, QuantScheme | None], fallback: ShapeFallback = "smaller_group") -> int:
    """Bytes of everything the planner does not decide: non-Linear parameters, Linears with a fixed scheme
    (``fixed``: pinned by a rule, luq's projector at the high scheme; after the shape fallback) and the other
    unplanned Linears in fp16."""
    fitted = {n: fit_scheme(linears[n].out_features, linears[n].in_features, s, fmt, fallback).scheme
              for n, s in fixed.items()}
    total = model_size(loaded.model, loaded.adapter, fitted, fmt, dtype_bytes=2).total_bytes
    return total - sum(stored_bytes(linears[n], None, fmt) for n in planned)


def nominal_avg_bits(layers: dict[str, QuantScheme], linears) -> float:
    """LUQ's nominal average bits of ``layers`` (docs/method.md#nominal-bits)."""
    num = sum(nominal_bits(s) * linears[n].weight.numel() for n, s in layers.items())
    return num / max(1, sum(linears[n].weight.numel() for n in layers))


@dataclass(frozen=True)
class PlanInputs:
    """What a planner gets: the model, its statistics, the recipe's plan section, the Linears it decides
    (decoder and vision ones by block, the projector's; pinned ones excluded), the format, an overriding budget,
    the calibration samples and the pinned schemes."""

    loaded: LoadedModel
    stats: Any
    spec: PlanSpec
    blocks: dict[int, list[str]]
    linears: dict[str, nn.Linear]
    export_format: str
    budget_bytes: int | None
    samples: tuple[CalibSample, ...]
    progress: bool
    device: Any
    vision_blocks: dict[int, list[str]] = dataclasses.field(default_factory=dict)
    projector: list[str] = dataclasses.field(default_factory=list)
    pinned: dict[str, QuantScheme | None] = dataclasses.field(default_factory=dict)
