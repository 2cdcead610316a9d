"""The whole run, stage by stage, in a run directory a user can stop, inspect, edit and resume.

    RUN/recipe.yaml        the recipe used (validated copy)
    RUN/state.json         per stage: the fingerprint of what it depended on, and whether it finished
    RUN/stats/             calibration statistics (CalibrationStats)
    RUN/plan.yaml          the plan (editable: a hand edit is picked up by the next stages)
    RUN/quant/block_*.safetensors   per-block quantization results (resume point)
    RUN/model/             the exported checkpoint
    RUN/eval/*.json        baseline and quantized evaluation
    RUN/report.{md,json,png}
    RUN/run.log            every invocation's messages and quantlab's log records, appended, timestamped

A stage re-runs when its fingerprint (the recipe sections and upstream artifacts it depends on) changes;
everything downstream is invalidated with it, and the run log says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantlab.recipe import Recipe

log = logging.getLogger(__name__)
STAGES = ("calibrate", "plan", "quantize", "export", "eval", "report")


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
class RunDir:
    """Paths of a run directory and its ``state.json`` bookkeeping."""

    root: Path
    state: dict[str, dict] = field(default_factory=dict)

    @property
    def stats(self) -> Path:
        return self.root / "stats"

    @property
    def plan(self) -> Path:
        return self.root / "plan.yaml"

    @property
    def quant(self) -> Path:
        return self.root / "quant"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def block_file(self, i: int) -> Path:
        return self.quant / f"block_{i:03d}.safetensors"

    @classmethod
    def open(cls, root: str | Path, model: str, recipe: Recipe, *, overwrite: bool = False) -> RunDir:
        """Create or reopen a run directory; a different model needs ``overwrite``."""
        root = Path(root)
        state_file = root / "state.json"
        if root.exists() and overwrite:
            shutil.rmtree(root)
        if root.exists() and not state_file.is_file() and any(root.iterdir()):
            raise FileExistsError(f"{root} exists and is not a quantlab run directory; choose another --out "
                                  "or pass --overwrite")
        root.mkdir(parents=True, exist_ok=True)
        run = cls(root, json.loads(state_file.read_text()) if state_file.is_file() else {})
        if run.state.get("_model", model) != model:
            raise FileExistsError(f"{root} holds a run of {run.state['_model']!r}, not {model!r}; "
                                  "pass --overwrite to replace it")
        run.state["_model"] = model
        (root / "recipe.yaml").write_text(recipe.to_yaml())
        run.save()
        return run

    def save(self) -> None:
        tmp = self.root / ".state.json.tmp"
        tmp.write_text(json.dumps(self.state, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.root / "state.json")

    def fresh(self, stage: str, fp: str) -> bool:
        """True when ``stage`` finished with this fingerprint; otherwise invalidate it and what follows."""
        entry = self.state.get(stage, {})
        if entry.get("fingerprint") == fp and entry.get("done"):
            return True
        if entry.get("fingerprint") not in (None, fp):
            log.warning("%s: inputs changed since the last run; redoing %s and every later stage", stage, stage)
            for later in STAGES[STAGES.index(stage):]:
                self.state.pop(later, None)
            self._remove_artifacts(stage)
        self.state[stage] = {"fingerprint": fp, "done": False}
        self.save()
        return False

    def done(self, stage: str, **info: Any) -> None:
        self.state[stage].update(done=True, **info)
        self.save()

    def _remove_artifacts(self, stage: str) -> None:
        paths = {"calibrate": [self.stats], "plan": [self.plan], "quantize": [self.quant],
                 "export": [self.model], "eval": [self.eval]}
        for later in STAGES[STAGES.index(stage):]:
            for p in paths.get(later, []):
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()


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

    def fresh_model(self):
        """Reload the model (after quantization modified the in-memory copy)."""
        self._loaded = None
        return self.loaded

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
    except BaseException:
        run_logger.exception("the run stopped with an error")
        raise
    finally:
        logger.removeHandler(file)
        logger.removeHandler(loud)
        logger.setLevel(level)
        file.close()


def run_all(model: str, recipe_path: str | Path, out: str | Path, *, overwrite: bool = False,
            overrides: dict[str, Any] | None = None, progress: bool = True,
            say: Callable[[str], None] = print, stop_after: str | None = None,
            device: str | None = None, stream: bool = False) -> dict[str, Any]:
    """calibrate -> plan -> quantize -> export -> eval -> report in ``out``; returns a summary.

    ``device`` (``"cuda"``, ``"cuda:1"``, ...) is where calibration, the planner's measurements, the
    solvers and evaluation compute; the model is held in host memory and moved one block at a time.
    It is a property of the machine, not of the recipe: a run resumed on another device continues.
    ``stream``: calibrate, quantize and export read the decoder and vision blocks from the checkpoint's
    safetensors one at a time (a local directory; same results); evaluation loads the models it compares.
    """
    from quantlab import stages
    from quantlab.device import resolve_device

    resolve_device(device)  # a bad device fails before anything is loaded or written
    recipe = Recipe.from_yaml(recipe_path, overrides)
    run = RunDir.open(out, model, recipe, overwrite=overwrite)
    with run_log(run.root / "run.log", say) as tell:
        env = stages.compute_env(device)
        log.info("quantlab run: model %s, recipe %s (%s), stop after %s, torch %s, %d threads, device %s%s",
                 model, recipe_path, recipe.name, stop_after or "report", env["torch"], env["threads"], env["device"],
                 ", streamed" if stream else "")
        ctx = StageContext(model, recipe, run, progress=progress, say=tell, device=device, stream=stream)
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
