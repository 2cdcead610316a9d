"""The whole run, stage by stage, in a run directory a user can stop, inspect, edit and resume.

The directory's layout, lock and replacement rules are in :mod:`quantlab.rundir`. Before anything is
written, :func:`quantlab.preflight.preflight` checks the recipe, the model's config and the flags. A stage
re-runs when its fingerprint (the recipe sections and upstream artifacts it depends on) changes; every
later stage re-runs with it, and the run log says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantlab.preflight import preflight
from quantlab.recipe import Recipe
from quantlab.rundir import STAGES, RunDir, locked

log = logging.getLogger(__name__)
__all__ = ["STAGES", "RunDir", "StageContext", "fingerprint", "file_hash", "run_all", "run_log"]


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


@dataclass
class StageContext:
    """What the stages share: the loaded model, its calibration samples, the recipe, the run dir."""

    model_name: str
    recipe: Recipe
    run: RunDir
    progress: bool = True
    _loaded: Any = None
    _samples: Any = None
    say: Callable[[str], None] = print
    device: str | None = None  # where decoder blocks, solvers and evaluation compute (None: the CPU)
    stream: bool = False  # read blocks from the checkpoint one at a time instead of loading the model
    weights: Any = None  # the streamed model's weight source (set when the model is loaded)
    skeleton: Any = None  # the model's meta-device skeleton from the preflight (shapes, names; no weights)

    @property
    def loaded(self):
        if self._loaded is None:
            if self.stream:
                from quantlab.calib.weights import stream_model

                self._loaded, self.weights = stream_model(self.model_name)
            else:
                from quantlab.models import load_model

                self._loaded = load_model(self.model_name)
        return self._loaded

    @property
    def samples(self):
        if self._samples is None:
            from quantlab.calib.data import build_calibration_set

            self._samples = build_calibration_set(self.loaded, self.recipe.calibration)
        return self._samples


class _SayHandler(logging.Handler):
    """Passes log records (warnings: invalidated stages, skipped samples) on to the user's ``say``."""

    def __init__(self, say: Callable[[str], None]):
        super().__init__(logging.WARNING)
        self.say = say

    def emit(self, record: logging.LogRecord) -> None:
        self.say(record.getMessage())


@contextmanager
def run_log(path: Path, say: Callable[[str], None]) -> Iterator[Callable[[str], None]]:
    """Append quantlab's log records (INFO and up) to ``path``; yields ``tell(message)``, which logs a
    message and says it. Warnings are said too; a failure is logged with its traceback."""
    logger = logging.getLogger("quantlab")
    file = logging.FileHandler(path, encoding="utf-8")
    file.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    loud = _SayHandler(say)
    level = logger.level
    logger.addHandler(file)
    logger.addHandler(loud)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    run_logger = logging.getLogger("quantlab.run")

    def tell(message: str) -> None:
        run_logger.info(message)  # INFO: the file only; the user hears it from say
        say(message)

    try:
        yield tell
    except BaseException as err:
        run_logger.exception("the run stopped with an error")
        try:
            err.quantlab_log = str(path)  # the CLI points the user here for the traceback
        except AttributeError:
            pass
        raise
    finally:
        logger.removeHandler(file)
        logger.removeHandler(loud)
        logger.setLevel(level)
        file.close()


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
            written; :class:`quantlab.errors.RunDirBusy` when another process works in ``out``.
    """
    from quantlab import stages

    recipe = Recipe.from_yaml(recipe_path, overrides)
    skeleton = preflight(model, recipe, out=out, stream=stream, device=device, push_to_hub=push_to_hub)
    RunDir.check(out, model, overwrite=overwrite)
    with locked(out), run_log(Path(out) / "run.log", say) as tell:
        run = RunDir.open(out, model, recipe.to_yaml(), overwrite=overwrite)
        env = stages.compute_env(device)
        log.info("quantlab run: model %s, recipe %s (%s), stop after %s, torch %s, %d threads, device %s%s",
                 model, recipe_path, recipe.name, stop_after or "report", env["torch"], env["threads"], env["device"],
                 ", streamed" if stream else "")
        ctx = StageContext(model, recipe, run, progress=progress, say=tell, device=device, stream=stream,
                           skeleton=skeleton)
        return _stages(ctx, stop_after)


def _stages(ctx: StageContext, stop_after: str | None) -> dict[str, Any]:
    from quantlab import stages

    recipe, say = ctx.recipe, ctx.say
    summary: dict[str, Any] = {"run_dir": str(ctx.run.root)}
    say(f"[1/6] calibrate: {recipe.calibration.num_samples} samples (alpha={recipe.calibration.alpha})")
    stats = stages.stage_calibrate(ctx)
    if stop_after == "calibrate":
        return summary
    say(f"[2/6] plan: {recipe.plan.planner}")
    plan = stages.stage_plan(ctx, stats)
    summary["predicted_bytes"] = plan.predicted_bytes
    if stop_after == "plan":
        return summary
    say("[3/6] quantize: block by block")
    results = stages.stage_quantize(ctx, plan)
    say("[4/6] export")
    summary["model_dir"] = str(stages.stage_export(ctx, plan, results))
    if stop_after == "export":
        return summary
    say("[5/6] eval: baseline and quantized")
    summary["eval"] = stages.stage_eval(ctx, ctx.loaded)
    say("[6/6] report")
    summary["report"] = str(stages.stage_report(ctx, plan, results, summary["eval"]))
    say(f"done: {summary['report']}")
    return summary
