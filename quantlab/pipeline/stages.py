"""The six stages over a run directory; each loads its inputs from artifacts and writes its own.

Every stage is resumable: it is skipped when its fingerprint matches a finished run, and ``quantize``
additionally resumes from the last finished block.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import torch

from quantlab.calib.artifact import CalibrationStats, load_token_importance
from quantlab.calib.collect import CollectOptions, calibrate
from quantlab.calib.data import build_calibration_set
from quantlab.calib.plot import plot_entropy
from quantlab.core.errors import UserError, problems_error
from quantlab.eval.embeddings import (
    EmbeddingCheck,
    compare_embeddings,
    held_out_images,
    image_embeddings,
)
from quantlab.eval.engines import EngineSession, get_engine, open_engine
from quantlab.eval.memory import memory_report
from quantlab.eval.report import ModelSize, StatsEntropy, compare, write_report
from quantlab.eval.runner import EvalReport, evaluate
from quantlab.export.api import export
from quantlab.export.card import write_model_card
from quantlab.export.formats import get_format
from quantlab.export.open import open_model
from quantlab.models.adapter import Component
from quantlab.models.load import load_dtype, load_model, resolve
from quantlab.pipeline.context import StageContext, file_hash, fingerprint
from quantlab.pipeline.preflight import (
    asks_measured_weights,
    asks_token_importance,
    preflight,
)
from quantlab.plan.cost import model_size
from quantlab.plan.fit import plan_problems
from quantlab.plan.make import PLANNERS, make_plan
from quantlab.plan.plan import Plan
from quantlab.plan.summary import block_rows, totals
from quantlab.quant.apply import quantize, saved_results
from quantlab.quant.results_io import load_results, read_input_scales, save_results
from quantlab.recipe import Recipe


def stats_options(recipe):
    """The calibration collector's options for a recipe (Hessians whenever the budget planner needs them)."""
    s = recipe.stats
    planner = PLANNERS.get(recipe.plan.planner)
    hessians = s.hessians or planner.measures(recipe.plan)
    vision = s.vision or (planner.needs_stats and recipe.plan.components != ["decoder"])
    return CollectOptions(entropy_k=s.entropy_k, max_tokens=s.entropy_max_tokens, entropy_on=s.hook,
                          linear_max_tokens=min(512, s.entropy_max_tokens), hessians=hessians,
                          modality_gradients=asks_measured_weights(recipe),
                          token_importance=asks_token_importance(recipe), vision=vision)


def calibrate_fp(ctx: StageContext) -> str:
    # a streamed model computing in another dtype than the loader's (float32 on a CPU without bf16) gets
    # other statistics; runs in the loader's dtype keep the fingerprints they had
    compute = ctx.compute_dtype
    other = [str(compute)] if compute != load_dtype(ctx.model_name) else []
    return fingerprint(ctx.model_name, ctx.recipe.calibration.model_dump(mode="json"),
                       stats_options(ctx.recipe).to_dict(), *other)


def stage_calibrate(ctx: StageContext):
    """Calibration statistics (``RUN/stats``)."""
    run = ctx.run
    if run.fresh("calibrate", calibrate_fp(ctx)) and run.stats.is_dir():
        ctx.say("calibrate: up to date, loading stats/")
        return CalibrationStats.load(run.stats)
    stats = calibrate(ctx.loaded, ctx.samples, options=stats_options(ctx.recipe), progress=ctx.progress,
                      device=ctx.device, weights=ctx.weights)
    stats.save(run.stats, overwrite=True)

    plot_entropy(stats, run.stats / "entropy.png")
    run.done("calibrate", samples=len(ctx.samples.samples), image_samples=ctx.samples.n_image)
    return stats


def stage_plan(ctx: StageContext, stats):
    """The plan (``RUN/plan.yaml``); a hand-edited plan.yaml is kept as long as its inputs are unchanged."""
    run = ctx.run
    fp = fingerprint(calibrate_fp(ctx), ctx.recipe.plan.model_dump(mode="json"), ctx.recipe.export.format)
    if run.fresh("plan", fp) and run.plan.is_file():
        ctx.say("plan: up to date, loading plan.yaml")
        plan = Plan.from_yaml(run.plan)
        # a hand edit is checked before any later artifact is touched
        check_plan(plan, ctx.skeleton or ctx.loaded, run.plan)
        return plan
    plan = make_plan(ctx.loaded, stats, ctx.recipe.plan, export_format=ctx.recipe.export.format,
                     samples=ctx.samples.samples, progress=ctx.progress, device=ctx.device)
    plan.to_yaml(run.plan, overwrite=True)
    run.done("plan", predicted_bytes=plan.predicted_bytes, format=plan.format)
    return plan


def check_plan(plan, loaded, source: Path) -> None:
    """Refuse a plan (e.g. hand-edited) that names modules this model lacks or schemes they cannot take.

    Raises:
        UserError: every bad module, with the reason.
    """
    from torch import nn


    adapter = loaded.adapter
    linears = {n: m for n, m in loaded.model.named_modules() if isinstance(m, nn.Linear)}
    problems = plan_problems(plan.layers, linears, plan.format, {n: adapter.component_of(n) for n in linears})
    if problems:
        raise problems_error(f"{source}: the plan cannot be applied to {loaded.source}", problems,
                             f"edit {source} (docs/recipes.md lists each backend's bits and options), or delete it "
                             "to have it made again from the recipe")


def plan_for_model(model: str, recipe_path, overrides: dict | None = None, *, stats_dir=None,
                   say=print, device: str | None = None):
    """``quantlab plan MODEL``: a plan without a run directory; returns ``(loaded, plan, stats)``.

    Needs no weights for the uniform planner, or for luq (fixed k / average bits / budget) given saved
    statistics: ``MODEL`` may then be a config.json of a real architecture (meta-device skeleton). The
    budget planner and LUQ's KL search measure on calibration data, so they load and calibrate the model.
    """
    recipe = Recipe.from_yaml(recipe_path, overrides)
    preflight(model, recipe, device=device)
    spec = recipe.plan
    stats = CalibrationStats.load(stats_dir) if stats_dir is not None else None
    planner = PLANNERS.get(spec.planner)
    measures = planner.measures(spec)
    if not measures and not asks_measured_weights(recipe) and (not planner.needs_stats or stats is not None):
        loaded, samples = load_model(model, weights=False), ()
    else:
        loaded = load_model(model)
        calib = build_calibration_set(loaded, recipe.calibration)
        samples = calib.samples
        if stats is None:
            say(f"plan: calibrating {model} ({len(samples)} samples) for the {spec.planner} planner")
            stats = calibrate(loaded, calib, options=stats_options(recipe), device=device)
    plan = make_plan(loaded, stats, spec, export_format=recipe.export.format, samples=samples, device=device)
    return loaded, plan, stats


def compute_env(device: str | None) -> dict[str, object]:
    """What decides the exact bits of a float computation here: torch's version, threads and device."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device or "cpu")}


def resume_warning(recorded: dict | None, current: dict) -> str | None:
    """Why a resumed quantization will not be byte-identical to an uninterrupted one, or None."""
    if recorded is None or recorded == current:
        return None
    diff = ", ".join(f"{k} {recorded.get(k)} -> {v}" for k, v in current.items() if recorded.get(k) != v)
    return (f"quantize: the finished blocks were computed with a different setup ({diff}); the result is a "
            "valid quantization but not byte-identical to an uninterrupted run (reduction order changes)")


def stage_quantize(ctx: StageContext, plan):
    """Quantize block by block; finished blocks are kept in ``RUN/quant`` and reused after a kill.

    A resumed run is byte-identical to an uninterrupted one when torch, the thread count and the device
    are the same (``RUN/quant/compute.json`` records them; a difference is reported).
    """
    run = ctx.run
    fp = fingerprint(file_hash(run.plan), ctx.recipe.calibration.model_dump(mode="json"), calibrate_fp(ctx))
    previous = run.state.get("quantize", {}).get("fingerprint")
    finished = run.fresh("quantize", fp)
    marker = run.quant / "fingerprint"
    blocks_fp = marker.read_text().strip() if marker.is_file() else previous
    if run.quant.is_dir() and blocks_fp != fp:
        run.set_quant_aside()  # blocks of another plan: kept until this quantization is complete
    run.quant.mkdir(exist_ok=True)
    marker.write_text(fp + "\n")

    def load_block(i: int):
        f = run.block_file(i)
        return load_results(f) if f.is_file() else None

    n_saved = sum(1 for _ in run.quant.glob("block_*.safetensors"))
    env_file, env = run.quant / "compute.json", compute_env(ctx.device)
    if n_saved and not finished:
        ctx.say(f"quantize: resuming, {n_saved} block(s) already done")
        recorded = json.loads(env_file.read_text()) if env_file.is_file() else None
        warning = resume_warning(recorded, env)
        if warning:
            ctx.say(warning)
    elif not n_saved:
        env_file.write_text(json.dumps(env) + "\n")
    # Block files keep codes and scales only (the dense weights are recomputed bit for bit on resume);
    # a streamed run reads them back for the export instead of holding every block's codes.
    reread = lambda i: load_results(run.block_file(i), dequantized=False)  # noqa: E731
    rescales = lambda i: read_input_scales(run.block_file(i))  # noqa: E731  (AWQ's, for the export's folds)
    n_blocks = len(ctx.loaded.adapter.blocks(ctx.loaded.model))
    if finished and ctx.stream and all(run.block_file(i).is_file() for i in range(n_blocks)):
        ctx.say("quantize: up to date, reading quant/ block by block")
        return saved_results(ctx.loaded, plan.layers, reread, rescales)  # no pass: a streamed model holds no weights
    by_grad = any(s is not None and s.args.get("token_weight") for s in plan.layers.values())
    results = quantize(ctx.loaded, plan.layers, ctx.samples.samples, progress=ctx.progress,
                       token_importance=load_token_importance(run.stats) if by_grad else None,
                       load_block=load_block,
                       save_block=lambda i, r: save_results(run.block_file(i), r, with_dequantized=False),
                       reread_block=reread, reread_scales=rescales,
                       device=ctx.device, weights=ctx.weights)
    run.done("quantize", modules=len(results))
    shutil.rmtree(run.quant_previous, ignore_errors=True)
    return results


def stage_export(ctx: StageContext, plan, results) -> Path:
    """Export in the plan's format (``auto`` = compressed-tensors, or native when BiLLM is present)."""
    fmt = ctx.recipe.export.format
    if fmt == "auto":
        fmt = plan.format
    run = ctx.run
    fp = fingerprint(ctx.run.state["quantize"]["fingerprint"], fmt)
    if run.fresh("export", fp) and run.model.is_dir():
        ctx.say("export: up to date")
        return run.model
    if fmt != ctx.recipe.export.format:
        ctx.say(f"export: format auto -> {fmt}" + ("" if get_format(fmt).uniform_only else
                                                   " (the plan has codes no third-party format holds)"))
    # The old model stays until the new one is complete; its evaluation and report go as it is replaced.
    export(ctx.loaded, results, plan, run.model, fmt, recipe=ctx.recipe, base_model=ctx.model_name,
           weights=ctx.weights, overwrite=True, before_replace=run.discard_evaluation)
    run.done("export", format=fmt)
    return run.model


def _missing_loader(fmt: str) -> str | None:
    """What this process lacks to load a ``fmt`` checkpoint (None: it loads here)."""
    spec = get_format(fmt)
    if not spec.in_process:
        return "an external engine (quantlab opens it only through eval.engine)"
    package = spec.loader_package
    return package if package is not None and importlib.util.find_spec(package) is None else None


def _exported_or(ctx: StageContext, fake_quant):
    """The exported checkpoint as a loader opens it, or (GPTQ without gptqmodel here) the fake-quant model."""
    fmt = ctx.run.state["export"].get("format")
    package = _missing_loader(fmt)
    if package is not None:
        if ctx.stream:
            raise UserError(f"eval: a {fmt} checkpoint needs {package} to load, and a streamed run has no "
                            f"in-memory model to evaluate instead", f"install {package} or set eval.tasks: []")
        ctx.say(f"eval: a {fmt} checkpoint needs {package} to load; evaluating the in-memory fake-quant "
                "model instead (it matches the export's dequantized weights)")
        return fake_quant
    return open_model(ctx.run.model, dtype=load_dtype(ctx.model_name))  # as the base model is evaluated


VISION_PARTS = (Component.VISION, Component.PROJECTOR)


def stage_vision_check(ctx: StageContext, plan) -> EmbeddingCheck | None:
    """Compare the quantized model's image embeddings with full precision on held-out images when the plan
    quantizes vision or projector Linears (``RUN/eval/vision_check.json``; quantlab.eval.embeddings).

    Raises:
        UserError: the mean cosine is below ``eval.vision_check.min_cosine`` (after the export is written).
    """
    adapter = ctx.loaded.adapter
    touched = [n for n, s in plan.layers.items() if s is not None and adapter.component_of(n) in VISION_PARTS]
    if not touched:
        return None
    spec = ctx.recipe.eval.vision_check
    if ctx.stream:
        ctx.say("vision check: not measured in a streamed run (it would load the base model whole)")
        return None
    run = ctx.run
    fp = fingerprint(run.state["export"]["fingerprint"], spec.model_dump(mode="json"),
                     ctx.recipe.calibration.model_dump(mode="json"))
    file = run.eval / "vision_check.json"
    recorded = json.loads(file.read_text()) if file.is_file() else {}
    if recorded.get("fingerprint") == fp:
        check = EmbeddingCheck(**{k: recorded[k] for k in EmbeddingCheck.__dataclass_fields__})
    else:
        records = held_out_images(ctx.recipe.calibration, spec.images)
        if not records:
            ctx.say("vision check: the calibration image sources hold no image past calibration's; not measured")
            return None
        fp_embeddings = image_embeddings(load_model(ctx.model_name), records)
        quantized = image_embeddings(_exported_or(ctx, ctx.loaded), records)
        check = compare_embeddings(fp_embeddings, quantized, spec.min_cosine, n_images=len(records))
        run.eval.mkdir(exist_ok=True)
        file.write_text(json.dumps({"fingerprint": fp, **check.to_dict()}, indent=2) + "\n")
    ctx.say(f"vision check: {len(touched)} vision/projector Linears quantized; image embeddings vs fp on "
            f"{check.n_images} held-out images: cosine mean {check.cosine_mean:.4f}, min {check.cosine_min:.4f}, "
            f"relative error {check.rel_error:.4f}")
    if not check.passed:
        raise UserError(f"eval.vision_check.min_cosine: the quantized image embeddings' mean cosine to full "
                        f"precision is {check.cosine_mean:.4f} on {check.n_images} held-out images, below "
                        f"{spec.min_cosine} (the export is in {run.model}; {file} has the measurement)",
                        "keep the vision tower at more bits (plan.rules: component:vision), or lower "
                        "eval.vision_check.min_cosine")
    return check


def stage_eval(ctx: StageContext, quantized_loaded) -> dict:
    """Evaluate the base model and the exported quantized checkpoint (loaded back) on the recipe's tasks."""
    run = ctx.run
    spec = ctx.recipe.eval
    fp = fingerprint(run.state["export"]["fingerprint"], spec.model_dump(mode="json"))
    files = {k: run.eval / f"{k}.json" for k in ("baseline", "quantized")}
    if run.fresh("eval", fp) and all(f.is_file() for f in files.values()):
        return {k: EvalReport.load_json(f) for k, f in files.items()}
    run.eval.mkdir(exist_ok=True)
    out = {}
    engine = get_engine(spec.engine)
    with contextlib.ExitStack() as stack:
        # one engine child for both checkpoints where the engine can (vLLM's start-up is paid once)
        session = stack.enter_context(EngineSession(spec.engine)) if engine.sessions and spec.tasks else None
        for key in ("quantized", "baseline"):
            if not spec.tasks:  # nothing to evaluate: load nothing (a streamed run's baseline may not fit)
                out[key] = EvalReport(model=key, seed=0, limit=spec.limit, batch_size=spec.batch_size,
                                      max_new_tokens=0, tasks={})
                out[key].save_json(files[key])
                continue
            if not engine.in_process and (key == "quantized" or engine.serves_base):  # it loads the checkpoint
                loaded = open_engine(spec.engine, ctx.run.model if key == "quantized" else ctx.model_name,
                                     options=spec.engine_options, session=session)
            else:
                loaded = _exported_or(ctx, quantized_loaded) if key == "quantized" else load_model(ctx.model_name)
                if ctx.device is not None:
                    loaded.model.to(ctx.device)  # generation runs whole models: they must fit on the device
            out[key] = evaluate(loaded, spec.tasks, data_dir=spec.data_dir, limit=spec.limit,
                                batch_size=spec.batch_size, progress=ctx.progress)
            out[key].save_json(files[key])
    run.done("eval")
    return out


def stage_report(ctx: StageContext, plan, results, evals: dict) -> Path:
    """report.md / report.json / report.png: accuracy and memory, baseline vs quantized."""
    run = ctx.run
    run.fresh("report", fingerprint(run.state["eval"]["fingerprint"]))
    base_dir = Path(resolve(ctx.model_name))
    # Measuring the baseline's run-time memory loads it whole: not for a streamed run, or a run that evaluates nothing
    measure_base = base_dir.is_dir() and not ctx.stream and bool(ctx.recipe.eval.tasks)
    model, adapter = ctx.loaded.model, ctx.loaded.adapter
    base_size = model_size(model, adapter, {}, plan.format, dtype_bytes=2)
    quant_size = model_size(model, adapter, plan.layers, plan.format, dtype_bytes=2)
    base_bytes = base_size.total_bytes
    fmt = run.state["export"]["format"]
    missing = _missing_loader(fmt)
    # nor the quantized model's in a streamed run: a loader may hold it decompressed (18 GB at 7B in transformers)
    note = (f"loading a {fmt} checkpoint here needs {missing}" if missing is not None else
            "not measured in a streamed run (it would load the whole model)" if ctx.stream else None)
    memory = {
        "baseline": memory_report("baseline (fp16)", predicted=base_bytes,
                                  directory=base_dir if base_dir.is_dir() else None,
                                  runtime_source=base_dir if measure_base else None, device=ctx.device),
        "quantized": memory_report(
            f"quantized ({fmt})", predicted=plan.predicted_bytes, directory=run.model,
            runtime_source=run.model if note is None else None, device=ctx.device, runtime_note=note),
    }
    sizes = {"baseline": ModelSize(base_bytes, base_size.decoder_linear_bytes, base_size.avg_bits),
             "quantized": ModelSize(plan.predicted_bytes, quant_size.decoder_linear_bytes, quant_size.avg_bits)}
    entropy = StatsEntropy.load(run.stats)  # summary.json only: the Hessians in stats.safetensors are not read
    comparison = compare(evals["baseline"], evals["quantized"], memory, fallbacks=plan.info.get("fallbacks"),
                         sizes=sizes, totals=totals(ctx.loaded, plan), blocks=block_rows(ctx.loaded, plan, entropy))
    comparison = dataclasses.replace(comparison, stage_memory={
        stage: {"forecast_bytes": entry.get("forecast_host_bytes"), "peak_bytes": entry["peak_rss_bytes"]}
        for stage in ("calibrate", "plan", "quantize", "export", "eval")
        if "peak_rss_bytes" in (entry := run.state.get(stage, {}))})
    check_file = run.eval / "vision_check.json"
    if check_file.is_file():
        check = json.loads(check_file.read_text())
        comparison = dataclasses.replace(comparison, vision_check={k: v for k, v in check.items() if k != "fingerprint"})
    paths = write_report(run.root, comparison)
    scores = {k: {"task": t, "accuracy": r.score} for k, e in evals.items() for t, r in e.tasks.items()}
    write_model_card(run.model, ctx.model_name, ctx.recipe, plan, run.state["export"]["format"],
                     ctx.loaded.adapter, eval_results=scores)
    run.done("report")
    return paths["md"]
