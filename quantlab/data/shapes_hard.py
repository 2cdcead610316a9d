"""shapes-VQA-hard: the harder synthetic VQA benchmark that separates quantizers (docs/hard-testbed.md).

A ``6 x 6`` board of 16 px cells (96 px images). Compared with :mod:`quantlab.data.shapes`: more objects
(1-6; count scenes 1-8), smaller objects (45-80% of a cell), ten colours including near shades
(red/maroon, green/lime, blue/cyan, purple/pink) with a seeded per-object tint, five shapes that may
repeat, a rendered 2-4 character label on half the boards, and six question types:

| type     | example                                          | answers                         |
|----------|--------------------------------------------------|---------------------------------|
| color    | What color is the diamond?                       | red, maroon, ... (10)           |
| shape    | What shape is the lime object?                   | circle, square, ... (5)         |
| count    | How many shapes are there?                       | 1 .. 8                          |
| exist    | Is there a cyan cross?                           | yes / no (POPE: random, adversarial, near shade) |
| relation | What color is the shape left of the triangle?    | a colour, or a shape ("What shape is above the red object?") |
| text     | What does the label say?                         | 2-4 characters, e.g. ``7PA``; exact match and ANLS |

Within a board every object has its own colour, so "the red object" is unique; a shape named in a
question ("the triangle") is unique on its board by construction. A relation's answer is the nearest
object on the anchor's row (left/right) or column (above/below) in that direction.

Labels use a fixed 3x5 pixel font drawn at 2x (defined here, so rendering does not depend on the Pillow
version's fonts), two characters per cell, left-aligned to a cell edge; objects never share a label's cells.

Every sample comes from ``numpy.random.default_rng([split_seed, index])`` with split seeds disjoint from
shapes-VQA's, so a split is a pure function of its seed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from quantlab.data.shapes import BACKGROUND, ShapeObject, _article

GRID = 6
CELL_PX = 16
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "maroon": (150, 30, 60),
    "orange": (250, 140, 20),
    "yellow": (240, 225, 40),
    "green": (35, 160, 55),
    "lime": (150, 235, 60),
    "cyan": (40, 200, 215),
    "blue": (45, 75, 240),
    "purple": (145, 50, 215),
    "pink": (245, 120, 190),
}
NEAR_SHADES: dict[str, str] = {"red": "maroon", "maroon": "red", "green": "lime", "lime": "green", "blue": "cyan",
                               "cyan": "blue", "purple": "pink", "pink": "purple"}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond")
QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "count", "exist", "relation", "text")
TEXT_TYPES: tuple[str, ...] = ("text",)  # scored with ANLS too
SPLIT_SEEDS: dict[str, int] = {"train": 10, "calibration": 11, "test": 12}
MAX_OBJECTS, MAX_COUNT = 6, 8
TINT = 14  # +- per channel, seeded per object: near shades stay close, never equal
DIRECTIONS = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}

# 3x5 glyphs, rows top to bottom, '#' = ink.
FONT: dict[str, tuple[str, ...]] = {
    "0": ("###", "#.#", "#.#", "#.#", "###"), "1": (".#.", "##.", ".#.", ".#.", "###"),
    "2": ("###", "..#", "###", "#..", "###"), "3": ("###", "..#", ".##", "..#", "###"),
    "4": ("#.#", "#.#", "###", "..#", "..#"), "5": ("###", "#..", "###", "..#", "###"),
    "6": ("###", "#..", "###", "#.#", "###"), "7": ("###", "..#", ".#.", ".#.", ".#."),
    "8": ("###", "#.#", "###", "#.#", "###"), "9": ("###", "#.#", "###", "..#", "###"),
    "A": (".#.", "#.#", "###", "#.#", "#.#"), "C": ("###", "#..", "#..", "#..", "###"),
    "E": ("###", "#..", "##.", "#..", "###"), "F": ("###", "#..", "##.", "#..", "#.."),
    "H": ("#.#", "#.#", "###", "#.#", "#.#"), "L": ("#..", "#..", "#..", "#..", "###"),
    "P": ("###", "#.#", "###", "#..", "#.."), "U": ("#.#", "#.#", "#.#", "#.#", "###"),
}
ALPHABET = "".join(FONT)
GLYPH_SCALE = 2
TEXT_COLOR = (235, 235, 235)


@dataclass(frozen=True)
class Label:
    """A rendered label: its text and the board cell of its first character pair (it runs rightwards)."""

    row: int
    col: int
    text: str

    def cells(self) -> list[tuple[int, int]]:
        return [(self.row, self.col + k) for k in range((len(self.text) + 1) // 2)]


@dataclass(frozen=True)
class HardSample:
    """One question about one board; the image is rendered on demand from ``objects`` and ``label``."""

    id: str
    objects: tuple[ShapeObject, ...]
    label: Label | None
    question: str
    answer: str
    question_type: str
    seed: tuple[int, int]
    grid: int = GRID
    cell_px: int = CELL_PX

    def render(self) -> Image.Image:
        """Draw the board (deterministic: size, offset and tint come from the sample's own seed)."""
        return render_board(self.objects, self.label, self.seed)

    def caption(self) -> str:
        """A text-only description of the board (for text-only calibration samples)."""
        parts = [f"{_article(o.color).capitalize()} {o.color} {o.shape} is in row {o.row + 1}, column {o.col + 1}."
                 for o in self.objects]
        label = f" A label reads {self.label.text}." if self.label else ""
        n = len(self.objects)
        return f"There {'is' if n == 1 else 'are'} {n} shape{'s' * (n > 1)}. " + " ".join(parts) + label


def _tint(rng: np.random.Generator, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-TINT, TINT + 1), 0, 255)) for c in rgb)  # type: ignore[return-value]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x0, y1), (x1, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "cross":
        w = max(2, (x1 - x0 + 1) // 3)
        ix, iy = int(cx) - w // 2, int(cy) - w // 2
        draw.rectangle((ix, y0, ix + w - 1, y1), fill=fill)
        draw.rectangle((x0, iy, x1, iy + w - 1), fill=fill)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(f"unknown shape {shape!r}")


def _draw_text(draw: ImageDraw.ImageDraw, label: Label, dy: int) -> None:
    s = GLYPH_SCALE
    for k, ch in enumerate(label.text):
        x = (label.col + k // 2) * CELL_PX + 1 + (k % 2) * (4 * s)
        y = label.row * CELL_PX + dy
        for r, bits in enumerate(FONT[ch]):
            for c, bit in enumerate(bits):
                if bit == "#":
                    draw.rectangle((x + c * s, y + r * s, x + c * s + s - 1, y + r * s + s - 1), fill=TEXT_COLOR)


def render_board(objects: tuple[ShapeObject, ...], label: Label | None, seed: tuple[int, int]) -> Image.Image:
    """Render objects (and the label) on a dark board."""
    rng = np.random.default_rng([*seed, 7])
    size = GRID * CELL_PX
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in objects:
        extent = int(rng.integers(int(CELL_PX * 0.45), int(CELL_PX * 0.8) + 1))
        slack = CELL_PX - extent
        x0 = obj.col * CELL_PX + int(rng.integers(0, slack + 1))
        y0 = obj.row * CELL_PX + int(rng.integers(0, slack + 1))
        _draw_shape(draw, obj.shape, (x0, y0, x0 + extent - 1, y0 + extent - 1), _tint(rng, COLORS[obj.color]))
    if label is not None:
        _draw_text(draw, label, int(rng.integers(1, CELL_PX - 5 * GLYPH_SCALE)))
    return img


def _board(rng: np.random.Generator, n: int, with_label: bool) -> tuple[tuple[ShapeObject, ...], Label | None]:
    label = None
    free = set(range(GRID * GRID))
    if with_label:
        length = int(rng.integers(2, 5))
        width = (length + 1) // 2
        row, col = int(rng.integers(GRID)), int(rng.integers(GRID - width + 1))
        label = Label(row, col, "".join(ALPHABET[int(i)] for i in rng.integers(len(ALPHABET), size=length)))
        free -= {r * GRID + c for r, c in label.cells()}
    cells = rng.choice(sorted(free), size=n, replace=False)
    colors = rng.choice(len(COLORS), size=n, replace=False)
    names = list(COLORS)
    objects = tuple(ShapeObject(int(c) // GRID, int(c) % GRID, names[int(k)], SHAPES[int(rng.integers(len(SHAPES)))])
                    for c, k in zip(cells, colors))
    return objects, label


def _unique_shape(objects: tuple[ShapeObject, ...], target: ShapeObject) -> tuple[ShapeObject, ...]:
    """Re-draw the other objects' shapes so ``target``'s shape is unique (keeps cells and colours)."""
    others = [s for s in SHAPES if s != target.shape]
    return tuple(o if o is target or o.shape != target.shape else
                 ShapeObject(o.row, o.col, o.color, others[(o.row * GRID + o.col) % len(others)]) for o in objects)


def _neighbour(objects: tuple[ShapeObject, ...], anchor: ShapeObject, step: tuple[int, int]) -> ShapeObject | None:
    """The nearest object from ``anchor`` along its row/column in direction ``step``."""
    dr, dc = step
    line = [o for o in objects if o is not anchor and ((dr == 0 and o.row == anchor.row) or
                                                       (dc == 0 and o.col == anchor.col))]
    ahead = [o for o in line if (o.col - anchor.col) * dc > 0 or (o.row - anchor.row) * dr > 0]
    return min(ahead, key=lambda o: abs(o.col - anchor.col) + abs(o.row - anchor.row), default=None)


# Each question type's wording and answer, in one place for the sample's own question and the extra ones.
def _ask_color(target: ShapeObject) -> tuple[str, str]:
    return f"What color is the {target.shape}?", target.color


def _ask_shape(target: ShapeObject) -> tuple[str, str]:
    return f"What shape is the {target.color} object?", target.shape


def _ask_count(objects: tuple[ShapeObject, ...]) -> tuple[str, str]:
    return "How many shapes are there?", str(len(objects))


def _ask_text(label: Label) -> tuple[str, str]:
    return "What does the label say?", label.text


def _ask_relation(anchor: ShapeObject, direction: str, target: ShapeObject, by_shape: bool) -> tuple[str, str]:
    """Name the anchor by its shape (must be unique) and ask the target's colour, or by its colour and ask the
    target's shape."""
    if by_shape:
        return f"What color is the shape {direction} the {anchor.shape}?", target.color
    return f"What shape is {direction} the {anchor.color} object?", target.shape


def relation_target(sample) -> ShapeObject | None:
    """The object a relation question asks about (None for other questions): its anchor found by the
    colour or shape the question names, then the nearest object in the named direction."""
    if sample.question_type != "relation":
        return None
    q = sample.question
    direction = next(d for d in DIRECTIONS if f" {d} the " in q)
    named = q.rsplit(" the ", 1)[1].rstrip("?").removesuffix(" object")
    anchors = [o for o in sample.objects if named in (o.color, o.shape)]
    if len(anchors) != 1:
        raise ValueError(f"{sample.id}: relation anchor {named!r} is not unique")
    return _neighbour(sample.objects, anchors[0], DIRECTIONS[direction])


def _relation(rng: np.random.Generator, objects: tuple[ShapeObject, ...]):
    """A (question, answer, objects) relation triple, or None when no object has a neighbour in line."""
    pairs = [(a, d, t) for a in objects for d, step in DIRECTIONS.items() if (t := _neighbour(objects, a, step))]
    if not pairs:
        return None
    anchor, direction, target = pairs[int(rng.integers(len(pairs)))]
    if rng.random() < 0.5:  # name the anchor by its (unique) colour, ask the target's shape
        return (*_ask_relation(anchor, direction, target, by_shape=False), objects)
    objects = _unique_shape(objects, anchor)
    return (*_ask_relation(anchor, direction, target, by_shape=True), objects)


def _exist(rng: np.random.Generator, objects: tuple[ShapeObject, ...]) -> tuple[str, str]:
    target = objects[int(rng.integers(len(objects)))]
    if rng.random() < 0.5:
        color, shape, answer = target.color, target.shape, "yes"
    else:
        present = {(o.color, o.shape) for o in objects}
        near = [(NEAR_SHADES[o.color], o.shape) for o in objects if o.color in NEAR_SHADES]
        adversarial = [(o.color, p.shape) for o in objects for p in objects] + near
        options = [cs for cs in adversarial if cs not in present]
        if options and rng.random() < 2 / 3:  # adversarial: colour and shape (or a near shade) are on the board
            color, shape = options[int(rng.integers(len(options)))]
        else:
            pool = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
            color, shape = pool[int(rng.integers(len(pool)))]
        answer = "no"
    return f"Is there {_article(color)} {color} {shape}?", answer


def make_sample(split: str, index: int) -> HardSample:
    """The ``index``-th sample of ``split`` (question types cycle so every type is equally frequent)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown shapes-VQA-hard split {split!r}; expected one of {sorted(SPLIT_SEEDS)}")
    seed = (SPLIT_SEEDS[split], index)
    rng = np.random.default_rng(list(seed))
    qtype = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    while True:  # a relation needs two objects in line; redraw the board until it has them (seeded)
        n = int(rng.integers(1, MAX_COUNT + 1)) if qtype == "count" else int(rng.integers(
            2 if qtype == "relation" else 1, MAX_OBJECTS + 1))
        objects, label = _board(rng, n, with_label=qtype == "text" or rng.random() < 0.5)
        if qtype != "relation" or (rel := _relation(rng, objects)) is not None:
            break
    if qtype == "color":
        target = objects[int(rng.integers(n))]
        objects = _unique_shape(objects, target)
        question, answer = _ask_color(target)
    elif qtype == "shape":
        target = objects[int(rng.integers(n))]
        question, answer = _ask_shape(target)
    elif qtype == "count":
        question, answer = _ask_count(objects)
    elif qtype == "exist":
        question, answer = _exist(rng, objects)
    elif qtype == "relation":
        question, answer, objects = rel
    else:
        assert label is not None
        question, answer = _ask_text(label)
    return HardSample(f"hard-{split}-{index:06d}", objects, label, question, answer, qtype, seed)


def more_questions(sample: HardSample, k: int) -> list[tuple[str, str, str]]:
    """Up to ``k`` more ``(question, answer, type)`` about ``sample``'s board as it is, of other types than its
    own (seeded by the sample). The training script packs them into one conversation after the sample's own
    question, so one image supervises several answers; the board is never redrawn, so a type the board cannot
    ask (no label, no unique shape, no two objects in line) is skipped."""
    rng = np.random.default_rng([*sample.seed, 8])
    objects, label = sample.objects, sample.label
    counts = Counter(o.shape for o in objects)
    unique = [o for o in objects if counts[o.shape] == 1]

    def relation():
        pairs = [(a, d, t) for a in objects for d, step in DIRECTIONS.items() if (t := _neighbour(objects, a, step))]
        if not pairs:
            return None
        anchor, direction, target = pairs[int(rng.integers(len(pairs)))]
        return _ask_relation(anchor, direction, target, by_shape=counts[anchor.shape] == 1 and rng.random() < 0.5)

    makers = {"color": lambda: _ask_color(unique[int(rng.integers(len(unique)))]) if unique else None,
              "shape": lambda: _ask_shape(objects[int(rng.integers(len(objects)))]),
              "count": lambda: _ask_count(objects), "exist": lambda: _exist(rng, objects), "relation": relation,
              "text": lambda: _ask_text(label) if label else None}
    out: list[tuple[str, str, str]] = []
    for qtype in (QUESTION_TYPES[int(i)] for i in rng.permutation(len(QUESTION_TYPES))):
        if len(out) == k:
            break
        if qtype != sample.question_type and (qa := makers[qtype]()) is not None:
            out.append((*qa, qtype))
    return out
