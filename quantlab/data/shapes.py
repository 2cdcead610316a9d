"""shapes-VQA: a deterministic synthetic VQA benchmark of coloured shapes.

Each image is a ``grid x grid`` board of cells; 1-4 cells hold a shape. Within one image every object
has a distinct colour and a distinct shape, so "the red object" and "the circle" are never ambiguous.
Questions have one-word answers and come in five types:

| type     | example                                          | answers                    |
|----------|--------------------------------------------------|----------------------------|
| color    | What color is the circle?                        | red, green, ...            |
| shape    | What shape is the blue object?                   | circle, square, ...        |
| count    | How many shapes are there?                       | 1, 2, 3, 4                 |
| exist    | Is there a red square?                           | yes / no (balanced, POPE)  |
| position | Is the red square on the left or the right?      | left, right, top, bottom   |

Negatives of ``exist`` questions are half "random" (colour or shape absent from the image) and half
"adversarial" (both colour and shape present, but on different objects), as in POPE.

Every sample is derived from ``numpy.random.default_rng([split_seed, index])``, so a split is a pure
function of its seed: the same index always gives the same image, question and answer. Splits are written to
disk by :func:`quantlab.data.synthetic.write_set_split`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw


COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 70, 240),
    "yellow": (245, 230, 30),
    "purple": (160, 40, 200),
    "orange": (250, 140, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "count", "exist", "position")
SPLIT_SEEDS: dict[str, int] = {"train": 0, "calibration": 1, "test": 2}
BACKGROUND = (16, 16, 16)


@dataclass(frozen=True)
class ShapeObject:
    """One shape on the board: its cell (row, col), colour and shape names."""

    row: int
    col: int
    color: str
    shape: str


@dataclass(frozen=True)
class ShapesSample:
    """One question about one scene. ``image`` is rendered on demand from ``objects``."""

    id: str
    objects: tuple[ShapeObject, ...]
    question: str
    answer: str
    question_type: str
    grid: int
    cell_px: int
    seed: tuple[int, int]

    def render(self) -> Image.Image:
        """Draw the scene (deterministic: jitter comes from the sample's own seed)."""
        return render_scene(self.objects, self.grid, self.cell_px, self.seed)

    def caption(self) -> str:
        """A text-only description of the scene (for text-only calibration samples)."""
        return describe_scene(self.objects, self.grid)


def render_scene(objects: tuple[ShapeObject, ...], grid: int, cell_px: int, seed: tuple[int, int]) -> Image.Image:
    """Render objects on a dark board; each shape stays inside its cell with a seeded size/offset jitter."""
    rng = np.random.default_rng([*seed, 7])
    size = grid * cell_px
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in objects:
        extent = int(rng.integers(int(cell_px * 0.6), int(cell_px * 0.9) + 1))
        slack = cell_px - extent
        x0 = obj.col * cell_px + int(rng.integers(0, slack + 1))
        y0 = obj.row * cell_px + int(rng.integers(0, slack + 1))
        x1, y1 = x0 + extent - 1, y0 + extent - 1
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
        elif obj.shape == "cross":
            w = max(2, extent // 3)
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            draw.rectangle((cx - w // 2, y0, cx - w // 2 + w - 1, y1), fill=fill)
            draw.rectangle((x0, cy - w // 2, x1, cy - w // 2 + w - 1), fill=fill)
        else:  # pragma: no cover - SHAPES is closed
            raise ValueError(f"unknown shape {obj.shape!r}")
    return img


def _side(obj: ShapeObject, grid: int, axis: str) -> str:
    half = grid // 2
    if axis == "horizontal":
        return "left" if obj.col < half else "right"
    return "top" if obj.row < half else "bottom"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe_scene(objects: tuple[ShapeObject, ...], grid: int) -> str:
    """One sentence per object, e.g. 'A red circle is at the top left.'"""
    parts = [
        f"{_article(o.color).capitalize()} {o.color} {o.shape} is at the {_side(o, grid, 'vertical')} {_side(o, grid, 'horizontal')}."
        for o in objects
    ]
    return f"There {'is' if len(objects) == 1 else 'are'} {len(objects)} shape{'s' * (len(objects) > 1)}. " + " ".join(parts)


def _scene(rng: np.random.Generator, grid: int, max_objects: int) -> tuple[ShapeObject, ...]:
    n = int(rng.integers(1, max_objects + 1))
    cells = rng.choice(grid * grid, size=n, replace=False)
    colors = rng.choice(len(COLORS), size=n, replace=False)
    shapes = rng.choice(len(SHAPES), size=n, replace=False)
    names = list(COLORS)
    return tuple(
        ShapeObject(int(c) // grid, int(c) % grid, names[int(k)], SHAPES[int(s)])
        for c, k, s in zip(cells, colors, shapes)
    )


def _question(rng: np.random.Generator, objects: tuple[ShapeObject, ...], qtype: str, grid: int) -> tuple[str, str]:
    target = objects[int(rng.integers(len(objects)))]
    if qtype == "color":
        return f"What color is the {target.shape}?", target.color
    if qtype == "shape":
        return f"What shape is the {target.color} object?", target.shape
    if qtype == "count":
        return "How many shapes are there?", str(len(objects))
    if qtype == "position":
        axis = "horizontal" if rng.random() < 0.5 else "vertical"
        options = "on the left or the right" if axis == "horizontal" else "at the top or the bottom"
        return f"Is the {target.color} {target.shape} {options}?", _side(target, grid, axis)
    if qtype == "exist":
        if rng.random() < 0.5:
            return f"Is there {_article(target.color)} {target.color} {target.shape}?", "yes"
        present = {(o.color, o.shape) for o in objects}
        colors_in = [o.color for o in objects]
        shapes_in = [o.shape for o in objects]
        adversarial = [(c, s) for c in colors_in for s in shapes_in if (c, s) not in present]
        if adversarial and rng.random() < 0.5:
            color, shape = adversarial[int(rng.integers(len(adversarial)))]
        else:
            pool = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
            color, shape = pool[int(rng.integers(len(pool)))]
        return f"Is there {_article(color)} {color} {shape}?", "no"
    raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")


def make_sample(split: str, index: int, *, grid: int = 4, cell_px: int = 16, max_objects: int = 4) -> ShapesSample:
    """The ``index``-th sample of ``split`` (question types cycle so every type is equally frequent)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown shapes-VQA split {split!r}; expected one of {sorted(SPLIT_SEEDS)}")
    if grid % 2:
        raise ValueError(f"grid must be even so every cell is clearly left/right and top/bottom, got {grid}")
    seed = (SPLIT_SEEDS[split], index)
    rng = np.random.default_rng(list(seed))
    objects = _scene(rng, grid, max_objects)
    qtype = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    question, answer = _question(rng, objects, qtype, grid)
    return ShapesSample(f"{split}-{index:06d}", objects, question, answer, qtype, grid, cell_px, seed)


def iter_samples(split: str, n: int, *, start: int = 0, **kwargs) -> Iterator[ShapesSample]:
    """Samples ``start .. start+n-1`` of a split."""
    for i in range(start, start + n):
        yield make_sample(split, i, **kwargs)
