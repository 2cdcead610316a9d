"""The luq planner (docs/method.md): blocks ranked by their LUQ tensor's k-means entropy, the ``k`` lowest at
the low scheme; ``k`` given, from a byte budget or nominal-bit target, or searched against a logit-KL threshold.
Vision blocks join the ranking when ``plan.components`` includes ``vision``; the projector gets the high scheme."""

from __future__ import annotations

from quantlab.plan import planners
from quantlab.plan.cost import nominal_bits
from quantlab.plan.hessians import hessian_source
from quantlab.plan.inputs import (
    PlanInputs,
    fit_shapes,
    fixed_bytes,
    nominal_avg_bits,
    plan_format,
    stored_bytes,
)
from quantlab.plan.sensitivity import quantized_kl
from quantlab.plan.spec import PlanSpec


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


def plan_luq(x: PlanInputs):
    """The luq planner (module doc)."""
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
            {b: sum(stored_bytes(linears[n], spec.low, fmt, spec.shape_fallback) for n in ns) for b, ns in blocks.items()},
            {b: sum(stored_bytes(linears[n], spec.high, fmt, spec.shape_fallback) for n in ns) for b, ns in blocks.items()},
            fixed_bytes=fixed_bytes(loaded, linears, planned, fmt, fixed, spec.shape_fallback), budget_bytes=budget,
            block_numel={b: sum(linears[n].weight.numel() for n in ns) for b, ns in blocks.items()},
            low=spec.low, high=spec.high, target_bits=spec.target_avg_bits)
    layers = {**planners.luq(entropy, k, spec.low, spec.high, blocks), **{n: spec.high for n in x.projector}}
    lows = set(order[:k])
    info = {(f"vision_block.{b[1]}" if isinstance(b, tuple) else f"block.{b}"): {
        "entropy_bits": round(entropy[b], 6), "rank": order.index(b),
        "scheme": (spec.low if b in lows else spec.high).label()}
        for b in sorted(blocks, key=planners.block_sort_key)}
    info["luq"] = {"k": k, "order": [_block_label(b) for b in order], "modality": spec.entropy_modality,
                   "nominal_avg_bits": round(nominal_avg_bits(layers, linears), 4)}
    if probes is not None:
        info["luq"]["search_probes"] = probes
    return layers, info


def luq_requires(spec: PlanSpec) -> list[str]:
    out = []
    if spec.low is None or spec.high is None:
        out.append("plan.low / plan.high: the luq planner needs both schemes (the ultra-low one and the default)")
    if all(v is None for v in (spec.k, spec.target_avg_bits, spec.search_max_kl, spec.budget_gb)):
        out.append("plan: the luq planner needs how many blocks go low: k, target_avg_bits, search_max_kl or budget_gb")
    if spec.target_avg_bits is not None and spec.low is not None and nominal_bits(spec.low) > spec.target_avg_bits:
        out.append(f"plan.target_avg_bits: {spec.target_avg_bits} is below the low scheme's own nominal width "
                   f"{nominal_bits(spec.low)}: no k reaches it")
    return out
