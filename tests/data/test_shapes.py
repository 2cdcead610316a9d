"""shapes-VQA generator: determinism, unambiguous questions, balance, on-disk format."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from quantlab.data import shapes
from quantlab.data.synthetic import write_set_split


def test_same_index_same_sample_and_pixels():
    a, b = shapes.make_sample("test", 17), shapes.make_sample("test", 17)
    assert a == b
    assert np.array_equal(np.asarray(a.render()), np.asarray(b.render()))


def test_splits_are_disjoint_streams():
    train = [shapes.make_sample("train", i) for i in range(50)]
    test = [shapes.make_sample("test", i) for i in range(50)]
    assert sum(t.objects == s.objects for t, s in zip(train, test)) < 5


def test_objects_have_unique_colors_and_shapes():
    for s in shapes.iter_samples("train", 300):
        assert 1 <= len(s.objects) <= 4
        assert len({o.color for o in s.objects}) == len(s.objects)
        assert len({o.shape for o in s.objects}) == len(s.objects)
        assert len({(o.row, o.col) for o in s.objects}) == len(s.objects)


def test_answers_are_correct_for_the_scene():
    for s in shapes.iter_samples("calibration", 400):
        objs = s.objects
        if s.question_type == "count":
            assert s.answer == str(len(objs))
        elif s.question_type == "color":
            shape = s.question.split()[-1].rstrip("?")
            assert [o.color for o in objs if o.shape == shape] == [s.answer]
        elif s.question_type == "shape":
            color = s.question.split()[-2]
            assert [o.shape for o in objs if o.color == color] == [s.answer]
        elif s.question_type == "exist":
            color, shape = s.question.rstrip("?").split()[-2:]
            assert s.answer == ("yes" if any(o.color == color and o.shape == shape for o in objs) else "no")
        elif s.question_type == "position":
            words = s.question.split()
            color, shape = words[2], words[3]
            (o,) = [o for o in objs if o.color == color and o.shape == shape]
            expected = {"left": o.col < 2, "right": o.col >= 2, "top": o.row < 2, "bottom": o.row >= 2}
            assert expected[s.answer]
        assert s.answer in [*shapes.COLORS, *shapes.SHAPES, "1", "2", "3", "4", "yes", "no", "left", "right",
                            "top", "bottom"]


def test_types_and_yes_no_are_balanced():
    samples = list(shapes.iter_samples("train", 2000))
    types = Counter(s.question_type for s in samples)
    assert set(types) == set(shapes.QUESTION_TYPES) and max(types.values()) - min(types.values()) <= 1
    yn = Counter(s.answer for s in samples if s.question_type == "exist")
    assert abs(yn["yes"] - yn["no"]) < 0.1 * sum(yn.values())


def test_render_draws_each_object_in_its_cell():
    s = shapes.make_sample("test", 3)
    img = np.asarray(s.render())
    for o in s.objects:
        cell = img[o.row * 16:(o.row + 1) * 16, o.col * 16:(o.col + 1) * 16]
        assert (np.abs(cell.astype(int) - shapes.COLORS[o.color]).sum(-1) == 0).sum() > 10


def test_write_split_jsonl_and_pngs(tmp_path):
    d = write_set_split(tmp_path, "shapes-vqa", "test", 12)
    lines = [json.loads(x) for x in (d / "questions.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and all((d / r["image"]).is_file() for r in lines)
    assert lines[0]["answers"] == [lines[0]["answer"]] * 10
    with pytest.raises(FileExistsError):
        write_set_split(tmp_path, "shapes-vqa", "test", 3)


def test_unknown_split_is_an_error():
    with pytest.raises(ValueError, match="unknown shapes-VQA split"):
        shapes.make_sample("val", 0)
