"""From calibration statistics and a recipe's ``plan`` section to a :class:`Plan` (the plan.yaml artifact).

| planner | needs                                      | k / budget from                                       |
|---------|--------------------------------------------|-------------------------------------------------------|
| uniform | ``scheme``                                 | -                                                     |
| luq     | block entropies, ``low``, ``high``         | ``k``, or the smallest k meeting ``target_avg_bits`` (nominal) / ``budget_gb`` |
| budget  | Hessians, ``candidates``, calibration data | ``budget_gb`` (whole model) or ``budget_bytes``, or ``target_avg_bits`` (exact stored bits of the decoder Linears) |

Pin rules from the recipe are applied first and never overridden. Every planner decides the Linears of
``plan.components`` (default: the decoder blocks'); everything else is kept unless a rule says otherwise.
With ``vision`` among them, luq ranks the vision blocks by their LUQ tensor's entropy (calibrated with
``vision``) in one order with the decoder blocks and gives the projector's Linears the high scheme; budget
measures each vision and projector unit against the same KL (``measure_outside_decoder``) and offers it the
candidates that can run there and be exported (:func:`outside_problem`; AWQ ones measured with their block-wise
scale search, as in the decoder).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantlab.calib.executor import CalibSample
from quantlab.calib.modality_grad import median_floor
from quantlab.core.errors import problems_error
from quantlab.core.registry import Member, Registry
from quantlab.models.adapter import Component
from quantlab.models.load import LoadedModel
from quantlab.plan import planners
from quantlab.plan.cost import linear_bytes, model_size, nominal_bits
from quantlab.plan.fit import (
    Fitted,
    ShapeFallback,
    fit_scheme,
    group_by_block,
    placement_problem,
)
from quantlab.plan.hessians import hessian_source, weighted
from quantlab.plan.plan import Plan, apply_rules
from quantlab.plan.sensitivity import (
    measure_damage,
    measure_outside_decoder,
    quantized_kl,
    units_of,
)
from quantlab.plan.spec import PlanSpec
from quantlab.quant.registry import MEASURED, get_backend
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


def _linears(loaded: LoadedModel) -> dict[str, nn.Linear]:
    return {n: m for n, m in loaded.model.named_modules() if isinstance(m, nn.Linear)}


def _bytes(mod: nn.Linear, scheme: QuantScheme | None, fmt: str, fallback: ShapeFallback = "smaller_group") -> int:
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


def make_plan(loaded: LoadedModel, stats, spec: PlanSpec, *, export_format: str = "auto",
              samples: Sequence[CalibSample] = (), budget_bytes: int | None = None, progress: bool = True,
              device: str | torch.device | None = None) -> Plan:
    """Run the recipe's planner. ``budget_bytes`` (whole model) overrides the recipe's budget.

    ``device`` is where the budget planner's sensitivity pass runs (see
    :func:`quantlab.plan.sensitivity.measure_damage`); the other planners compute nothing heavy.
    """
    adapter = loaded.adapter
    linears = _linears(loaded)
    rules = [r.model_dump() for r in spec.rules]
    pinned = apply_rules(list(linears), rules, adapter)
    blocks: dict[int, list[str]] = {}
    vision_blocks: dict[int, list[str]] = {}
    projector: list[str] = []
    for n in planned_linears(list(linears), adapter, spec, pinned):
        if adapter.block_index(n) is not None:
            blocks.setdefault(adapter.block_index(n), []).append(n)
        elif adapter.vision_block_index(n) is not None:
            vision_blocks.setdefault(adapter.vision_block_index(n), []).append(n)
        else:  # the projector, or a vision-tower Linear outside its blocks (none in the supported families)
            projector.append(n)
    info: dict[str, dict] = {}

    planner = PLANNERS.get(spec.planner)
    # an explicit budget_bytes stands for the recipe's budget
    given = spec if budget_bytes is None else spec.model_copy(update={"budget_gb": budget_bytes / 1e9})
    problems = planner.problems(given)
    if problems:
        raise problems_error(f"plan.planner {spec.planner!r}", problems)
    layers, info = planner.plan(PlanInputs(loaded, stats, spec, blocks, linears, export_format, budget_bytes,
                                           tuple(samples), progress, device, vision_blocks, projector, pinned))

    full = {n: pinned.get(n, layers.get(n)) for n in linears}
    full, weights = resolve_measured_weights(full, stats, adapter)
    if weights:
        info["image_weight"] = {"from": "calibration's gradient ratio (image / text tokens), median-floored",
                                "blocks": {str(b): w for b, w in weights.items()}}
    fmt = plan_format(list(full.values()), export_format)
    full, fallbacks = fit_shapes(full, linears, fmt, spec.shape_fallback)
    if fallbacks:
        info["fallbacks"] = fallbacks
    size = model_size(loaded.model, adapter, full, fmt, dtype_bytes=2)
    return Plan(model=loaded.source, format=fmt, planner=spec.planner, layers=full,
                predicted_bytes=size.total_bytes, avg_bits=size.avg_bits, info=info, budget_bytes=budget_bytes)


def resolve_measured_weights(layers: dict[str, QuantScheme | None], stats, adapter
                             ) -> tuple[dict[str, QuantScheme | None], dict[int, float]]:
    """Schemes with ``image_weight: measured`` get their block's number: MBQ's gradient ratio (image / text
    tokens) from calibration, floored at the median over blocks (docs/method.md#token-weighted-hessians).
    Returns the layers and ``{block: weight}`` used (empty when no scheme asks)."""
    asking = [n for n, s in layers.items() if s is not None and s.args.get("image_weight") == MEASURED]
    if not asking:
        return layers, {}
    ratios = (stats.meta or {}).get("modality_gradient_ratio") if stats is not None else None
    if not ratios:
        raise ValueError(f"image_weight {MEASURED!r} ({asking[0]}, ...) needs calibration statistics with "
                         "modality gradient ratios: calibrate with modality_gradients (the quantize command does "
                         "when a recipe scheme asks for it)")
    floored = median_floor(ratios)
    out, used = dict(layers), {}
    for n in asking:
        block = adapter.block_index(n)
        if block is None:
            raise ValueError(f"{n}: image_weight {MEASURED!r} is measured per decoder block; this module is "
                             "outside the decoder")
        used[block] = round(floored[block], 6)
        out[n] = layers[n].model_copy(update={"args": {**layers[n].args, "image_weight": used[block]}})
    return out, dict(sorted(used.items()))


def _fixed_bytes(loaded: LoadedModel, linears: dict[str, nn.Linear], planned: set[str], fmt: str,
                 fixed: Mapping[str, QuantScheme | None], fallback: ShapeFallback = "smaller_group") -> int:
    """Bytes of everything the planner does not decide: non-Linear parameters, Linears with a fixed scheme
    (``fixed``: pinned by a rule, luq's projector at the high scheme; after the shape fallback) and the other
    unplanned Linears in fp16."""
    fitted = {n: fit_scheme(linears[n].out_features, linears[n].in_features, s, fmt, fallback).scheme
              for n, s in fixed.items()}
    total = model_size(loaded.model, loaded.adapter, fitted, fmt, dtype_bytes=2).total_bytes
    return total - sum(_bytes(linears[n], None, fmt) for n in planned)


def _luq_search(loaded, stats, spec: PlanSpec, order, blocks, samples, linears, fmt):
    """LUQ's search: the largest k whose logit KL (fp vs quantized, Hessian-based proxy) <= the threshold."""

    if not samples:
        raise ValueError("plan.search_max_kl needs calibration samples")

    def score(k: int) -> float:
        lows = set(order[:k])
        mapping = {n: spec.low if b in lows else spec.high for b, ns in blocks.items() for n in ns}
        fitted, _ = fit_shapes(mapping, linears, fmt, spec.shape_fallback)
        return -quantized_kl(loaded, samples, {n: s for n, s in fitted.items() if s is not None}, source)

    names = [n for ns in blocks.values() for n in ns]
    source = hessian_source(loaded, samples, [spec.low, spec.high], names, stats.hessians, stats.token_importance)

    k, probes = planners.luq_search(order, score, -spec.search_max_kl)
    return (k or 0), [{"k": kk, "kl": -s} for kk, s in probes]


def _luq_blocks(x: PlanInputs) -> tuple[dict, dict]:
    """LUQ's units: ``{block key: entropy}`` and ``{block key: Linear names}`` over the decoder blocks and, with
    ``vision`` in ``plan.components``, the vision blocks (keys ``("vision", i)``)."""
    entropy = x.stats.block_entropy(x.spec.entropy_modality, "kmeans")
    entropy = {b: entropy[b] for b in x.blocks}
    groups: dict = dict(x.blocks)
    if x.vision_blocks:
        seen = x.stats.vision_block_entropy("kmeans")
        missing = sorted(set(x.vision_blocks) - set(seen))
        if missing:
            raise ValueError(f"plan.components includes vision, but the calibration statistics have no entropy for "
                             f"vision blocks {missing}: calibrate with vision statistics (calibration.stats.vision)")
        for i, names in x.vision_blocks.items():
            entropy["vision", i] = seen[i]
            groups["vision", i] = names
    return entropy, groups


def _block_label(b) -> str | int:
    return f"vision.{b[1]}" if isinstance(b, tuple) else b


def _luq(x: PlanInputs):
    loaded, stats, spec, linears = x.loaded, x.stats, x.spec, x.linears
    export_format, budget_bytes, samples = x.export_format, x.budget_bytes, x.samples
    entropy, blocks = _luq_blocks(x)
    order = planners.luq_order(entropy)
    fmt = plan_format([spec.low, spec.high], export_format)
    fixed = {**x.pinned, **{n: spec.high for n in x.projector}}  # the projector is no block: the high scheme
    probes = None
    if spec.k is not None:
        k = spec.k
    elif spec.search_max_kl is not None:
        k, probes = _luq_search(loaded, stats, spec, order, blocks, samples, linears, fmt)
    else:
        budget = budget_bytes if budget_bytes is not None else (
            int(spec.budget_gb * 1e9) if spec.budget_gb is not None else None)
        planned = {n for ns in blocks.values() for n in ns}
        k = planners.k_for_budget(
            order,
            {b: sum(_bytes(linears[n], spec.low, fmt, spec.shape_fallback) for n in ns) for b, ns in blocks.items()},
            {b: sum(_bytes(linears[n], spec.high, fmt, spec.shape_fallback) for n in ns) for b, ns in blocks.items()},
            fixed_bytes=_fixed_bytes(loaded, linears, planned, fmt, fixed, spec.shape_fallback), budget_bytes=budget,
            block_numel={b: sum(linears[n].weight.numel() for n in ns) for b, ns in blocks.items()},
            low=spec.low, high=spec.high, target_bits=spec.target_avg_bits)
    layers = {**planners.luq(entropy, k, spec.low, spec.high, blocks), **{n: spec.high for n in x.projector}}
    lows = set(order[:k])
    info = {(f"vision_block.{b[1]}" if isinstance(b, tuple) else f"block.{b}"): {
        "entropy_bits": round(entropy[b], 6), "rank": order.index(b),
        "scheme": (spec.low if b in lows else spec.high).label()}
        for b in sorted(blocks, key=planners.block_sort_key)}
    info["luq"] = {"k": k, "order": [_block_label(b) for b in order], "modality": spec.entropy_modality,
                   "nominal_avg_bits": round(_nominal(layers, linears), 4)}
    if probes is not None:
        info["luq"]["search_probes"] = probes
    return layers, info


def _check_reachable(unit_budget: int, fixed: int, units, candidates, cost) -> None:
    """Refuse a budget below the smallest reachable size, from the cost model alone (before measuring)."""
    labels = [c.label() for c in candidates]
    smallest = sum(min(cost[u, lab] for lab in labels if (u, lab) in cost) for u in units)
    largest = sum(max(cost[u, lab] for lab in labels if (u, lab) in cost) for u in units)
    if unit_budget < smallest:
        raise ValueError(
            f"plan: a budget of {(unit_budget + fixed) / 1e9:.6f} GB ({unit_budget + fixed:,} bytes) is below the "
            f"smallest reachable size {(smallest + fixed) / 1e9:.6f} GB ({smallest + fixed:,} bytes, every unit at its "
            f"cheapest candidate); the largest is {(largest + fixed) / 1e9:.6f} GB ({largest + fixed:,} bytes). "
            f"Candidates: {labels}")


def _nominal(layers: dict[str, QuantScheme], linears) -> float:
    num = sum(nominal_bits(s) * linears[n].weight.numel() for n, s in layers.items())
    return num / max(1, sum(linears[n].weight.numel() for n in layers))


def _budget(x: PlanInputs):
    loaded, stats, spec, blocks, linears = x.loaded, x.stats, x.spec, x.blocks, x.linears
    export_format, samples, budget_bytes, progress, device = x.export_format, x.samples, x.budget_bytes, x.progress, \
        x.device
    if not samples:
        raise ValueError("plan.planner 'budget' measures sensitivity on calibration samples; none given")
    # weighted candidates get Hessians gathered for them (plan/hessians.py); plain ones need calibration's
    needs_h = [c.label() for c in spec.candidates if get_backend(c.backend).needs_hessian and not weighted(c)]
    if needs_h and not stats.hessians:
        raise ValueError(f"candidates {needs_h} need Hessians: calibrate with stats.hessians: true")
    fmt = plan_format(spec.candidates, export_format)
    adapter = loaded.adapter
    names = [n for ns in blocks.values() for n in ns]
    units = units_of(blocks, planners.fused_groups(names, adapter))
    outside_names = [n for ns in x.vision_blocks.values() for n in ns] + x.projector
    outside = units_of(x.vision_blocks, planners.fused_groups(outside_names, adapter)) + [(n,) for n in x.projector]
    # a vision/projector unit is offered the candidates that can run there and be exported (fit.placement_problem)
    offered = {u: [c for c in spec.candidates if outside_problem(c, adapter.component_of(u[0]), fmt) is None]
               for u in outside}
    bare = [u[0] for u, cs in offered.items() if not cs]
    if bare:
        raise ValueError(f"plan.candidates: none is offered to {bare[0]} ({adapter.component_of(bare[0]).value}) in "
                         f"{fmt}: {outside_problem(spec.candidates[0], adapter.component_of(bare[0]), fmt)}")
    cost = {(u, c.label()): sum(_bytes(linears[n], c, fmt, spec.shape_fallback) for n in u)
            for u in units for c in spec.candidates}
    cost.update({(u, c.label()): sum(_bytes(linears[n], c, fmt, spec.shape_fallback) for n in u)
                 for u in outside for c in offered[u]})
    names += outside_names
    units += outside
    fixed = _fixed_bytes(loaded, linears, set(names), fmt, x.pinned, spec.shape_fallback)
    if budget_bytes is not None:
        unit_budget = budget_bytes - fixed
    elif spec.budget_gb is not None:
        unit_budget = int(spec.budget_gb * 1e9) - fixed
    elif spec.target_avg_bits is not None:
        unit_budget = int(spec.target_avg_bits * sum(linears[n].weight.numel() for n in names) / 8)
    else:
        raise ValueError("plan.planner 'budget' needs plan.budget_gb or plan.target_avg_bits")
    _check_reachable(unit_budget, fixed, units, spec.candidates, cost)
    # Sensitivity runs one forward of the subset per (unit, candidate); an evenly strided subset (image
    # and text samples alike) bounds the cost.
    stride = max(1, len(samples) // spec.sensitivity_samples)
    subset = list(samples)[::stride][: spec.sensitivity_samples]
    missing_h = [n for n in outside_names if n not in stats.hessians]
    if missing_h and any(get_backend(c.backend).needs_hessian for cs in offered.values() for c in cs):
        raise ValueError(f"plan.components includes vision/projector Linears, but the calibration statistics have no "
                         f"Hessian for {missing_h[0]} (and {len(missing_h) - 1} more): calibrate with vision "
                         "statistics and Hessians (calibration.stats.vision, stats.hessians)")
    decoder_names = [n for ns in blocks.values() for n in ns]
    source = hessian_source(loaded, subset, spec.candidates, decoder_names, stats.hessians, stats.token_importance)

    def fit(n: str, c: QuantScheme) -> QuantScheme | None:
        return fit_scheme(linears[n].out_features, linears[n].in_features, c, fmt, spec.shape_fallback).scheme

    decoder_units = [u for u in units if u not in offered]
    damage = measure_damage(loaded, subset, decoder_units, spec.candidates, source, progress=progress,
                            device=device, fit=fit)
    if offered:
        damage.update(measure_outside_decoder(loaded, subset, offered, stats.hessians, progress=progress,
                                              device=device, fit=fit))
    by_label = {c.label(): c for c in spec.candidates}
    sol = planners.budget(units, list(by_label), damage, cost, unit_budget)
    layers = {n: by_label[sol.choice[u]] for u in units for n in u}
    info = {u[0]: {
        "unit": list(u), "choice": sol.choice[u],
        "damage": {lab: round(damage[u, lab], 8) for lab in by_label if (u, lab) in damage},
        "bytes": {lab: cost[u, lab] for lab in by_label if (u, lab) in cost}} for u in units}
    info["budget"] = {"unit_budget_bytes": unit_budget, "objective": sol.objective, "unit_bytes": sol.total_bytes}
    return layers, info


def _uniform(x: PlanInputs):
    names = [n for groups in (x.blocks, x.vision_blocks) for ns in groups.values() for n in ns] + x.projector
    return {n: x.spec.scheme for n in names}, {}


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


class Planner(Member):
    """A registered planner and what the rest of quantlab asks about it.

    Attributes:
        plan: ``PlanInputs -> (layers, info)``: a scheme per decoder Linear it decides, and its reasons.
        schemes: ``spec -> schemes`` it may assign (the preflight checks each against each module).
        requires: ``spec -> problems``: what the recipe lacks for this planner (empty: nothing).
        measures: ``spec -> bool``: it runs the model on calibration samples with every block in memory and
            needs Hessians (not under ``--stream``).
        needs_stats: it reads calibration statistics (entropies, Hessians); False: config-only planning.
        measures_awq: its measurement runs AWQ's scale search for ``awq`` candidates (the budget planner's
            per-unit damage); a measuring planner without it refuses them.
    """

    plan: Callable[[PlanInputs], tuple[dict, dict]]
    schemes: Callable[[PlanSpec], list]
    requires: Callable[[PlanSpec], list[str]]
    measures: Callable[[PlanSpec], bool]
    needs_stats: bool = True
    measures_awq: bool = False

    def problems(self, spec: PlanSpec) -> list[str]:
        """What the recipe lacks for this planner (``requires``), and what it cannot measure faithfully."""
        out = list(self.requires(spec))
        if self.measures(spec):
            measured = sorted({s.label() for s in self.schemes(spec) if s.args.get("image_weight") == MEASURED})
            if measured:
                # the measured weight is resolved per block after planning; a candidate needs its number now
                out.append(f"plan: the {spec.planner} planner measures each candidate with the Hessian it is "
                           f"quantized with; image_weight {MEASURED!r} is resolved per block only after planning "
                           f"({', '.join(measured)}): give the candidates a number, or set measured weights by the "
                           "uniform planner, luq with k / target_avg_bits / budget_gb, or plan.rules")
            scaled = sorted({s.label() for s in self.schemes(spec) if s.args.get("awq", False)})
            if scaled and not self.measures_awq:
                # AWQ's scales are searched per block in the quantize stage; a measurement would score the
                # candidate without them
                out.append(f"plan: the {spec.planner} planner measures candidates layer by layer without AWQ's "
                           f"block-wise scale search; schemes with awq ({', '.join(scaled)}) can be set by the "
                           "uniform planner, luq with k / target_avg_bits / budget_gb, or plan.rules")
        return out


def _luq_requires(spec: PlanSpec) -> list[str]:
    out = []
    if spec.low is None or spec.high is None:
        out.append("plan.low / plan.high: the luq planner needs both schemes (the ultra-low one and the default)")
    if all(v is None for v in (spec.k, spec.target_avg_bits, spec.search_max_kl, spec.budget_gb)):
        out.append("plan: the luq planner needs how many blocks go low: k, target_avg_bits, search_max_kl or budget_gb")
    if spec.target_avg_bits is not None and spec.low is not None and nominal_bits(spec.low) > spec.target_avg_bits:
        out.append(f"plan.target_avg_bits: {spec.target_avg_bits} is below the low scheme's own nominal width "
                   f"{nominal_bits(spec.low)}: no k reaches it")
    return out


def _budget_requires(spec: PlanSpec) -> list[str]:
    out = []
    if not spec.candidates:
        out.append("plan.candidates: the budget planner needs at least one candidate scheme")
    if spec.budget_gb is None and spec.target_avg_bits is None:
        out.append("plan: the budget planner needs budget_gb or target_avg_bits")
    return out


PLANNERS: Registry[Planner] = Registry("planner")
PLANNERS.register(Planner(
    name="uniform", plan=_uniform, schemes=lambda spec: [s for s in (spec.scheme,) if s is not None],
    requires=lambda spec: [] if spec.scheme is not None else ["plan.scheme: the uniform planner needs the one "
                                                              "scheme to apply"],
    measures=lambda spec: False, needs_stats=False))
PLANNERS.register(Planner(
    name="luq", plan=_luq, schemes=lambda spec: [s for s in (spec.low, spec.high) if s is not None],
    requires=_luq_requires, measures=lambda spec: spec.search_max_kl is not None))
PLANNERS.register(Planner(
    name="budget", plan=_budget, schemes=lambda spec: list(spec.candidates), requires=_budget_requires,
    measures=lambda spec: True, measures_awq=True))
