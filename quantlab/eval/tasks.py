"""Evaluation tasks as data: a reader, a prompt template and a metric name, registered in :data:`TASKS`.

| task        | reader            | prompt                         | metric (per item)   | aggregate          |
|-------------|-------------------|--------------------------------|---------------------|--------------------|
| shapes-vqa  | read_shapes_vqa   | raw question                   | exact_match         | mean               |
| shapes-vqa-hard | read_shapes_vqa | raw question                 | exact_match (+ ANLS on text) | mean      |
| vqav2       | read_vqav2        | short answer                   | vqa_accuracy        | mean               |
| textvqa     | read_textvqa      | short answer                   | textvqa_accuracy    | mean               |
| gqa         | read_gqa          | short answer                   | exact_match         | mean               |
| pope        | read_pope         | "... Please answer yes or no." | pope (yes/no right) | ``pope_metrics``   |
| mme         | read_mme          | short answer                   | mme (yes/no right)  | ``mme_score``      |
| scienceqa   | read_scienceqa    | lettered options               | multiple_choice     | mean               |
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from quantlab.core.registry import Member, Registry
from quantlab.data.synthetic import SETS
from quantlab.eval import metrics
from quantlab.eval.readers import (
    EvalItem,
    read_gqa,
    read_mme,
    read_pope,
    read_scienceqa,
    read_shapes_vqa,
    read_textvqa,
    read_vqav2,
)

SHORT_ANSWER_PROMPT = "{question}\nAnswer the question using a single word or phrase."
YES_NO_PROMPT = "{question} Please answer yes or no."
MULTIPLE_CHOICE_PROMPT = "{context}{question}\n{options}\nAnswer with the option's letter from the given choices directly."


def _pope_items(root: Path) -> Iterator[EvalItem]:
    files = sorted(p for p in root.glob("*.json*") if p.suffix in (".json", ".jsonl"))
    if not files:
        raise FileNotFoundError(f"{root}: no POPE question files (*.jsonl / *.json)")
    for f in files:
        for item in read_pope(f, root / "images"):  # ids restart per file: prefix them when there are several
            yield replace(item, id=f"{f.stem}/{item.id}" if len(files) > 1 else item.id,
                          question_type=item.question_type or f.stem)


def shapes_items(n: int, split: str = "test", set_name: str = "shapes-vqa") -> list[EvalItem]:
    """``n`` items of a synthetic set generated in memory; images are rendered lazily (``extra["render"]``)."""
    return [EvalItem(s.id, None, s.question, (s.answer,), s.question_type, None,
                     {"render": s.render, "caption": s.caption()})
            for s in SETS.get(set_name).samples(split, n)]



def _pope_aggregate(items: Sequence[EvalItem], preds: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = dict(metrics.pope_metrics(preds, [it.answers[0] for it in items]))
    by_cat: dict[str, list[int]] = defaultdict(list)
    for k, it in enumerate(items):
        if it.question_type:
            by_cat[it.question_type].append(k)
    out["by_category"] = {c: metrics.pope_metrics([preds[k] for k in ks], [items[k].answers[0] for k in ks])
                          for c, ks in sorted(by_cat.items())}
    return out


def _mme_aggregate(items: Sequence[EvalItem], preds: Sequence[str]) -> dict[str, Any]:
    return metrics.mme_score({"subtask": it.extra["subtask"], "image_id": it.extra["image_id"], "prediction": p,
                              "answer": it.answers[0]} for it, p in zip(items, preds))


def _synthetic_aggregate(items: Sequence[EvalItem], preds: Sequence[str], set_name: str) -> dict[str, Any]:
    """POPE metrics of ``exist`` and, for the set's read-text types, ANLS beside exact match (DocVQA's
    official metric)."""
    exist = [(it.answers[0], p) for it, p in zip(items, preds) if it.question_type == "exist"]
    out = {"exist": metrics.pope_metrics([p for _, p in exist], [a for a, _ in exist])} if exist else {}
    text = [(it, p) for it, p in zip(items, preds) if it.question_type in SETS.get(set_name).text_types]
    if text:
        out["text"] = {"n": len(text),
                       "exact_match": sum(metrics.exact_match(p, it.answers) for it, p in text) / len(text),
                       "anls": sum(metrics.anls(p, it.answers) for it, p in text) / len(text)}
    return out


class Task(Member):
    """A benchmark: where its files lie, how to prompt for each item, how to score an answer.

    ``load(data_dir)`` reads the task's files, which lie in ``data_dir / files`` (the layouts are listed
    in :mod:`quantlab.eval.runner`). ``generate(n)``: the task's items made in memory when those files are
    absent (shapes-VQA); None for benchmarks that only come as files.

    ``aggregate(items, predictions)``: task-level metrics beside the mean item score (POPE's F1, MME's
    totals, ...), or None.

    ``prompt_template`` may use ``{question}``, ``{options}`` (``"A. ...\\nB. ..."``) and ``{context}``
    (``"Context: <hint>\\n"`` when the item has a hint, else empty). ``metric`` is a key of
    :data:`SCORERS`; ``answer_kind`` is ``"short"``, ``"yes_no"`` or ``"multiple_choice"``.
    """

    load: Callable[[Path], Iterable[EvalItem]]
    files: str
    prompt_template: str
    metric: str
    answer_kind: str
    generate: Callable[[int], list[EvalItem]] | None = None
    aggregate: Callable[[Sequence[EvalItem], Sequence[str]], dict[str, Any]] | None = None


def _require_answers(item: EvalItem) -> tuple[str, ...]:
    if not item.answers:
        raise ValueError(f"item {item.id!r} has no ground-truth answers to score against")
    return item.answers


def _score_multiple_choice(prediction: str, item: EvalItem) -> float:
    if not item.options:
        raise ValueError(f"item {item.id!r} has no options for a multiple-choice metric")
    return metrics.multiple_choice_accuracy(prediction, item.options, _require_answers(item)[0])


SCORERS: dict[str, Callable[[str, EvalItem], float]] = {
    "exact_match": lambda p, item: metrics.exact_match(p, _require_answers(item)),
    "vqa_accuracy": lambda p, item: metrics.vqa_accuracy(p, _require_answers(item)),
    "textvqa_accuracy": lambda p, item: metrics.vqa_accuracy(p, _require_answers(item), normalize_all_answers=True),
    "pope": lambda p, item: float(metrics.yes_no(p) == _require_answers(item)[0].strip().lower()),
    "mme": lambda p, item: float(metrics.mme_yes_no(p) == _require_answers(item)[0].strip().lower()),
    "multiple_choice": _score_multiple_choice,
    "anls": lambda p, item: metrics.anls(p, _require_answers(item)),
}

TASKS: Registry[Task] = Registry("task")
for _task in (
    Task(name="shapes-vqa", load=lambda d: read_shapes_vqa(d / "shapes-vqa" / "test"), files="shapes-vqa/test",
         prompt_template="{question}", metric="exact_match", answer_kind="short", generate=shapes_items,
         aggregate=partial(_synthetic_aggregate, set_name="shapes-vqa")),
    Task(name="shapes-vqa-hard", load=lambda d: read_shapes_vqa(d / "shapes-vqa-hard" / "test"),
         files="shapes-vqa-hard/test", prompt_template="{question}", metric="exact_match", answer_kind="short",
         generate=partial(shapes_items, set_name="shapes-vqa-hard"),
         aggregate=partial(_synthetic_aggregate, set_name="shapes-vqa-hard")),
    Task(name="vqav2", files="vqav2", load=lambda d: read_vqav2(d / "vqav2/questions.json", d / "vqav2/annotations.json",
                                                 d / "vqav2/images"),
         prompt_template=SHORT_ANSWER_PROMPT, metric="vqa_accuracy", answer_kind="short"),
    Task(name="textvqa", files="textvqa", load=lambda d: read_textvqa(d / "textvqa/data.json", d / "textvqa/images"),
         prompt_template=SHORT_ANSWER_PROMPT, metric="textvqa_accuracy", answer_kind="short"),
    Task(name="gqa", files="gqa", load=lambda d: read_gqa(d / "gqa/questions.json", d / "gqa/images"),
         prompt_template=SHORT_ANSWER_PROMPT, metric="exact_match", answer_kind="short"),
    Task(name="pope", files="pope", load=lambda d: _pope_items(d / "pope"), prompt_template=YES_NO_PROMPT, metric="pope",
         answer_kind="yes_no", aggregate=_pope_aggregate),
    Task(name="mme", files="mme", load=lambda d: read_mme(d / "mme"), prompt_template=SHORT_ANSWER_PROMPT, metric="mme",
         answer_kind="yes_no", aggregate=_mme_aggregate),
    Task(name="scienceqa", files="scienceqa", load=lambda d: read_scienceqa(d / "scienceqa/problems.json", d / "scienceqa/images",
                                                         "test"),
         prompt_template=MULTIPLE_CHOICE_PROMPT, metric="multiple_choice", answer_kind="multiple_choice"),
):
    TASKS.register(_task)


def get_task(name: str) -> Task:
    """The registered task called ``name``.

    Raises:
        UnknownName: a ``KeyError`` naming the valid task names.
    """
    return TASKS.get(name)


def format_options(options: Sequence[str]) -> str:
    """``["cat", "dog"]`` -> ``"A. cat\\nB. dog"``."""
    return "\n".join(f"{metrics.option_letter(i)}. {o}" for i, o in enumerate(options))


def format_prompt(task: Task, item: EvalItem) -> str:
    """The text prompt for ``item`` (the image is passed to the model separately)."""
    hint = item.extra.get("hint")
    return task.prompt_template.format(question=item.question, options=format_options(item.options or ()),
                                       context=f"Context: {hint}\n" if hint else "")


def score(task: Task, prediction: str, item: EvalItem) -> float:
    """Per-item score in [0, 1] with the task's metric (accuracy-type; POPE/MME aggregate separately).

    Raises:
        KeyError: if ``task.metric`` is not a key of :data:`SCORERS`.
        ValueError: if the item has no ground-truth answers (e.g. a test split).
    """
    if task.metric not in SCORERS:
        raise KeyError(f"unknown metric {task.metric!r} for task {task.name!r}; valid: {', '.join(sorted(SCORERS))}")
    return SCORERS[task.metric](prediction, item)


def seeded_subset(items: Iterable[EvalItem], limit: int | None, seed: int = 0) -> list[EvalItem]:
    """A reproducible random subset of ``limit`` items, in their original order (all items if ``limit`` is
    ``None`` or at least the number of items).

    Raises:
        ValueError: if ``limit`` is negative.
    """
    items = list(items)
    if limit is None or limit >= len(items):
        return items
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]
