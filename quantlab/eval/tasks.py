"""Evaluation tasks as data: a reader, a prompt template and a metric name, registered in :data:`TASKS`.

| task        | reader            | prompt                         | metric (per item)   | aggregate          |
|-------------|-------------------|--------------------------------|---------------------|--------------------|
| shapes-vqa  | read_shapes_vqa   | raw question                   | exact_match         | mean               |
| vqav2       | read_vqav2        | short answer                   | vqa_accuracy        | mean               |
| textvqa     | read_textvqa      | short answer                   | textvqa_accuracy    | mean               |
| gqa         | read_gqa          | short answer                   | exact_match         | mean               |
| pope        | read_pope         | "... Please answer yes or no." | pope (yes/no right) | ``pope_metrics``   |
| mme         | read_mme          | short answer                   | mme (yes/no right)  | ``mme_score``      |
| scienceqa   | read_scienceqa    | lettered options               | multiple_choice     | mean               |
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Task:
    """A benchmark: how to read it, how to prompt for each item, how to score an answer.

    ``prompt_template`` may use ``{question}``, ``{options}`` (``"A. ...\\nB. ..."``) and ``{context}``
    (``"Context: <hint>\\n"`` when the item has a hint, else empty). ``metric`` is a key of
    :data:`SCORERS`; ``answer_kind`` is ``"short"``, ``"yes_no"`` or ``"multiple_choice"``.
    """

    name: str
    reader: Callable[..., Iterable[EvalItem]]
    prompt_template: str
    metric: str
    answer_kind: str


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

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("shapes-vqa", read_shapes_vqa, "{question}", "exact_match", "short"),
        Task("vqav2", read_vqav2, SHORT_ANSWER_PROMPT, "vqa_accuracy", "short"),
        Task("textvqa", read_textvqa, SHORT_ANSWER_PROMPT, "textvqa_accuracy", "short"),
        Task("gqa", read_gqa, SHORT_ANSWER_PROMPT, "exact_match", "short"),
        Task("pope", read_pope, YES_NO_PROMPT, "pope", "yes_no"),
        Task("mme", read_mme, SHORT_ANSWER_PROMPT, "mme", "yes_no"),
        Task("scienceqa", read_scienceqa, MULTIPLE_CHOICE_PROMPT, "multiple_choice", "multiple_choice"),
    )
}


def get_task(name: str) -> Task:
    """The registered task called ``name``.

    Raises:
        KeyError: naming the valid task names.
    """
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


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
