"""The image-embedding check of a quantized vision tower: the metrics against a hand computation, held-out
images disjoint from calibration's, and the run's report / refusal."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from quantlab.calib.data import CalibDataOptions, build_calibration_set
from quantlab.core.errors import UserError
from quantlab.eval.embeddings import (
    compare_embeddings,
    held_out_images,
    image_embeddings,
)
from quantlab.models import load_model
from quantlab.pipeline import run_all


def test_metrics_match_a_hand_computation():
    torch.manual_seed(0)
    fp = torch.randn(20, 8)
    q = fp + 0.3 * torch.randn(20, 8)
    check = compare_embeddings(fp, q, min_cosine=0.9, n_images=2)
    cos = [sum(a * b for a, b in zip(f.tolist(), g.tolist())) /
           math.sqrt(sum(a * a for a in f.tolist()) * sum(b * b for b in g.tolist())) for f, g in zip(fp, q)]
    rel = math.sqrt(sum((b - a) ** 2 for f, g in zip(fp, q) for a, b in zip(f.tolist(), g.tolist()))) / \
        math.sqrt(sum(a * a for f in fp for a in f.tolist()))
    assert check.cosine_mean == pytest.approx(sum(cos) / len(cos), abs=1e-9)
    assert check.cosine_min == pytest.approx(min(cos), abs=1e-9)
    assert check.rel_error == pytest.approx(rel, abs=1e-9)
    assert check.passed == (sum(cos) / len(cos) >= 0.9)
    assert not compare_embeddings(fp, q, min_cosine=0.9999).passed
    assert compare_embeddings(fp, fp.clone()).cosine_min == pytest.approx(1.0)


def test_held_out_images_are_never_calibration_images():
    loaded = load_model("toy-llava")
    opts = CalibDataOptions(num_samples=12, alpha=0.5, seed=3)
    calibration = {s.id for s in build_calibration_set(loaded, opts).samples if s.has_image}
    held = held_out_images(opts, 10)
    assert len(held) == 10 and calibration and not calibration & {r.id for r in held}
    emb = image_embeddings(loaded, held[:2])
    assert emb.shape == (2 * 16, loaded.model.config.text_config.hidden_size)  # 16 image tokens per board


RECIPE = {
    "name": "vision-w8",
    "calibration": {"num_samples": 4, "alpha": 0.5, "max_tokens": 128, "seed": 0},
    "plan": {"planner": "uniform", "scheme": {"backend": "rtn", "bits": 4, "group_size": 32},
             "rules": [{"match": "component:vision", "scheme": {"backend": "rtn", "bits": 8, "group_size": -1}},
                       {"match": "component:projector", "scheme": None}, {"match": "component:head", "scheme": None}]},
    "export": {"format": "compressed-tensors"},
    "eval": {"tasks": [], "vision_check": {"images": 4}},
}


def test_run_reports_the_check_and_refuses_below_the_threshold(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    said: list[str] = []
    summary = run_all("toy-llava", recipe, tmp_path / "run", progress=False, say=said.append)
    check = json.loads((tmp_path / "run" / "eval" / "vision_check.json").read_text())
    assert check["n_images"] == 4 and check["passed"] and 0.99 < check["cosine_mean"] < 1.0
    assert summary["vision_check"]["cosine_mean"] == check["cosine_mean"]
    assert "## Vision tower: image embeddings vs full precision" in (tmp_path / "run" / "report.md").read_text()
    assert any(m.startswith("vision check:") for m in said)

    strict = json.loads(json.dumps(RECIPE))
    strict["eval"]["vision_check"]["min_cosine"] = 0.99999999
    recipe.write_text(yaml.safe_dump(strict))
    with pytest.raises(UserError, match=r"eval\.vision_check\.min_cosine.*below 0\.99999999"):
        run_all("toy-llava", recipe, tmp_path / "run2", progress=False, say=lambda m: None)
    assert (tmp_path / "run2" / "model" / "config.json").is_file()  # the export stays; no report is written
    assert not (tmp_path / "run2" / "report.md").exists()


def test_a_plan_that_keeps_the_vision_tower_runs_no_check(tmp_path):
    keep = json.loads(json.dumps(RECIPE))
    keep["plan"]["rules"][0]["scheme"] = None
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(keep))
    summary = run_all("toy-llava", tmp_path / "recipe.yaml", tmp_path / "run", progress=False, say=lambda m: None)
    assert "vision_check" not in summary and not (tmp_path / "run" / "eval" / "vision_check.json").exists()
