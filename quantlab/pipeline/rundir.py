"""The run directory: its paths, its ``state.json`` bookkeeping, its lock, and what may be replaced in it.

    RUN/recipe.yaml        the recipe used (validated copy)
    RUN/state.json         per stage: the fingerprint of what it depended on, and whether it finished
    RUN/stats/             calibration statistics (CalibrationStats)
    RUN/plan.yaml          the plan (editable: a hand edit is picked up by the next stages)
    RUN/quant/block_*.safetensors   per-block quantization results (resume point)
    RUN/model/             the exported checkpoint
    RUN/eval/*.json        baseline and quantized evaluation
    RUN/report.{md,json,png}
    RUN/run.log            every invocation's messages and quantlab's log records, appended, timestamped
    RUN/.quantlab.lock     held (flock) by the process working in the directory; names its pid

Safety rules: only a directory with quantlab's ``state.json`` is a run directory; ``overwrite`` removes
quantlab's own artifacts (the names above) and nothing else; a stage whose inputs changed keeps its old
artifact until the new one is complete (each is replaced atomically), and the evaluation and report of a
model are removed when that model is replaced, so a report never describes another model.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantlab.core.errors import NotOurs, RunDirBusy
from quantlab.core.files import write_file_atomic

log = logging.getLogger(__name__)
STAGES = ("calibrate", "plan", "quantize", "export", "eval", "report")
LOCK_FILE = ".quantlab.lock"
STATE_FILE = "state.json"
LOG_FILE = "run.log"
# Every name quantlab writes at the top of a run directory (run.log is kept by overwrite: it is the history).
ARTIFACTS = ("recipe.yaml", STATE_FILE, "stats", "plan.yaml", "quant", "quant.previous", "model", "eval",
             "report.md", "report.json", "report.png")
REPORT_FILES = ("report.md", "report.json", "report.png")


def _own_temporary(name: str) -> bool:
    """Temporary names quantlab's atomic writers leave after a kill (``.model-xxxx``, ``.state.json.tmp``)."""
    return name.startswith(".") and any(name[1:].startswith(a) for a in ARTIFACTS)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def read_state(root: Path) -> dict[str, Any] | None:
    """``state.json`` of a quantlab run directory, or None when ``root`` is not one."""
    f = root / STATE_FILE
    try:
        state = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and "_model" in state else None


@contextmanager
def locked(root: str | Path) -> Iterator[Path]:
    """Hold ``root``'s lock for the block (created if needed); another holder makes this raise
    :class:`RunDirBusy` naming its pid. The kernel drops the lock when the process dies (``flock``)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise RunDirBusy(f"{root} is in use by another quantlab process (pid {holder})",
                             "wait for it to finish (or stop it), or pass another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield root
    finally:
        os.close(fd)  # closing the descriptor releases the lock


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
    def quant_previous(self) -> Path:
        """Where a finished quantization's blocks wait while a new one (another plan) is under way."""
        return self.root / "quant.previous"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def log(self) -> Path:
        return self.root / LOG_FILE

    def block_file(self, i: int) -> Path:
        return self.quant / f"block_{i:03d}.safetensors"

    @staticmethod
    def check(root: str | Path, model: str, *, overwrite: bool = False) -> None:
        """Refuse a ``root`` that :meth:`open` must not touch (nothing is written).

        A directory that is neither empty nor a quantlab run is refused. A run of another model is refused
        unless ``overwrite`` (or unless none of its stages finished: a failed start is replaced).
        """
        root = Path(root)
        if not root.is_dir():
            return
        state = read_state(root)
        foreign = sorted(p.name for p in root.iterdir() if p.name not in (LOCK_FILE, LOG_FILE))
        if state is None and foreign:
            raise NotOurs(f"{root} exists and is not a quantlab run directory (no quantlab state.json; it holds "
                          f"{', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); quantlab replaces only "
                          "its own runs", "pass a new or empty directory as --out")
        started = state is not None and any(isinstance(v, dict) and v.get("done") for v in state.values())
        if state is not None and state["_model"] != model and started and not overwrite:
            raise NotOurs(f"{root} holds a run of {state['_model']!r}, not {model!r}",
                          "pass another --out, or --overwrite to replace that run")

    @classmethod
    def open(cls, root: str | Path, model: str, recipe_yaml: str, *, overwrite: bool = False) -> RunDir:
        """Create or reopen a run directory (call it holding :func:`locked`); refuses what :meth:`check`
        refuses. ``overwrite`` removes quantlab's artifacts only; other files in the directory stay."""
        root = Path(root)
        cls.check(root, model, overwrite=overwrite)
        root.mkdir(parents=True, exist_ok=True)
        state = read_state(root)
        if state is not None and overwrite:
            kept = [p.name for p in root.iterdir() if p.name not in (*ARTIFACTS, LOCK_FILE, LOG_FILE)
                    and not _own_temporary(p.name)]
            for p in root.iterdir():
                if p.name in ARTIFACTS or _own_temporary(p.name):
                    _remove(p)
            log.info("--overwrite: removed the previous run's artifacts%s",
                     f" (kept files quantlab did not write: {kept})" if kept else "")
            state = None
        run = cls(root, state if state is not None and state["_model"] == model else {})
        run.state["_model"] = model
        write_file_atomic(root / "recipe.yaml", recipe_yaml)
        run.save()
        return run

    def save(self) -> None:
        write_file_atomic(self.root / STATE_FILE, json.dumps(self.state, indent=2, sort_keys=True) + "\n")

    def fresh(self, stage: str, fp: str) -> bool:
        """True when ``stage`` finished with this fingerprint; otherwise mark it and every later stage to be
        redone. Nothing is deleted here: each stage replaces its artifact when the new one is complete."""
        entry = self.state.get(stage, {})
        if entry.get("fingerprint") == fp and entry.get("done"):
            return True
        if entry.get("fingerprint") not in (None, fp):
            log.warning("%s: inputs changed since the last run; redoing %s and every later stage", stage, stage)
            for later in STAGES[STAGES.index(stage):]:
                self.state.pop(later, None)
        self.state[stage] = {"fingerprint": fp, "done": False}
        self.save()
        return False

    def done(self, stage: str, **info: Any) -> None:
        self.state[stage].update(done=True, **info)
        self.save()

    def set_quant_aside(self) -> None:
        """Move finished blocks of another plan to :attr:`quant_previous` (replacing older ones there)."""
        _remove(self.quant_previous)
        self.quant.rename(self.quant_previous)

    def discard_evaluation(self) -> None:
        """Remove eval/ and report.*: called when the model they describe is being replaced."""
        for name in ("eval", *REPORT_FILES):
            _remove(self.root / name)
        for stage in ("eval", "report"):
            self.state.pop(stage, None)
        self.save()
