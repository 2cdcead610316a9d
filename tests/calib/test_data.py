"""Calibration data: alpha mix, determinism, image masks, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from quantlab.calib.data import CalibDataOptions, CalibSource, build_calibration_set
from quantlab.models import get_adapter
from quantlab.models.load import LoadedModel
from quantlab.toys.build import build_toy


@pytest.fixture(scope="module", params=["toy-llava", "toy-qwen2.5-vl"])
def toy(request):
    model, processor = build_toy(request.param)
    return LoadedModel(model, processor, get_adapter(model), request.param)


def test_alpha_mix_and_masks(toy):
    cs = build_calibration_set(toy, CalibDataOptions(num_samples=8, alpha=0.75))
    assert (cs.n_image, cs.n_text) == (6, 2)
    image_id = toy.adapter.image_token_id(toy.config)
    for s in cs.samples:
        assert torch.equal(s.image_mask, s.inputs["input_ids"][0] == image_id)
        assert int(s.image_mask.sum()) == (16 if s.has_image else 0)
    with torch.no_grad():
        toy.model(**cs.samples[0].inputs)  # the processor output is what the model accepts


def test_same_options_same_samples(toy):
    a = build_calibration_set(toy, CalibDataOptions(num_samples=6, alpha=0.5, seed=3))
    b = build_calibration_set(toy, CalibDataOptions(num_samples=6, alpha=0.5, seed=3))
    c = build_calibration_set(toy, CalibDataOptions(num_samples=6, alpha=0.5, seed=4))
    assert [s.id for s in a.samples] == [s.id for s in b.samples]
    for x, y in zip(a.samples, b.samples):
        assert all(torch.equal(x.inputs[k], y.inputs[k]) for k in x.inputs)
    assert [s.id for s in a.samples] != [s.id for s in c.samples]


def test_jsonl_source_skips_corrupt_images(toy, tmp_path):
    from quantlab.data import shapes

    shapes.make_sample("test", 0).render().save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    rows = [{"image": "ok.png", "prompt": "What color is the circle?"}, {"image": "bad.png", "prompt": "x"}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    opts = CalibDataOptions(num_samples=2, alpha=1.0, image_sources=[CalibSource(kind="jsonl", path=str(tmp_path / "data.jsonl"))])
    cs = build_calibration_set(toy, opts)
    assert cs.n_image == 1 and cs.skipped["unreadable_image"] == 1


def test_no_image_left_is_an_error(toy, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"garbage")
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "bad.png"}))
    opts = CalibDataOptions(num_samples=2, alpha=1.0, image_sources=[CalibSource(kind="jsonl", path=str(tmp_path / "d.jsonl"))])
    with pytest.raises(ValueError, match="no image sample survived"):
        build_calibration_set(toy, opts)


def test_missing_path_and_bad_line_are_named(toy, tmp_path):
    opts = CalibDataOptions(num_samples=2, alpha=1.0, image_sources=[CalibSource(kind="jsonl", path=str(tmp_path / "nope.jsonl"))])
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        build_calibration_set(toy, opts)
    (tmp_path / "d.jsonl").write_text('{"image": "a.png"}\n{broken\n')
    opts = CalibDataOptions(num_samples=2, alpha=1.0, image_sources=[CalibSource(kind="jsonl", path=str(tmp_path / "d.jsonl"))])
    with pytest.raises(ValueError, match=r"d.jsonl:2"):
        build_calibration_set(toy, opts)


def test_long_samples_truncated_without_cutting_images(toy, tmp_path):
    long_text = " ".join(["red circle"] * 200)
    (tmp_path / "t.txt").write_text(long_text)
    opts = CalibDataOptions(num_samples=1, alpha=0.0, max_tokens=40, text_sources=[CalibSource(kind="text", path=str(tmp_path / "t.txt"))])
    cs = build_calibration_set(toy, opts)
    assert cs.samples[0].inputs["input_ids"].shape[1] == 40
    opts = CalibDataOptions(num_samples=2, alpha=1.0, max_tokens=10)
    with pytest.raises(ValueError, match="no image sample survived"):
        build_calibration_set(toy, opts)  # 16 image tokens cannot fit in 10: dropped, not cut
