"""The built-in synthetic VQA sets as registry members: what the eval task, the calibration source, the toy
builder and the training script ask about each one.

| set              | generator                       | board          | question types                                    |
|------------------|---------------------------------|----------------|---------------------------------------------------|
| shapes-vqa       | :mod:`quantlab.data.shapes`      | 4x4, 64 px     | color, shape, count, exist, position              |
| shapes-vqa-hard  | :mod:`quantlab.data.shapes_hard` | 6x6, 96 px     | color, shape, count, exist, relation, text        |
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from quantlab.core.files import write_dir_atomic
from quantlab.core.registry import Member, Registry
from quantlab.data import shapes, shapes_hard


class SyntheticSet(Member):
    """A seeded synthetic VQA generator.

    Attributes:
        make_sample: ``(split, index) -> sample`` with ``id, question, answer, question_type, objects,
            render(), caption()``; splits are ``train``, ``calibration`` and ``test``.
        question_types: the types, in the order they cycle through the indices.
        text_types: question types whose answers are read text (scored with ANLS besides exact match).
        colors, shapes: the vocabulary of object attributes.
        grid, cell_px: the board (``grid x grid`` cells of ``cell_px`` pixels).
        alphabet: characters labels are made of (empty: no labels).
        calib_kind: the calibration source kind (:data:`quantlab.calib.data.SOURCES`) that draws from it.
        more_questions: ``(sample, k) -> [(question, answer, type)]``, up to ``k`` more questions about the
            sample's board (training packs them into one conversation); None: the set has none.
        relation_target: ``sample -> object or None``: the object a relation question asks about (training's
            late auxiliary targets); None: the set has no relation questions.
    """

    make_sample: Callable[[str, int], Any]
    question_types: tuple[str, ...]
    text_types: tuple[str, ...] = ()
    colors: tuple[str, ...]
    shapes: tuple[str, ...]
    grid: int
    cell_px: int
    alphabet: str = ""
    calib_kind: str = "shapes"
    more_questions: Callable[[Any, int], list[tuple[str, str, str]]] | None = None
    relation_target: Callable[[Any], Any] | None = None

    def samples(self, split: str, n: int, *, start: int = 0) -> Iterator[Any]:
        """Samples ``start .. start+n-1`` of ``split``."""
        for i in range(start, start + n):
            yield self.make_sample(split, i)

    @property
    def image_px(self) -> int:
        return self.grid * self.cell_px


SETS: Registry[SyntheticSet] = Registry("synthetic VQA set")
SETS.register(SyntheticSet(name="shapes-vqa", make_sample=shapes.make_sample, question_types=shapes.QUESTION_TYPES,
                           colors=tuple(shapes.COLORS), shapes=shapes.SHAPES, grid=4, cell_px=16))
SETS.register(SyntheticSet(name="shapes-vqa-hard", make_sample=shapes_hard.make_sample,
                           question_types=shapes_hard.QUESTION_TYPES, text_types=shapes_hard.TEXT_TYPES,
                           colors=tuple(shapes_hard.COLORS), shapes=shapes_hard.SHAPES, grid=shapes_hard.GRID,
                           cell_px=shapes_hard.CELL_PX, alphabet=shapes_hard.ALPHABET, calib_kind="shapes-hard",
                           more_questions=shapes_hard.more_questions, relation_target=shapes_hard.relation_target))


def set_of_model(model_dir: str | Path) -> SyntheticSet:
    """The set a toy checkpoint was trained on (``training.json``'s ``dataset``; shapes-VQA when absent)."""
    info = Path(model_dir) / "training.json"
    name = json.loads(info.read_text()).get("dataset", "shapes-vqa") if info.is_file() else "shapes-vqa"
    return SETS.get(name)


def sample_record(s: Any, image_rel: str) -> dict[str, Any]:
    """The ``questions.jsonl`` record of one sample (VQAv2-style ten agreeing answers)."""
    record = {"question_id": s.id, "image": image_rel, "question": s.question, "answer": s.answer,
              "answers": [s.answer] * 10, "question_type": s.question_type, "caption": s.caption(),
              "objects": [asdict(o) for o in s.objects]}
    if getattr(s, "label", None) is not None:
        record["label"] = asdict(s.label)
    return record


def write_set_split(out_dir: str | Path, set_name: str, split: str, n: int) -> Path:
    """Write ``n`` samples of ``split`` of set ``set_name`` as ``questions.jsonl`` + ``images/*.png`` under
    ``out_dir/split`` (built in a temporary sibling and renamed into place). Returns the split directory.

    Raises:
        FileExistsError: ``out_dir/split`` exists (nothing is overwritten).
    """
    member = SETS.get(set_name)
    out_dir = Path(out_dir)
    final = out_dir / split
    if final.exists():
        raise FileExistsError(f"{final} already exists; remove it or choose another directory")
    out_dir.mkdir(parents=True, exist_ok=True)

    def fill(tmp: Path) -> None:
        (tmp / "images").mkdir()
        with open(tmp / "questions.jsonl", "w") as f:
            for s in member.samples(split, n):
                image_rel = f"images/{s.id}.png"
                s.render().save(tmp / image_rel)
                f.write(json.dumps(sample_record(s, image_rel)) + "\n")

    return write_dir_atomic(final, fill)
