"""Evaluate a loaded VLM on registered tasks: batched greedy generation, per-item scores, aggregates.

Works the same for a base model, quantlab's in-memory quantized model and an exported checkpoint: all
three are a :class:`~quantlab.models.load.LoadedModel`, and answers come from
:func:`quantlab.eval.generate.generate_answers` (processor + chat template); or for a checkpoint served by
an external engine (:mod:`quantlab.eval.engines`, e.g. vLLM), which gets the same templated prompts.

Data layout under ``data_dir`` (one folder per task):

| task        | files under ``data_dir``                                                              |
|-------------|---------------------------------------------------------------------------------------|
| shapes-vqa  | ``shapes-vqa/test/questions.jsonl`` + images; if absent, generated in memory (``limit`` |
|             | items of the ``test`` split, default 500) so the toys evaluate with no files           |
| pope        | ``pope/*.jsonl`` (or ``*.json``: POPE's files are JSON lines) + ``pope/images/``        |
| mme         | ``mme/<subtask>/...`` (either released layout, see ``read_mme``)                        |
| vqav2       | ``vqav2/questions.json``, ``vqav2/annotations.json``, ``vqav2/images/``                 |
| textvqa     | ``textvqa/data.json``, ``textvqa/images/``                                              |
| gqa         | ``gqa/questions.json``, ``gqa/images/``                                                 |
| scienceqa   | ``scienceqa/problems.json`` (test split), ``scienceqa/images/``                         |

All annotation files are read (and validated) before any generation, so a malformed file fails fast with
its path and line. Images are opened lazily per batch and converted to RGB; a missing or undecodable image
makes that item *failed* (recorded with its id and the error), never an exception. Scores are means over
the items that were answered (``n - n_failed``); items without an image run in their own batches.
"""

from __future__ import annotations

import io
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict

from quantlab.core.files import write_file_atomic
from quantlab.core.progress import block_progress
from quantlab.eval.engines import ChildEngine
from quantlab.eval.generate import generate_answers
from quantlab.eval.readers import (
    EvalItem,
)
from quantlab.eval.tasks import (  # noqa: F401
    Task,
    format_prompt,
    get_task,
    score,
    seeded_subset,
    shapes_items,
)
from quantlab.models.load import LoadedModel

logger = logging.getLogger(__name__)

DEFAULT_SHAPES_N = 500
N_EXAMPLES = 8


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FailedItem(_Strict):
    """An item that could not be run: its id, image path (if any) and the error text."""

    id: str
    image: str | None
    error: str


class TypeScore(_Strict):
    """Mean score of the answered items of one question type."""

    n: int
    score: float


class Example(_Strict):
    """One prediction, for eyeballing."""

    id: str
    question_type: str | None
    question: str
    answers: list[str]
    prediction: str
    score: float


class TaskResult(_Strict):
    """One task's result. ``score`` is ``None`` when no item could be answered.

    ``aggregates`` holds task-specific metrics: POPE ``accuracy/precision/recall/f1/yes_ratio`` (+
    ``by_category``), MME ``perception/cognition/subtasks``, shapes-VQA ``exist`` (POPE metrics of the
    yes/no existence questions). ``item_scores`` maps each answered item's id to its score (what the
    report pairs between two runs); it is empty in reports written before it existed.
    """

    task: str
    source: str
    n: int
    n_failed: int
    failed: list[FailedItem]
    score: float | None
    per_type: dict[str, TypeScore]
    aggregates: dict[str, Any]
    examples: list[Example]
    seconds: float
    item_scores: dict[str, float] = {}


class EvalReport(_Strict):
    """The result of :func:`evaluate`: settings and one :class:`TaskResult` per task."""

    model: str
    seed: int
    limit: int | None
    batch_size: int
    max_new_tokens: int
    tasks: dict[str, TaskResult]

    def save_json(self, path: str | Path) -> Path:
        """Write the report as JSON atomically (temporary sibling, then rename)."""
        return write_file_atomic(path, self.model_dump_json(indent=2) + "\n")

    @classmethod
    def load_json(cls, path: str | Path) -> EvalReport:
        """Read a report written by :meth:`save_json` (validated; unknown keys are an error)."""
        return cls.model_validate_json(Path(path).read_text(encoding="utf-8"))


# --- data --------------------------------------------------------------------------------------------------


def load_items(task: str, data_dir: Path | None, *, limit: int | None, seed: int = 0
               ) -> tuple[list[EvalItem], str]:
    """The (seeded-subset) items of ``task`` and a description of where they came from.

    Raises:
        KeyError: unknown task (naming the valid ones).
        ValueError: no ``data_dir`` for a task that needs files; malformed annotations (file and line);
            items without ground-truth answers.
        FileNotFoundError: a missing annotation file or image folder.
    """
    t = get_task(task)
    if t.generate is not None and (data_dir is None or not (Path(data_dir) / t.files).is_dir()):
        n = DEFAULT_SHAPES_N if limit is None else limit
        where = "no data_dir" if data_dir is None else f"no {t.files} under {data_dir}"
        logger.info("%s: %s; generating %d test items in memory (seeded, deterministic)", task, where, n)
        return t.generate(n), f"generated: {task} test split, items 0..{n - 1}"
    if data_dir is None:
        raise ValueError(f"task {task!r} reads files: pass data_dir (CLI: --data-dir)")
    items = seeded_subset(get_task(task).load(Path(data_dir)), limit, seed)
    unanswered = [it.id for it in items if not it.answers]
    if unanswered:
        raise ValueError(f"task {task!r}: {len(unanswered)} item(s) have no ground-truth answers (a test split "
                         f"without annotations?), e.g. {unanswered[:3]}")
    return items, str(data_dir)


def _has_image(item: EvalItem) -> bool:
    return item.image is not None or "image_bytes" in item.extra or "render" in item.extra


def open_image(item: EvalItem) -> Image.Image:
    """The item's image, fully decoded and converted to RGB (raises on a missing or corrupt file)."""
    if "render" in item.extra:
        return item.extra["render"]().convert("RGB")
    source = io.BytesIO(item.extra["image_bytes"]) if item.image is None else item.image
    with Image.open(source) as im:
        im.load()
        return im.convert("RGB")


def _try_open(item: EvalItem) -> tuple[Image.Image | None, FailedItem | None]:
    try:
        return open_image(item), None
    except Exception as e:  # noqa: BLE001 - any unreadable image is a failed item, by contract
        return None, FailedItem(id=item.id, image=None if item.image is None else str(item.image),
                                error=f"{type(e).__name__}: {e}")


# --- running -----------------------------------------------------------------------------------------------


def _batches(items: Sequence[EvalItem], batch_size: int | None) -> Iterator[list[int]]:
    """Index batches: items with an image first, then text-only items, never mixed; ``None``: one batch of
    everything (an external engine batches by itself and is started once)."""
    if batch_size is None:
        yield list(range(len(items)))
        return
    for group in ([i for i, it in enumerate(items) if _has_image(it)],
                  [i for i, it in enumerate(items) if not _has_image(it)]):
        for lo in range(0, len(group), batch_size):
            yield group[lo:lo + batch_size]


def _answer(model: LoadedModel | ChildEngine, prompts: list[str], images: list[Image.Image | None],
            max_new_tokens: int) -> list[str]:
    if isinstance(model, ChildEngine):
        return model.answer(prompts, images, max_new_tokens=max_new_tokens)
    return generate_answers(model, prompts, images, batch_size=len(prompts), max_new_tokens=max_new_tokens)


def predict(model: LoadedModel | ChildEngine, task: Task, items: Sequence[EvalItem], *, batch_size: int,
            max_new_tokens: int, advance: Callable[[int], None] = lambda _n: None
            ) -> tuple[list[str | None], list[FailedItem]]:
    """Greedy predictions (``None`` for failed items) and the failed items, in item order."""
    preds: list[str | None] = [None] * len(items)
    failed: dict[int, FailedItem] = {}
    for batch in _batches(items, None if isinstance(model, ChildEngine) else batch_size):
        keep, images = [], []
        for i in batch:
            img, fail = _try_open(items[i]) if _has_image(items[i]) else (None, None)
            if fail is not None:
                failed[i] = fail
                continue
            keep.append(i)
            images.append(img)
        if keep:
            answers = _answer(model, [format_prompt(task, items[i]) for i in keep], images, max_new_tokens)
            for i, a in zip(keep, answers):
                preds[i] = a
        for img in images:
            if img is not None:
                img.close()
        advance(len(batch))
    return preds, [failed[i] for i in sorted(failed)]


def summarize(task: Task, items: Sequence[EvalItem], preds: Sequence[str | None], failed: list[FailedItem],
              *, source: str, seconds: float = 0.0, n_examples: int = N_EXAMPLES) -> TaskResult:
    """Score answered items and build the :class:`TaskResult` (pure: no model involved)."""
    done = [(it, p) for it, p in zip(items, preds) if p is not None]
    keys = [k for k, p in zip(_item_keys(items), preds) if p is not None]  # of the items in `done`
    scores = [score(task, p, it) for it, p in done]
    by_type: dict[str, list[float]] = defaultdict(list)
    for (it, _), s in zip(done, scores):
        if it.question_type is not None:
            by_type[it.question_type].append(s)
    aggregate = task.aggregate
    aggregates = aggregate([it for it, _ in done], [p for _, p in done]) if aggregate and done else {}
    examples = [Example(id=it.id, question_type=it.question_type, question=it.question, answers=list(it.answers),
                        prediction=p, score=s) for (it, p), s in list(zip(done, scores))[:n_examples]]
    return TaskResult(task=task.name, source=source, n=len(items), n_failed=len(failed), failed=failed,
                      score=sum(scores) / len(scores) if scores else None,
                      per_type={t: TypeScore(n=len(v), score=sum(v) / len(v)) for t, v in sorted(by_type.items())},
                      aggregates=aggregates, examples=examples, seconds=round(seconds, 3),
                      item_scores=dict(zip(keys, map(float, scores))))


def _item_keys(items: Sequence[EvalItem]) -> list[str]:
    """Each item's id; a repeated id gets ``#2``, ``#3``, ... in item order (failed items count too, so the
    keys of two runs over the same items pair up)."""
    seen: dict[str, int] = defaultdict(int)
    keys = []
    for it in items:
        seen[it.id] += 1
        keys.append(it.id if seen[it.id] == 1 else f"{it.id}#{seen[it.id]}")
    return keys


def _by_items(tick: Callable[[int], None]) -> Callable[[int], None]:
    """Turn a one-step progress callback into one that advances by ``n`` items."""
    def advance(n: int) -> None:
        for _ in range(n):
            tick(0)
    return advance


def evaluate(loaded: LoadedModel | ChildEngine, tasks: list[str], *, data_dir: Path | None, limit: int | None,
             seed: int = 0, batch_size: int = 32, max_new_tokens: int = 16, progress: bool = False) -> EvalReport:
    """Evaluate ``loaded`` on ``tasks`` with batched greedy generation.

    Args:
        loaded: model + processor (base, in-memory quantized, or an exported checkpoint), answered by
            transformers in this process; or an external engine serving a checkpoint
            (:func:`quantlab.eval.engines.open_engine`), answered in its own process.
        tasks: names from :data:`quantlab.eval.tasks.TASKS`.
        data_dir: root of the per-task folders (see the module table); ``None`` only for shapes-vqa.
        limit: evaluate a seeded subset of this many items per task (``None``: all).
        seed: seed of the subset.
        batch_size: generation batch size.
        max_new_tokens: greedy decoding length.
        progress: show a rich progress bar per task (items, elapsed, ETA).

    Raises:
        KeyError: unknown task. ValueError / FileNotFoundError: bad data (raised before any generation).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    specs = [get_task(t) for t in tasks]
    data = {t.name: load_items(t.name, data_dir, limit=limit, seed=seed) for t in specs}
    results: dict[str, TaskResult] = {}
    for task in specs:
        items, source = data[task.name]
        start = time.perf_counter()
        with block_progress(f"eval {task.name}", len(items), enabled=progress) as tick:
            preds, failed = predict(loaded, task, items, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                    advance=_by_items(tick))
        if failed:
            logger.warning("%s: %d of %d items failed (unreadable images), e.g. %s: %s", task.name, len(failed),
                           len(items), failed[0].id, failed[0].error)
        results[task.name] = summarize(task, items, preds, failed, source=source,
                                       seconds=time.perf_counter() - start)
    return EvalReport(model=str(loaded.source), seed=seed, limit=limit, batch_size=batch_size,
                      max_new_tokens=max_new_tokens, tasks=results)
