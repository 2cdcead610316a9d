"""Checks before any work: everything the recipe, the model's config and the flags decide is checked before
the first calibration sample is loaded, and every problem found is reported at once.

Nothing here loads weights or writes a file: the model is a meta-device skeleton built from its config.

| check                 | what is refused                                                                     |
|-----------------------|-------------------------------------------------------------------------------------|
| model                 | no such alias/directory/hub id (offline and not cached), no config.json, an unsupported architecture, pickle-only weights, ``--stream`` on anything but a local safetensors checkpoint |
| recipe                | a planner without its schemes or target, a scheme its backend or the export format cannot take, ``--stream`` with a planner that needs every block in memory, unknown eval tasks, task data or calibration files that do not exist |
| recipe x model        | rules that match nothing, shapes a scheme cannot take under ``shape_fallback: error``, Hessian backends outside the decoder, a budget below the smallest reachable size |
| output location       | ``--out`` equal to, inside or containing the model directory, or the working directory or one above it |
| flags                 | a malformed ``--push-to-hub`` id                                                    |
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from torch import nn

from quantlab.calib.data import (
    IMAGE_SOURCE_KINDS,
    SOURCES,
    TEXT_SOURCE_KINDS,
    CalibSource,
)
from quantlab.core.device import resolve_device
from quantlab.core.errors import UserError, did_you_mean, problems_error
from quantlab.eval.engines import ENGINES, engine_python
from quantlab.eval.tasks import TASKS
from quantlab.models.adapter import Component
from quantlab.models.load import LoadedModel, load_model, resolve
from quantlab.plan.cost import linear_bytes, model_size
from quantlab.plan.fit import (
    fit_scheme,
    group_by_block,
    placement_problem,
    scheme_problem,
)
from quantlab.plan.make import PLANNERS, outside_problem, plan_format, planned_linears
from quantlab.plan.plan import apply_rules
from quantlab.quant.registry import BACKENDS, GRADIENT, MEASURED
from quantlab.quant.scheme import QuantScheme
from quantlab.recipe import Recipe


def recipe_schemes(recipe: Recipe) -> Iterator[tuple[str, QuantScheme]]:
    """Every scheme a recipe names, with its key path (``plan.low``, ``plan.candidates[1]``, ...)."""
    spec = recipe.plan
    for key in ("scheme", "low", "high"):
        if getattr(spec, key) is not None:
            yield f"plan.{key}", getattr(spec, key)
    for i, c in enumerate(spec.candidates):
        yield f"plan.candidates[{i}]", c
    for i, r in enumerate(spec.rules):
        if r.scheme is not None:
            yield f"plan.rules[{i}].scheme", r.scheme


def asks_measured_weights(recipe: Recipe) -> bool:
    """Some scheme of the recipe takes ``image_weight: measured`` (calibration then measures MBQ's ratios)."""
    return any(s.args.get("image_weight") == MEASURED for _, s in recipe_schemes(recipe))


def asks_token_importance(recipe: Recipe) -> bool:
    """Some scheme of the recipe takes ``token_weight: gradient`` (calibration then measures each token's
    gradient saliency)."""
    return any(s.args.get("token_weight") == GRADIENT for _, s in recipe_schemes(recipe))


def planner_schemes(recipe: Recipe) -> list[QuantScheme]:
    """The schemes the recipe's planner may give a decoder Linear that no rule pins."""
    return PLANNERS.get(recipe.plan.planner).schemes(recipe.plan)


def _source_problems(key: str, sources: list[CalibSource], kinds: tuple[str, ...]) -> list[str]:
    out = []
    for i, src in enumerate(sources):
        where = f"calibration.{key}[{i}]"
        if src.kind not in kinds:
            out.append(f"{where}.kind: unknown kind {src.kind!r}{did_you_mean(src.kind, kinds)}; valid: {list(kinds)}")
        elif SOURCES.get(src.kind).needs_path and not src.path:
            out.append(f"{where}.path: kind {src.kind!r} needs a path")
        elif src.path and SOURCES.get(src.kind).local_path and not Path(src.path).expanduser().exists():
            out.append(f"{where}.path: {src.path} does not exist")
    return out


def calibration_problems(recipe: Recipe) -> list[str]:
    """What is wrong with the recipe's calibration sources (unknown kinds, missing files)."""
    return (_source_problems("image_sources", recipe.calibration.image_sources, IMAGE_SOURCE_KINDS)
            + _source_problems("text_sources", recipe.calibration.text_sources, TEXT_SOURCE_KINDS))


def check_device(device: str | None) -> None:
    """Refuse a device string torch cannot use here (``tpu:0``, ``cuda`` without CUDA)."""
    try:
        resolve_device(device)
    except ValueError as err:
        raise UserError(f"--device: {err}", "pass cpu, cuda or cuda:N") from None


def recipe_problems(recipe: Recipe, *, stream: bool = False) -> list[str]:
    """What is wrong with a recipe whatever the model (empty: nothing)."""
    spec, fmt = recipe.plan, recipe.export.format
    planner = PLANNERS.get(spec.planner)
    problems: list[str] = planner.problems(spec)
    for key, scheme in recipe_schemes(recipe):
        why = scheme_problem(scheme, fmt)
        if why is not None:
            problems.append(f"{key} ({scheme.label()}): {why}")
    if stream and asks_measured_weights(recipe):
        problems.append(f"image_weight: {MEASURED!r} is measured with a backward pass through the whole model, "
                        "which --stream does not hold; run without --stream or give image_weight as a number")
    if stream and asks_token_importance(recipe):
        problems.append(f"token_weight: {GRADIENT!r} is measured with a backward pass through the whole model, "
                        "which --stream does not hold; run without --stream or weigh tokens by image_weight")
    if stream and planner.measures(spec):
        problems.append(f"plan.planner: the {spec.planner} planner measures the model's output with every block "
                        "in memory, which --stream does not hold; run without --stream, or plan with luq (k / target_avg_bits / budget_gb) or uniform")
    for task in recipe.eval.tasks:
        if task not in TASKS:
            problems.append(f"eval.tasks: unknown task {task!r}{did_you_mean(task, TASKS)}; valid: {sorted(TASKS)}")
        elif TASKS.get(task).generate is None:
            files = TASKS.get(task).files
            if recipe.eval.data_dir is None:
                problems.append(f"eval.data_dir: task {task!r} reads benchmark files; set eval.data_dir")
            elif not (Path(recipe.eval.data_dir) / files).is_dir():
                problems.append(f"eval.data_dir: {Path(recipe.eval.data_dir) / files} does not exist "
                                f"(task {task!r})")
    if recipe.eval.tasks:
        problems += engine_problems(recipe.eval.engine)
        engine = ENGINES.get(recipe.eval.engine) if recipe.eval.engine in ENGINES.names() else None
        known = [s for _, s in recipe_schemes(recipe) if s.backend in BACKENDS]  # unknown ones are reported above
        written = plan_format(known, fmt)  # what "auto" resolves to
        if engine is not None and engine.formats and written not in engine.formats:
            problems.append(f"eval.engine: {engine.name} serves export formats {list(engine.formats)}; "
                            f"export.format is {written!r}")
    return problems + calibration_problems(recipe)


def engine_problems(name: str, python: str | None = None) -> list[str]:
    """Why evaluation cannot run through engine ``name`` (unknown, or not installed); empty: it can."""
    if name not in ENGINES.names():
        return [f"eval.engine: unknown engine {name!r}{did_you_mean(name, ENGINES.names())}; valid: {ENGINES.names()}"]
    try:
        engine_python(name, python)
    except UserError as e:
        return [f"eval.engine: {e}"]
    return []


def _cheapest(fmt: str, schemes: list[QuantScheme], out_f: int, in_f: int, policy: str) -> QuantScheme | None:
    fitted = [fit_scheme(out_f, in_f, s, fmt, policy).scheme for s in schemes]  # type: ignore[arg-type]
    return min(fitted, key=lambda s: linear_bytes(out_f, in_f, s, fmt, bias=False), default=None)


def component_problems(spec, choices: list[QuantScheme], components: set[Component], fmt: str, *,
                       stream: bool = False) -> list[str]:
    """What cannot run on the parts ``plan.components`` hands the planner: every scheme of uniform and luq must
    run there (and be exported as ``fmt``), budget needs one candidate per part; a --stream run cannot
    calibrate the vision tower."""
    problems = []
    outside = sorted((c for c in components if c is not Component.DECODER), key=lambda c: c.value)
    for comp in outside:
        if spec.planner == "budget":
            whys = {s.label(): why for s in choices if (why := outside_problem(s, comp, fmt))}
            if len(whys) < len(choices):
                continue  # the planner offers the others there
        else:
            whys = {s.label(): why for s in choices if (why := placement_problem(s, comp, fmt))}
        for label, why in whys.items():
            problems.append(f"plan.components: {comp.value} ({label}): {why}")
    planner = PLANNERS.get(spec.planner)
    if stream and outside and (planner.needs_stats or any(BACKENDS.get(s.backend).needs_hessian for s in choices
                                                          if s.backend in BACKENDS)):
        problems.append(f"plan.components: {', '.join(c.value for c in outside)} Linears are calibrated by streaming "
                        "the images through the vision tower in memory, which --stream does not hold; run without "
                        "--stream, or plan the decoder only and pin the vision tower with a data-free rule (rtn)")
    return problems


def model_problems(skeleton: LoadedModel, recipe: Recipe, *, stream: bool = False) -> list[str]:
    """What is wrong with a recipe for this model (from its config alone)."""
    spec = recipe.plan
    adapter = skeleton.adapter
    linears = {n: m for n, m in skeleton.model.named_modules() if isinstance(m, nn.Linear)}
    try:
        pinned = apply_rules(list(linears), [r.model_dump() for r in spec.rules], adapter)
    except ValueError as err:
        return [f"plan.rules: {err}"]
    free = planned_linears(list(linears), adapter, spec, pinned)
    choices = planner_schemes(recipe)
    fmt = plan_format([*choices, *pinned.values()], recipe.export.format)
    problems = [f"{n} ({s.label()}, pinned by plan.rules): {why}" for n, s in pinned.items()
                if s is not None and (why := placement_problem(s, adapter.component_of(n), fmt))]
    problems += component_problems(spec, choices, {adapter.component_of(n) for n in free}, fmt, stream=stream)
    if stream:
        calibrated = [n for n, s in pinned.items() if s is not None and BACKENDS.get(s.backend).needs_hessian
                      and adapter.component_of(n) in (Component.VISION, Component.PROJECTOR)]
        if calibrated:
            problems.append(f"plan.rules: {len(calibrated)} vision/projector Linears (e.g. {calibrated[0]}) use a "
                            "backend that needs calibration data; a --stream run streams it through the decoder "
                            "blocks only: run without --stream, or give them a data-free backend (rtn)")
    if spec.shape_fallback == "error":
        wanted = [(n, s) for n, s in pinned.items() if s is not None] + [(n, s) for n in free for s in choices]
        bad = [(n, f"({s.label()}): {note} (plan.shape_fallback is 'error')") for n, s in wanted
               if (note := fit_scheme(linears[n].out_features, linears[n].in_features, s, fmt, "error").note)]
        problems += [f"{names} {why}" for names, why in group_by_block(bad)]
    budget = spec.budget_gb
    target = spec.target_avg_bits if spec.planner == "budget" else None
    if (budget is not None or target is not None) and choices and not problems:
        cheapest = {n: _cheapest(fmt, choices, linears[n].out_features, linears[n].in_features, spec.shape_fallback)
                    for n in free}
        if budget is not None:
            mapping = {**{n: fit_scheme(linears[n].out_features, linears[n].in_features, s, fmt,
                                        spec.shape_fallback).scheme for n, s in pinned.items()}, **cheapest}
            smallest = model_size(skeleton.model, adapter, mapping, fmt, dtype_bytes=2).total_bytes
            if smallest > budget * 1e9:
                problems.append(f"plan.budget_gb: {budget} GB ({int(budget * 1e9):,} bytes) is below the smallest "
                                f"size this recipe reaches on this model, {smallest / 1e9:.6f} GB ({smallest:,} bytes, "
                                "every planned Linear at its cheapest scheme)")
        if target is not None and free:
            least = sum(linear_bytes(linears[n].out_features, linears[n].in_features, s, fmt, bias=False)
                        for n, s in cheapest.items())
            numel = sum(linears[n].out_features * linears[n].in_features for n in free)
            if least * 8 > target * numel:
                problems.append(f"plan.target_avg_bits: {target} is below the smallest stored bits per weight this "
                                f"recipe reaches on this model's planned Linears, {least * 8 / numel:.3f} "
                                f"(every one at its cheapest candidate after plan.shape_fallback "
                                f"{spec.shape_fallback!r}, which keeps in full precision what no candidate fits)")
    return problems


def open_skeleton(model: str, *, stream: bool = False) -> LoadedModel:
    """The model's meta-device skeleton (config only), refusing what later loading would refuse."""
    src = Path(resolve(model))
    if src.is_dir():
        if not any(src.glob("*.safetensors")):
            pickles = sorted(p.name for p in src.glob("*.bin")) + sorted(p.name for p in src.glob("*.pt"))
            if pickles or (src / "config.json").is_file():
                raise UserError(f"{src}: no *.safetensors weights" + (f" (found {pickles[:3]})" if pickles else ""),
                                "quantlab reads safetensors only (pickle files can run code): convert the checkpoint "
                                "with transformers' save_pretrained(..., safe_serialization=True)")
    elif stream:
        raise UserError(f"--stream reads a local checkpoint directory's safetensors; {model!r} is not one",
                        "download the model to a directory and pass that directory")
    return load_model(model, weights=False)


def check_out(out: str | Path, *, model: str | None, flag: str = "--out") -> None:
    """Refuse an output location that would put the user's files at risk.

    ``out`` may not be the working directory or one above it, nor the model's directory, inside it or above
    it; an existing file is not a directory.
    """
    o = Path(out).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if o == cwd or cwd.is_relative_to(o):
        raise UserError(f"{flag} {out}: this is the working directory{'' if o == cwd else ' or one above it'} "
                        f"({o}); quantlab writes a directory of its own there",
                        f"pass a new directory, e.g. {flag} runs/NAME")
    if model is not None:
        src = Path(resolve(model)).expanduser()
        if src.exists():
            m = src.resolve() if src.is_dir() else src.resolve().parent
            if o == m or o.is_relative_to(m) or m.is_relative_to(o):
                where = "is" if o == m else ("is inside" if o.is_relative_to(m) else "contains")
                raise UserError(f"{flag} {out} {where} the model directory {m}", f"pass a directory outside "
                                f"the model's, e.g. {flag} runs/NAME")
    if o.exists() and not o.is_dir():
        raise UserError(f"{flag} {out} is a file, not a directory", f"pass a directory for {flag}")


def check_hub_id(repo_id: str) -> None:
    """Refuse a malformed ``--push-to-hub`` id before any work (the upload comes hours later)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        if repo_id.count("/") != 1:
            raise HFValidationError("expected exactly one '/', as in ORG/NAME")
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UserError(f"--push-to-hub {repo_id!r} is not a hub repository id: {err}",
                        "pass ORG/NAME (letters, digits, '-', '_', '.'; at most 96 characters)") from None


def preflight(model: str, recipe: Recipe, *, out: str | Path | None = None, stream: bool = False,
              device: str | None = None, push_to_hub: str | None = None) -> LoadedModel:
    """Every check above; returns the model's skeleton. Raises :class:`UserError` listing all problems."""
    check_device(device)
    if push_to_hub is not None:
        check_hub_id(push_to_hub)
    if out is not None:
        check_out(out, model=model)
    skeleton = open_skeleton(model, stream=stream)
    problems = recipe_problems(recipe, stream=stream)
    if not problems:
        problems = model_problems(skeleton, recipe, stream=stream)
    if problems:
        raise problems_error(f"{recipe.name}: the recipe cannot run on {model}", problems,
                             "fix these keys in the recipe (or with --set); docs/recipes.md lists every key")
    return skeleton
