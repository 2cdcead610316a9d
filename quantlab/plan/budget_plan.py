"""The budget planner: each unit's damage measured (``plan.sensitivity``), then the exact multiple-choice
knapsack over stored bytes (``planners.budget``). Vision and projector units are measured like decoder ones
when ``plan.components`` includes them, with the candidates that can run and be exported there."""

from __future__ import annotations

from quantlab.plan import planners
from quantlab.plan.fit import fit_scheme
from quantlab.plan.hessians import hessian_source, weighted
from quantlab.plan.inputs import (
    PlanInputs,
    fixed_bytes,
    outside_problem,
    plan_format,
    stored_bytes,
)
from quantlab.plan.sensitivity import measure_damage, measure_outside_decoder, units_of
from quantlab.plan.spec import PlanSpec
from quantlab.quant.registry import get_backend
from quantlab.quant.scheme import QuantScheme


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


def plan_budget(x: PlanInputs):
    """The budget planner (module doc)."""
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
    candidates_of = {**{u: spec.candidates for u in units}, **offered}
    cost = {(u, c.label()): sum(stored_bytes(linears[n], c, fmt, spec.shape_fallback) for n in u)
            for u, cs in candidates_of.items() for c in cs}
    names += outside_names
    units += outside
    fixed = fixed_bytes(loaded, linears, set(names), fmt, x.pinned, spec.shape_fallback)
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


def budget_requires(spec: PlanSpec) -> list[str]:
    out = []
    if not spec.candidates:
        out.append("plan.candidates: the budget planner needs at least one candidate scheme")
    if spec.budget_gb is None and spec.target_avg_bits is None:
        out.append("plan: the budget planner needs budget_gb or target_avg_bits")
    return out
