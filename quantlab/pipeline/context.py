"""What the stages share: the run's context (model, samples, recipe, run directory), fingerprints, the run log."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from quantlab.calib.data import build_calibration_set
from quantlab.calib.weights import stream_dtype, stream_model
from quantlab.models.load import load_dtype, load_model
from quantlab.pipeline.rundir import RunDir
from quantlab.recipe import Recipe


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
    forecast: dict = field(default_factory=dict)  # stage -> its memory forecast (quantlab.pipeline.forecast)

    @cached_property
    def compute_dtype(self) -> torch.dtype:
        """What the stages compute in: the loader's dtype, or a streamed model's :func:`stream_dtype`
        (read once: every stage's fingerprint asks)."""
        return stream_dtype(self.model_name, self.device) if self.stream else load_dtype(self.model_name)

    @property
    def loaded(self):
        if self._loaded is None:
            if self.stream:
                self._loaded, self.weights = stream_model(self.model_name, device=self.device)
            else:
                self._loaded = load_model(self.model_name)
        return self._loaded

    @property
    def samples(self):
        if self._samples is None:
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
