"""The command line, in process (typer's CliRunner): models, and `quantlab plan MODEL` without weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from quantlab.cli import app
from quantlab.plan.plan import Plan

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT.parent / "shared" / "configs"
runner = CliRunner()


def test_models_lists_families_and_aliases():
    res = runner.invoke(app, ["models"])
    assert res.exit_code == 0, res.output
    for word in ("llava", "qwen2_vl", "qwen2_5_vl", "toy-llava", "toy-qwen2.5-vl"):
        assert word in res.output


def test_plan_real_config_without_weights(tmp_path):
    cfg = CONFIGS / "llava-1.5-7b-hf.json"
    if not cfg.is_file():
        pytest.skip(f"{cfg} not present (shared/ is beside the repository in CI)")
    out = tmp_path / "plan.yaml"
    res = runner.invoke(app, ["plan", str(cfg), "--recipe", str(ROOT / "recipes" / "w2a16-g64.yaml"),
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = yaml.safe_load(out.read_text())
    assert data["total_predicted_bytes"] > 0 and data["avg_bits"] == pytest.approx(2.25)
    plan = Plan.from_yaml(out)
    assert plan.predicted_bytes == data["total_predicted_bytes"]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "saving vs fp16" in res.output and "vs uniform W4 g128" in res.output
    again = runner.invoke(app, ["plan", str(cfg), "--recipe", str(ROOT / "recipes" / "w2a16-g64.yaml"),
                                "--out", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output  # a user error


def test_plan_luq_from_saved_stats_and_budget_flag(tmp_path):
    """luq on toy-llava with statistics from `quantlab calibrate`, k chosen for --budget-gb."""
    stats = tmp_path / "stats"
    recipe = ROOT / "recipes" / "luq.yaml"
    res = runner.invoke(app, ["calibrate", "toy-llava", "--recipe", str(recipe), "--out", str(stats),
                              "--set", "calibration.num_samples=8"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "plan.yaml"
    res = runner.invoke(app, ["plan", "toy-llava", "--recipe", str(recipe), "--stats", str(stats),
                              "--budget-gb", "0.0020", "--out", str(out)])
    assert res.exit_code == 0, res.output
    plan = Plan.from_yaml(out)
    assert plan.predicted_bytes <= 2_000_000 and plan.info["luq"]["k"] >= 1
    assert "H image" in res.output


def test_plan_model_mode_needs_recipe_and_out(tmp_path):
    res = runner.invoke(app, ["plan", "toy-llava"])
    assert res.exit_code == 2 and "--recipe and --out" in res.output


@pytest.mark.parametrize("command", ["quantize", "calibrate"])
def test_bad_device_fails_before_anything_is_written(tmp_path, command):
    out = tmp_path / "run"
    res = runner.invoke(app, [command, "toy-llava", "--recipe", str(ROOT / "recipes" / "luq.yaml"),
                              "--out", str(out), "--device", "tpu:0"])
    assert res.exit_code == 2, res.output
    assert "--device" in res.output and "'tpu:0'" in res.output
    assert not out.exists()


def test_calibrate_stream_equals_in_memory(tmp_path):
    recipe = str(ROOT / "recipes" / "luq.yaml")
    args = ["--recipe", recipe, "--set", "calibration.num_samples=8", "--set", "stats.entropy_k=8"]
    for name, extra in (("memory", []), ("stream", ["--stream"])):
        res = runner.invoke(app, ["calibrate", "toy-llava", *args, "--out", str(tmp_path / name), *extra])
        assert res.exit_code == 0, res.output
    a, b = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("memory", "stream"))
    assert len(a["blocks"]) == 8 and a["blocks"] == b["blocks"]  # every per-block statistic, to the last digit
