"""Which schemes a Linear's shape and the export format can take, and the fallback when one cannot.

A scheme can be wrong in two ways:

- for every Linear (a recipe error, refused before any work): the backend is unknown, does not take the
  bits or the options, or the export format cannot store the backend's codes (BiLLM outside ``native``,
  3/5/6/7-bit in GPTQ tensors);
- for some shapes only: the group size does not divide ``in_features`` (a LLaVA variant with hidden 192 and
  group 128), or GPTQ packing needs ``in_features % 32 == 0``.

The second kind is handled per module by the recipe's ``plan.shape_fallback``:

| policy          | a Linear the scheme does not fit gets                                                 |
|-----------------|----------------------------------------------------------------------------------------|
| ``smaller_group`` | the largest of 128, 64, 32 (the group sizes vLLM's GPTQ/Marlin kernels take) below the requested one that divides ``in_features``; else per channel; else kept |
| ``per_channel`` | ``group_size: -1`` (one scale per output row); else kept                               |
| ``keep``        | no quantization (fp16)                                                                  |
| ``error``       | nothing: the run is refused before calibration, naming every such module                |

Every fallback is recorded per module in ``plan.yaml`` (``info.fallbacks``) and in the report.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from quantlab.export.formats import FORMATS, get_format
from quantlab.models.adapter import Component
from quantlab.plan.cost import linear_layout
from quantlab.quant.registry import BACKENDS, component_problem
from quantlab.quant.scheme import QuantScheme

ShapeFallback = Literal["smaller_group", "per_channel", "keep", "error"]
ENGINE_GROUP_SIZES = (128, 64, 32)


def scheme_problem(scheme: QuantScheme, fmt: str) -> str | None:
    """Why ``scheme`` cannot be used on any Linear when exporting to ``fmt`` (None: it can)."""
    if scheme.backend not in BACKENDS:
        return f"unknown backend {scheme.backend!r}; registered: {sorted(BACKENDS)}"
    why = BACKENDS.get(scheme.backend).problem(scheme)
    if why is not None:
        return why
    return None if fmt == "auto" else get_format(fmt).problem(scheme)


def placement_problem(scheme: QuantScheme, component: Component, fmt: str) -> str | None:
    """Why ``scheme`` cannot run on a Linear of ``component`` and be exported to ``fmt`` (None: it can)."""
    why = component_problem(scheme, component)
    if why is None and component in (Component.VISION, Component.PROJECTOR) and fmt != "auto" \
            and not get_format(fmt).vision:
        able = sorted(f.name for f in FORMATS.values() if f.vision)
        why = (f"the {fmt} format keeps vision-tower and projector Linears unquantized (its loaders quantize the "
               f"decoder only); keep them (scheme: null) or export one of {able}")
    return why


def shape_problem(out_features: int, in_features: int, scheme: QuantScheme, fmt: str) -> str | None:
    """Why a Linear of this shape cannot take ``scheme`` in ``fmt`` (None: it can)."""
    g = scheme.group_size
    if g != -1 and in_features % g:
        return f"group_size {g} does not divide in_features {in_features}"
    why = BACKENDS.get(scheme.backend).problem(scheme, in_features)
    if why is not None:
        return why
    try:
        linear_layout(out_features, in_features, scheme, "compressed-tensors" if fmt == "auto" else fmt, bias=False)
    except ValueError as err:
        return str(err)
    return None


@dataclass(frozen=True)
class Fitted:
    """The scheme a Linear gets after the shape fallback, and what changed (``note`` None: nothing)."""

    scheme: QuantScheme | None
    note: str | None = None


def fit_scheme(out_features: int, in_features: int, scheme: QuantScheme | None, fmt: str,
               policy: ShapeFallback) -> Fitted:
    """Apply the shape fallback (module table) to one Linear; ``policy="error"`` returns the scheme unchanged
    with the reason in ``note`` (the caller refuses)."""
    if scheme is None:
        return Fitted(None)
    why = shape_problem(out_features, in_features, scheme, fmt)
    if why is None:
        return Fitted(scheme)
    if policy == "error":
        return Fitted(scheme, why)
    tries: list[int] = []
    if policy == "smaller_group":
        tries = [g for g in ENGINE_GROUP_SIZES if scheme.group_size == -1 or g < scheme.group_size]
    if policy in ("smaller_group", "per_channel") and scheme.group_size != -1:
        tries.append(-1)
    for g in tries:
        candidate = scheme.model_copy(update={"group_size": g})
        if shape_problem(out_features, in_features, candidate, fmt) is None:
            return Fitted(candidate, f"{why}: {scheme.label()} -> {candidate.label()}")
    return Fitted(None, f"{why}: {scheme.label()} -> kept in fp16")


def group_by_block(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``(module, message)`` pairs folded over block indices, so every module is named in a few lines:
    ``layers.0.mlp.down_proj`` ... ``layers.7.mlp.down_proj`` with one message -> ``layers.{0-7}.mlp.down_proj``."""
    groups: dict[tuple[str, str], list[int]] = {}
    order: list[tuple[str, str]] = []
    for name, why in items:
        m = re.search(r"\.(\d+)\.", name)
        key = (name[:m.start(1)] + "{}" + name[m.end(1):], why) if m else (name, why)
        if key not in groups:
            groups[key] = []
            order.append(key)
        if m:
            groups[key].append(int(m.group(1)))
    out = []
    for pattern, why in order:
        idx = sorted(set(groups[(pattern, why)]))
        runs, start = [], None
        for i, v in enumerate(idx):
            start = v if start is None else start
            if i + 1 == len(idx) or idx[i + 1] != v + 1:
                runs.append(str(start) if start == v else f"{start}-{v}")
                start = None
        out.append((pattern.replace("{}", "{" + ",".join(runs) + "}") if idx else pattern, why))
    return out


def plan_problems(layers: dict[str, QuantScheme | None], linears: dict, fmt: str,
                  components: Mapping[str, Component]) -> list[str]:
    """Everything wrong with a (possibly hand-edited) plan for this model, one line per module.

    Args:
        layers: module name -> scheme (None keeps it).
        linears: the model's ``{name: nn.Linear}`` (meta-device modules are fine).
        fmt: the export format the plan is written for.
        components: each Linear's component (``Adapter.component_of``): what may run where
            (:func:`quantlab.quant.registry.component_problem`).
    """
    problems = []
    for name, scheme in layers.items():
        if name not in linears:
            problems.append(f"{name}: not a Linear layer of this model")
            continue
        if scheme is None:
            continue
        why = scheme_problem(scheme, fmt)
        if why is None:
            why = shape_problem(linears[name].out_features, linears[name].in_features, scheme, fmt)
        if why is None:
            why = placement_problem(scheme, components[name], fmt)
        if why is not None:
            problems.append(f"{name} ({scheme.label()}): {why}")
    return problems
