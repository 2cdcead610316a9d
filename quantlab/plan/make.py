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

from collections.abc import Callable, Sequence

import torch

from quantlab.calib.executor import CalibSample
from quantlab.calib.modality_grad import median_floor
from quantlab.core.errors import problems_error
from quantlab.core.registry import Member, Registry
from quantlab.models.load import LoadedModel
from quantlab.plan.budget_plan import budget_requires, plan_budget
from quantlab.plan.cost import model_size
from quantlab.plan.inputs import (  # noqa: F401 (outside_problem, planned_linears: re-exported for preflight)
    PlanInputs,
    fit_shapes,
    model_linears,
    outside_problem,
    plan_format,
    planned_linears,
)
from quantlab.plan.luq_plan import luq_requires, plan_luq
from quantlab.plan.plan import Plan, apply_rules
from quantlab.plan.spec import PlanSpec
from quantlab.quant.registry import MEASURED
from quantlab.quant.scheme import QuantScheme


def make_plan(loaded: LoadedModel, stats, spec: PlanSpec, *, export_format: str = "auto",
              samples: Sequence[CalibSample] = (), budget_bytes: int | None = None, progress: bool = True,
              device: str | torch.device | None = None) -> Plan:
    """Run the recipe's planner. ``budget_bytes`` (whole model) overrides the recipe's budget.

    ``device`` is where the budget planner's sensitivity pass runs (see
    :func:`quantlab.plan.sensitivity.measure_damage`); the other planners compute nothing heavy.
    """
    adapter = loaded.adapter
    linears = model_linears(loaded)
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


def _uniform(x: PlanInputs):
    names = [n for groups in (x.blocks, x.vision_blocks) for ns in groups.values() for n in ns] + x.projector
    return {n: x.spec.scheme for n in names}, {}


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


PLANNERS: Registry[Planner] = Registry("planner")
PLANNERS.register(Planner(
    name="uniform", plan=_uniform, schemes=lambda spec: [s for s in (spec.scheme,) if s is not None],
    requires=lambda spec: [] if spec.scheme is not None else ["plan.scheme: the uniform planner needs the one "
                                                              "scheme to apply"],
    measures=lambda spec: False, needs_stats=False))
PLANNERS.register(Planner(
    name="luq", plan=plan_luq, schemes=lambda spec: [s for s in (spec.low, spec.high) if s is not None],
    requires=luq_requires, measures=lambda spec: spec.search_max_kl is not None))
PLANNERS.register(Planner(
    name="budget", plan=plan_budget, schemes=lambda spec: list(spec.candidates), requires=budget_requires,
    measures=lambda spec: True, measures_awq=True))
