"""The memory forecast: printed before any work, refused with a remedy when a stage will not fit, and close to
what the stages measure (the 3B / 7B comparisons are eval/bench/full_size.py's)."""

from __future__ import annotations

from typer.testing import CliRunner

import quantlab.pipeline.forecast as fc
from quantlab.cli import app
from quantlab.pipeline.preflight import preflight
from quantlab.recipe import Recipe
from tests.test_bad_inputs import refused

runner = CliRunner()


def test_forecast_command_prints_every_stage():
    res = runner.invoke(app, ["forecast", "toy-llava", "--recipe", "w4a16", "--set", "eval.tasks=[]"])
    assert res.exit_code == 0, res.output
    for stage in ("calibrate", "plan", "quantize", "export"):
        assert stage in res.output
    assert "eval" not in res.output.split("\n", 1)[1]  # no tasks: no evaluation stage


def test_a_run_that_will_not_fit_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(fc, "host_budget", lambda: 64 << 20)
    out = tmp_path / "run"
    res = runner.invoke(app, ["quantize", "toy-llava", "--recipe", "w4a16", "--out", str(out)])
    refused(res, "memory:", "forecast to need", "GiB available", "fix: try")
    assert not out.exists()
    res = runner.invoke(app, ["forecast", "toy-llava", "--recipe", "w4a16"])
    refused(res, "memory:", "forecast to need")


def test_terms_follow_the_flags_and_the_recipe():
    """Streaming holds less than the whole model; more samples and tokens cost more; a device takes the
    solver and the activations off the host."""
    recipe = Recipe.from_yaml("recipes/w4a16.yaml", {"eval.tasks": []})
    skeleton = preflight("toy-qwen2.5-vl", recipe)

    def by_stage(**kw):
        return {f.stage: f for f in fc.forecast_run(skeleton, "toy-qwen2.5-vl", kw.pop("recipe", recipe),
                                                     base_rss=0, **kw)}
    memory, streamed = by_stage(stream=False, device=None), by_stage(stream=True, device=None)
    assert streamed["quantize"].terms["weights"] < memory["quantize"].terms["weights"]
    more = Recipe.from_yaml("recipes/w4a16.yaml", {"eval.tasks": [], "calibration.num_samples": 256})
    bigger = by_stage(stream=False, device=None, recipe=more)
    assert bigger["calibrate"].host > memory["calibrate"].host
    assert bigger["quantize"].terms["samples"] == memory["quantize"].terms["samples"] * 256 // 64
    # tokens: the probe samples' length (shorter than the cap here), or the cap when it cuts them
    d = skeleton.model.config.get_text_config().hidden_size
    cut = by_stage(stream=False, device=None, recipe=Recipe.from_yaml(
        "recipes/w4a16.yaml", {"eval.tasks": [], "calibration.max_tokens": 16}))
    assert cut["quantize"].terms["samples"] == 2 * 64 * 16 * d * 4  # toys compute in float32
    assert memory["quantize"].terms["samples"] > cut["quantize"].terms["samples"]
    ondevice = by_stage(stream=False, device="cuda")
    assert "solver" not in ondevice["quantize"].terms and ondevice["quantize"].device > 0
    assert ondevice["quantize"].host < memory["quantize"].host
    assert memory["quantize"].device is None
    assert list(memory) == ["calibrate", "plan", "quantize", "export"]


def test_a_streamed_bf16_checkpoint_is_forecast_in_its_compute_dtype(tmp_path, monkeypatch):
    """On a CPU without bf16 instructions a streamed bf16 checkpoint computes in float32: activations and
    block weights count 4 bytes a value; the export still reads the stored 2-byte tensors."""
    import torch

    import quantlab.core.device as device_mod
    from quantlab.models.load import load_model
    from tests.conftest import tiny_llava

    tiny_llava().to(torch.bfloat16).save_pretrained(tmp_path)
    skeleton = load_model(str(tmp_path), weights=False)
    recipe = Recipe.from_yaml("recipes/w4a16.yaml", {"eval.tasks": []})

    def by_stage(flags):
        monkeypatch.setattr(device_mod, "cpu_flags", lambda: flags)
        return {f.stage: f for f in fc.forecast_run(skeleton, str(tmp_path), recipe, stream=True, device=None,
                                                     base_rss=0)}
    emulated, native = by_stage(frozenset({"avx2"})), by_stage(frozenset({"amx_bf16"}))
    for term in ("samples", "block_weights"):
        assert emulated["quantize"].terms[term] == 2 * native["quantize"].terms[term], term
    assert emulated["calibrate"].terms["block"] == 2 * native["calibrate"].terms["block"]
    for term in ("tensor", "codes"):  # read as stored, and one byte a weight, whatever the compute dtype
        assert emulated["export"].terms.get(term) == native["export"].terms.get(term), term
