"""End to end on a small toy checkpoint: artifacts, resume after SIGKILL (byte-identical), invalidation."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from quantlab.pipeline import run_all
from quantlab.toys.build import build_toy

RECIPE = {
    "name": "test-luq",
    "calibration": {"num_samples": 6, "alpha": 0.5, "max_tokens": 128, "seed": 0},
    "stats": {"entropy_k": 4, "entropy_max_tokens": 256},
    "plan": {"planner": "luq", "k": 3,
             "low": {"backend": "billm", "bits": 1, "group_size": 128},
             "high": {"backend": "gptq", "bits": 4, "group_size": 128},
             "rules": [{"match": "component:vision", "scheme": None}, {"match": "component:head", "scheme": None}]},
    "eval": {"limit": 10, "batch_size": 10},
}


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("toy")
    model, processor = build_toy("toy-llava")
    model.save_pretrained(d)
    processor.save_pretrained(d)
    return d


def _recipe(tmp_path: Path, **plan) -> Path:
    r = json.loads(json.dumps(RECIPE))
    r["plan"].update(plan)
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_run_leaves_every_artifact(toy_dir, tmp_path):
    out = tmp_path / "run"
    summary = run_all(str(toy_dir), _recipe(tmp_path), out, progress=False, say=lambda m: None)
    for rel in ("recipe.yaml", "state.json", "stats/stats.safetensors", "stats/summary.json", "stats/entropy.png",
                "plan.yaml", "quant/block_007.safetensors", "model/quantlab.json", "model/README.md",
                "model/plan.yaml", "eval/baseline.json", "eval/quantized.json", "report.md", "report.json",
                "run.log"):
        assert (out / rel).exists(), rel
    logged = (out / "run.log").read_text()
    for line in ("quantlab run: model", "[1/6] calibrate", "[3/6] quantize", "[6/6] report", "done: "):
        assert line in logged, line
    plan = yaml.safe_load((out / "plan.yaml").read_text())
    backends = [s["backend"] for s in plan["layers"].values() if s]
    assert backends.count("billm") == 3 * 7 and backends.count("gptq") == 5 * 7
    for key in ("baseline", "quantized"):
        assert summary["eval"][key].tasks["shapes-vqa"].n == 10
    # every stage's peak host memory was measured beside its forecast, and the two agree within 15%
    assert "memory forecast (peak of each stage)" in logged
    stage_memory = json.loads((out / "report.json").read_text())["stage_memory"]
    assert set(stage_memory) == {"calibrate", "plan", "quantize", "export", "eval"}
    for stage in ("calibrate", "plan", "quantize", "export"):
        m = stage_memory[stage]
        assert 0.85 <= m["peak_bytes"] / m["forecast_bytes"] <= 1.15, (stage, m)
    assert "Host memory of the run, by stage" in (out / "report.md").read_text()


def test_changed_recipe_invalidates_downstream(toy_dir, tmp_path):
    out = tmp_path / "run"
    run_all(str(toy_dir), _recipe(tmp_path), out, progress=False, say=lambda m: None, stop_after="export")
    first = _sha(out / "model" / "quantized.safetensors")
    stats_mtime = (out / "stats" / "stats.safetensors").stat().st_mtime
    said: list[str] = []
    run_all(str(toy_dir), _recipe(tmp_path, k=5), out, progress=False, say=said.append, stop_after="export")
    assert any("plan: inputs changed since the last run" in m for m in said), said  # the user is told
    assert "WARNING quantlab.pipeline.rundir: plan: inputs changed" in (out / "run.log").read_text()  # and it is logged
    assert (out / "stats" / "stats.safetensors").stat().st_mtime == stats_mtime  # calibration reused
    assert _sha(out / "model" / "quantized.safetensors") != first
    plan = yaml.safe_load((out / "plan.yaml").read_text())
    assert sum(1 for s in plan["layers"].values() if s and s["backend"] == "billm") == 5 * 7


def test_refuses_foreign_directory(toy_dir, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a quantlab run directory"):
        run_all(str(toy_dir), _recipe(tmp_path), tmp_path / "busy", progress=False, say=lambda m: None)
    assert (tmp_path / "busy" / "precious.txt").read_text() == "keep me"


def _run_code(toy_dir: Path, recipe: Path, out: Path, *, say: str = "lambda m: None",
              stop_after: str = "export") -> list[str]:
    code = (f"from quantlab.pipeline import run_all; run_all({str(toy_dir)!r}, {str(recipe)!r}, {str(out)!r}, "
            f"progress=False, say={say}, stop_after={stop_after!r})")
    return [sys.executable, "-c", code]


@pytest.mark.slow
def test_sigkill_during_quantize_resumes_byte_identical(toy_dir, tmp_path):
    # Every run is its own process, as the CLI runs are: the uninterrupted reference, the killed run and the
    # resumed run (so the comparison does not depend on what earlier tests left in this process).
    recipe = _recipe(tmp_path)
    ref = tmp_path / "ref"
    subprocess.run(_run_code(toy_dir, recipe, ref), check=True, capture_output=True, timeout=900)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_run_code(toy_dir, recipe, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (out / "quant" / "block_002.safetensors").exists():
        assert proc.poll() is None, "the run finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "model").exists()
    done = sorted(p.name for p in (out / "quant").glob("block_*.safetensors"))
    assert "block_007.safetensors" not in done, done
    first_block = (out / "quant" / "block_000.safetensors").stat().st_mtime_ns
    env = json.loads((out / "quant" / "compute.json").read_text())
    assert env["device"] == "cpu" and env["threads"] >= 1
    other = tmp_path / "other-threads"  # the same partial run, "computed" with another thread count
    shutil.copytree(out, other)
    (other / "quant" / "compute.json").write_text(json.dumps({**env, "threads": env["threads"] + 7}))
    said = subprocess.run(_run_code(toy_dir, recipe, other, say="print", stop_after="quantize"), check=True,
                          capture_output=True, text=True, timeout=900).stdout
    assert f"threads {env['threads'] + 7} -> {env['threads']}" in said and "not byte-identical" in said, said
    said = subprocess.run(_run_code(toy_dir, recipe, out, say="print"), check=True, capture_output=True, text=True,
                          timeout=900).stdout
    assert "resuming" in said and "not byte-identical" not in said, said
    assert (out / "quant" / "block_000.safetensors").stat().st_mtime_ns == first_block  # resumed, not redone
    for f in ("model.safetensors", "quantized.safetensors"):
        assert _sha(out / "model" / f) == _sha(ref / "model" / f), f


def test_streamed_run_is_byte_identical(toy_dir, tmp_path):
    ref, out = tmp_path / "memory", tmp_path / "stream"
    run_all(str(toy_dir), _recipe(tmp_path), ref, progress=False, say=lambda m: None, stop_after="export")
    run_all(str(toy_dir), _recipe(tmp_path), out, progress=False, say=lambda m: None, stop_after="export",
            stream=True)
    for f in ("stats/stats.safetensors", "plan.yaml", "model/model.safetensors", "model/quantized.safetensors"):
        assert _sha(out / f) == _sha(ref / f), f
    assert ", streamed" in (out / "run.log").read_text()
    said: list[str] = []
    summary = run_all(str(toy_dir), _recipe(tmp_path), out, progress=False, say=said.append, stream=True,
                      overrides={"eval.tasks": []})  # nothing evaluated, nothing loaded whole
    assert "quantize: up to date, reading quant/ block by block" in said  # no pass through the decoder
    assert (out / "report.md").is_file() and summary["eval"]["quantized"].tasks == {}
    quantized = json.loads((out / "report.json").read_text())["memory"]["quantized"]
    assert quantized["runtime_peak_bytes"] is None and "streamed run" in quantized["runtime_note"]


def test_streamed_run_refuses_the_budget_planner(toy_dir, tmp_path):
    recipe = _recipe(tmp_path, planner="budget", k=None, candidates=[{"backend": "gptq", "bits": 4, "group_size": 128}],
                     target_avg_bits=4.2)
    with pytest.raises(ValueError, match="budget planner measures .* without --stream"):
        run_all(str(toy_dir), recipe, tmp_path / "run", progress=False, say=lambda m: None, stream=True,
                stop_after="plan")


def test_measured_image_weight_resolves_per_block_from_calibration(toy_dir, tmp_path):
    """``image_weight: measured``: calibration records MBQ's per-block gradient ratios, the plan writes each
    layer's number (the ratio floored at the median); tests/test_apply.py checks that quantize solves against
    the weighting a plan gives."""
    from quantlab.calib.artifact import CalibrationStats
    from quantlab.calib.modality_grad import median_floor

    out = tmp_path / "run"
    scheme = {"backend": "gptq", "bits": 4, "group_size": 128, "args": {"image_weight": "measured"}}
    run_all(str(toy_dir), _recipe(tmp_path, planner="uniform", scheme=scheme), out, progress=False,
            say=lambda m: None, stop_after="plan")
    ratios = CalibrationStats.load(out / "stats").meta["modality_gradient_ratio"]
    assert len(ratios) == 8 and all(r > 0 for r in ratios) and len(set(ratios)) > 1
    expected = median_floor(ratios)
    plan = yaml.safe_load((out / "plan.yaml").read_text())
    assert plan["info"]["image_weight"]["blocks"] == {str(i): round(w, 6) for i, w in enumerate(expected)}
    for name, s in plan["layers"].items():
        if s is not None:
            block = int(name.split(".layers.")[1].split(".")[0])
            assert s["args"]["image_weight"] == round(expected[block], 6), name
