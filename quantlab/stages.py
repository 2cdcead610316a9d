"""The six stages over a run directory; each loads its inputs from artifacts and writes its own.

Every stage is resumable: it is skipped when its fingerprint matches a finished run, and ``quantize``
additionally resumes from the last finished block.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from quantlab.pipeline import StageContext, file_hash, fingerprint


def stats_options(recipe):
    """The calibration collector's options for a recipe (Hessians whenever the budget planner needs them)."""
    from quantlab.calib.collect import CollectOptions

    s = recipe.stats
    hessians = s.hessians or recipe.plan.planner == "budget"
    return CollectOptions(entropy_k=s.entropy_k, max_tokens=s.entropy_max_tokens, entropy_on=s.hook,
                          linear_max_tokens=min(512, s.entropy_max_tokens), hessians=hessians)


def calibrate_fp(ctx: StageContext) -> str:
    return fingerprint(ctx.model_name, ctx.recipe.calibration.model_dump(mode="json"),
                       stats_options(ctx.recipe).to_dict())


def stage_calibrate(ctx: StageContext):
    """Calibration statistics (``RUN/stats``)."""
    from quantlab.calib.artifact import CalibrationStats
    from quantlab.calib.collect import calibrate

    run = ctx.run
    if run.fresh("calibrate", calibrate_fp(ctx)) and run.stats.is_dir():
        ctx.say("calibrate: up to date, loading stats/")
        return CalibrationStats.load(run.stats)
    stats = calibrate(ctx.loaded, ctx.samples, options=stats_options(ctx.recipe), progress=ctx.progress)
    stats.save(run.stats, overwrite=True)
    from quantlab.calib.plot import plot_entropy

    plot_entropy(stats, run.stats / "entropy.png")
    run.done("calibrate", samples=len(ctx.samples.samples), image_samples=ctx.samples.n_image)
    return stats


def stage_plan(ctx: StageContext, stats):
    """The plan (``RUN/plan.yaml``); a hand-edited plan.yaml is kept as long as its inputs are unchanged."""
    from quantlab.plan.make import make_plan
    from quantlab.plan.plan import Plan

    run = ctx.run
    fp = fingerprint(calibrate_fp(ctx), ctx.recipe.plan.model_dump(mode="json"), ctx.recipe.export.format)
    if run.fresh("plan", fp) and run.plan.is_file():
        ctx.say("plan: up to date, loading plan.yaml")
        return Plan.from_yaml(run.plan)
    plan = make_plan(ctx.loaded, stats, ctx.recipe.plan, export_format=ctx.recipe.export.format,
                     samples=ctx.samples.samples, progress=ctx.progress)
    plan.to_yaml(run.plan, overwrite=True)
    run.done("plan", predicted_bytes=plan.predicted_bytes, format=plan.format)
    return plan


def stage_quantize(ctx: StageContext, plan):
    """Quantize block by block; finished blocks are kept in ``RUN/quant`` and reused after a kill."""
    from quantlab.apply import quantize
    from quantlab.results_io import load_results, save_results

    run = ctx.run
    fp = fingerprint(file_hash(run.plan), ctx.recipe.calibration.model_dump(mode="json"), calibrate_fp(ctx))
    finished = run.fresh("quantize", fp)
    run.quant.mkdir(exist_ok=True)

    def load_block(i: int):
        f = run.block_file(i)
        return load_results(f) if f.is_file() else None

    n_saved = sum(1 for _ in run.quant.glob("block_*.safetensors"))
    if n_saved and not finished:
        ctx.say(f"quantize: resuming, {n_saved} block(s) already done")
    results = quantize(ctx.loaded, plan.layers, ctx.samples.samples, progress=ctx.progress,
                       load_block=load_block, save_block=lambda i, r: save_results(run.block_file(i), r))
    run.done("quantize", modules=len(results))
    return results


def stage_export(ctx: StageContext, plan, results) -> Path:
    """Export in the plan's format (``auto`` = compressed-tensors, or native when BiLLM is present)."""
    from quantlab.export.compressed_tensors import write_compressed_tensors
    from quantlab.export.gptq import write_gptq
    from quantlab.export.io import write_dir_atomic
    from quantlab.export.native import write_native

    writers = {"compressed-tensors": write_compressed_tensors, "gptq": write_gptq, "native": write_native}
    fmt = ctx.recipe.export.format
    if fmt == "auto":
        fmt = plan.format
    elif fmt != "native" and any(r.backend == "billm" for r in results.values()):
        bad = sorted(n for n, r in results.items() if r.backend == "billm")
        raise ValueError(f"export format {fmt!r} cannot hold BiLLM-binarized layers {bad[:3]}...; "
                         "use export.format: native (or auto)")
    run = ctx.run
    fp = fingerprint(ctx.run.state["quantize"]["fingerprint"], fmt)
    if run.fresh("export", fp) and run.model.is_dir():
        ctx.say("export: up to date")
        return run.model
    if fmt == "native" and ctx.recipe.export.format == "auto":
        ctx.say("export: the plan has BiLLM layers, which no third-party format holds: writing the native format")
    write_dir_atomic(run.model, lambda d: writers[fmt](ctx.loaded, results, d), overwrite=True)
    from quantlab.export.card import write_model_card

    write_model_card(run.model, ctx.model_name, ctx.recipe, plan, fmt)
    (run.model / "recipe.yaml").write_text(ctx.recipe.to_yaml())
    plan.to_yaml(run.model / "plan.yaml", overwrite=True)
    run.done("export", format=fmt)
    return run.model


def stage_eval(ctx: StageContext, quantized_loaded) -> dict:
    """Evaluate the base model and the quantized model on the recipe's tasks."""
    from quantlab.eval.shapes_eval import evaluate_shapes

    run = ctx.run
    spec = ctx.recipe.eval
    fp = fingerprint(run.state["export"]["fingerprint"], spec.model_dump(mode="json"))
    out = {}
    if run.fresh("eval", fp) and (run.eval / "quantized.json").is_file():
        return {k: json.loads((run.eval / f"{k}.json").read_text()) for k in ("baseline", "quantized")}
    run.eval.mkdir(exist_ok=True)
    from quantlab.models import load_model

    for key, loaded in (("quantized", quantized_loaded), ("baseline", None)):
        loaded = loaded or load_model(ctx.model_name)
        with torch.no_grad():
            out[key] = evaluate_shapes(loaded, n=spec.limit, batch_size=spec.batch_size)
        (run.eval / f"{key}.json").write_text(json.dumps(out[key], indent=2) + "\n")
    run.done("eval")
    return out


def stage_report(ctx: StageContext, plan, results, evals: dict) -> Path:
    """report.md / report.json: accuracy baseline vs quantized, memory predicted vs on disk."""
    from quantlab.export.card import write_model_card

    run = ctx.run
    run.fresh("report", fingerprint(run.state["eval"]["fingerprint"]))
    disk = sum(f.stat().st_size for f in run.model.glob("*.safetensors"))
    bits = [r.bits_per_weight for r in results.values()]
    report = {
        "model": ctx.model_name, "recipe": ctx.recipe.name, "format": run.state["export"]["format"],
        "predicted_bytes": plan.predicted_bytes, "disk_bytes": disk,
        "mean_bits_per_weight_quantized_linears": sum(bits) / max(len(bits), 1),
        "accuracy": {k: v["accuracy"] for k, v in evals.items()},
        "per_type": {k: v["per_type"] for k, v in evals.items()},
    }
    (run.root / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# quantlab report: {ctx.model_name} / {ctx.recipe.name}", "",
             f"- format: {report['format']}", f"- predicted size: {plan.predicted_bytes:,} bytes",
             f"- on disk (safetensors files): {disk:,} bytes", "",
             "| question type | baseline | quantized | delta |", "|---|---|---|---|"]
    for t in evals["baseline"]["per_type"]:
        b, q = evals["baseline"]["per_type"][t], evals["quantized"]["per_type"].get(t, float("nan"))
        lines.append(f"| {t} | {b:.3f} | {q:.3f} | {q - b:+.3f} |")
    b, q = evals["baseline"]["accuracy"], evals["quantized"]["accuracy"]
    lines.append(f"| **overall** | **{b:.3f}** | **{q:.3f}** | **{q - b:+.3f}** |")
    (run.root / "report.md").write_text("\n".join(lines) + "\n")
    write_model_card(run.model, ctx.model_name, ctx.recipe, plan, report["format"], eval_results=evals)
    run.done("report")
    return run.root / "report.md"
