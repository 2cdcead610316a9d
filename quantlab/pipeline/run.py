"""The whole run, stage by stage, in a run directory a user can stop, inspect, edit and resume.

The directory's layout, lock and replacement rules are in :mod:`quantlab.pipeline.rundir`. Before anything is
written, :func:`quantlab.pipeline.preflight.preflight` checks the recipe, the model's config and the flags. A stage
re-runs when its fingerprint (the recipe sections and upstream artifacts it depends on) changes; every
later stage re-runs with it, and the run log says so.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from quantlab.core.host_memory import map_large_allocations, measured_peak

from quantlab.pipeline import stages
from quantlab.pipeline.context import StageContext, run_log
from quantlab.pipeline.forecast import check_forecast, format_forecast, host_budget
from quantlab.pipeline.preflight import preflight
from quantlab.pipeline.rundir import RunDir, locked
from quantlab.recipe import Recipe

log = logging.getLogger(__name__)


def run_all(model: str, recipe_path: str | Path, out: str | Path, *, overwrite: bool = False,
            overrides: dict[str, Any] | None = None, progress: bool = True,
            say: Callable[[str], None] = print, stop_after: str | None = None,
            device: str | None = None, stream: bool = False, push_to_hub: str | None = None) -> dict[str, Any]:
    """calibrate -> plan -> quantize -> export -> eval -> report in ``out``; returns a summary.

    ``device`` (``"cuda"``, ``"cuda:1"``, ...) is where calibration, the planner's measurements, the
    solvers and evaluation compute; the model is held in host memory and moved one block at a time.
    It is a property of the machine, not of the recipe: a run resumed on another device continues.
    ``stream``: calibrate, quantize and export read the decoder and vision blocks from the checkpoint's
    safetensors one at a time (a local directory; same results); evaluation loads the models it compares.
    ``push_to_hub``: only checked here (a malformed id fails before any work); the CLI uploads.

    Raises:
        UserError: anything wrong with the recipe, the model, the flags or ``out``, before anything is
            written; :class:`quantlab.core.errors.RunDirBusy` when another process works in ``out``.
    """
    map_large_allocations()  # freed blocks and activations go back to the OS (see host_memory)
    recipe = Recipe.from_yaml(recipe_path, overrides)
    skeleton = preflight(model, recipe, out=out, stream=stream, device=device, push_to_hub=push_to_hub)
    forecasts = check_forecast(skeleton, model, recipe, stream=stream, device=device)
    RunDir.check(out, model, overwrite=overwrite)
    with locked(out), run_log(Path(out) / "run.log", say) as tell:
        run = RunDir.open(out, model, recipe.to_yaml(), overwrite=overwrite)
        log.info(format_forecast(forecasts, host_budget()))
        env = stages.compute_env(device)
        ctx = StageContext(model, recipe, run, progress=progress, say=tell, device=device, stream=stream,
                           skeleton=skeleton, forecast={f.stage: f for f in forecasts})
        log.info("quantlab run: model %s, recipe %s (%s), stop after %s, torch %s, %d threads, device %s%s, "
                 "computing in %s", model, recipe_path, recipe.name, stop_after or "report", env["torch"],
                 env["threads"], env["device"], ", streamed" if stream else "",
                 str(ctx.compute_dtype).removeprefix("torch."))
        return _stages(ctx, stop_after)


@contextmanager
def _peak_of(ctx: StageContext, stage: str, summary: dict[str, Any]) -> Iterator[None]:
    """Measure the stage's peak host memory (this process) into its ``state.json`` entry, beside its forecast,
    and the run log; a stage that was up to date (its entry unchanged) records nothing."""
    before = json.dumps(ctx.run.state.get(stage), sort_keys=True)
    with measured_peak() as mem:
        yield
    entry = ctx.run.state.get(stage)
    if mem["peak"] is None or entry is None or json.dumps(entry, sort_keys=True) == before:
        return
    entry["peak_rss_bytes"] = mem["peak"]
    if stage in ctx.forecast:
        entry["forecast_host_bytes"] = ctx.forecast[stage].host
    ctx.run.save()
    summary.setdefault("peak_rss_bytes", {})[stage] = mem["peak"]
    log.info("%s: peak host memory %.2f GiB (this process; %.2f GiB at its start)", stage, mem["peak"] / 2**30,
             (mem["start"] or 0) / 2**30)


def _stages(ctx: StageContext, stop_after: str | None) -> dict[str, Any]:
    recipe, say = ctx.recipe, ctx.say
    summary: dict[str, Any] = {"run_dir": str(ctx.run.root)}
    say(f"[1/6] calibrate: {recipe.calibration.num_samples} samples (alpha={recipe.calibration.alpha})")
    with _peak_of(ctx, "calibrate", summary):
        stats = stages.stage_calibrate(ctx)
    if stop_after == "calibrate":
        return summary
    say(f"[2/6] plan: {recipe.plan.planner}")
    with _peak_of(ctx, "plan", summary):
        plan = stages.stage_plan(ctx, stats)
    summary["predicted_bytes"] = plan.predicted_bytes
    if stop_after == "plan":
        return summary
    say("[3/6] quantize: block by block")
    with _peak_of(ctx, "quantize", summary):
        results = stages.stage_quantize(ctx, plan)
    say("[4/6] export")
    with _peak_of(ctx, "export", summary):
        summary["model_dir"] = str(stages.stage_export(ctx, plan, results))
    if stop_after == "export":
        return summary
    say("[5/6] eval: baseline and quantized")
    with _peak_of(ctx, "eval", summary):
        check = stages.stage_vision_check(ctx, plan)
        if check is not None:
            summary["vision_check"] = check.to_dict()
        summary["eval"] = stages.stage_eval(ctx, ctx.loaded)
    say("[6/6] report")
    summary["report"] = str(stages.stage_report(ctx, plan, results, summary["eval"]))
    say(f"done: {summary['report']}")
    return summary
