"""Calibrated quantization of the vision tower and projector (quantlab.quant.vision): each Linear is solved
against the Hessian of its real inputs (checked against a plain forward), GPTQ beats RTN on the image
embeddings, and what cannot run where is refused by name."""

from __future__ import annotations

import pytest
import torch

from quantlab.calib.data import CalibDataOptions, build_calibration_set
from quantlab.models import Component, load_model
from quantlab.quant import vision
from quantlab.quant.apply import quantize
from quantlab.quant.registry import component_problem
from quantlab.quant.scheme import QuantScheme
from tests.test_apply import _setup, linear_inputs

GPTQ = QuantScheme(backend="gptq", bits=4, group_size=-1)


def projector_output(loaded, samples) -> torch.Tensor:
    """The image embeddings (the projector's output) of every image sample, ``(tokens, width)``."""
    from quantlab.models.inputs import encode_images

    store: dict[str, torch.Tensor] = {}
    seen = []
    hook = loaded.adapter.capture_image_features(loaded.model, store)
    try:
        for s in samples:
            if s.has_image:
                encode_images(loaded.model, s.inputs)
                seen.append(store["features"].detach())
    finally:
        hook.remove()
    return torch.cat(seen)


def _vision_plan(loaded, scheme):
    return {n: scheme for comp in (Component.VISION, Component.PROJECTOR)
            for n, _ in loaded.adapter.iter_linears(loaded.model, comp)}


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_each_vision_linear_is_solved_against_its_inputs_hessian(family, monkeypatch):
    loaded, samples = _setup(family)
    plan = _vision_plan(loaded, GPTQ)
    first_block = [n for n in plan if n.startswith(loaded.adapter.vision_blocks + ".0.")][0]
    projector = [n for n in plan if loaded.adapter.component_of(n) == Component.PROJECTOR][0]
    fp_inputs = linear_inputs(loaded, samples, first_block)  # nothing quantized yet: the fp model's inputs
    seen = {}
    real = vision.quantize_module

    def spy(name, module, scheme, hessian):
        seen[name] = hessian.clone()
        return real(name, module, scheme, hessian)

    monkeypatch.setattr(vision, "quantize_module", spy)
    results = quantize(loaded, plan, samples, progress=False)
    assert set(results) == set(plan) == set(seen)
    torch.testing.assert_close(seen[first_block], fp_inputs.T @ fp_inputs / len(fp_inputs), rtol=1e-4, atol=1e-6)
    # the projector's first Linear reads the quantized tower's output, which its own solve does not change
    q_inputs = linear_inputs(loaded, samples, projector)
    torch.testing.assert_close(seen[projector], q_inputs.T @ q_inputs / len(q_inputs), rtol=1e-4, atol=1e-6)
    for n, r in results.items():
        assert torch.equal(dict(loaded.model.named_modules())[n].weight.data, r.dequantized.to(torch.float32))


@pytest.mark.parametrize("name", ["toy-llava", "toy-qwen2.5-vl"])
def test_gptq_moves_the_image_embeddings_less_than_rtn(name):
    from quantlab.eval.embeddings import (
        compare_embeddings,
        held_out_images,
        image_embeddings,
    )

    opts = CalibDataOptions(num_samples=8, alpha=1.0, seed=0)
    fp = load_model(name)
    held = held_out_images(opts, 6)
    reference = image_embeddings(fp, held)
    errors = {}
    for backend in ("rtn", "gptq"):
        loaded = load_model(name)
        samples = build_calibration_set(loaded, opts).samples
        scheme = QuantScheme(backend=backend, bits=3, group_size=-1)
        quantize(loaded, _vision_plan(loaded, scheme), samples, progress=False)
        errors[backend] = compare_embeddings(reference, image_embeddings(loaded, held)).rel_error
    assert errors["gptq"] < 0.9 * errors["rtn"], errors


def test_what_runs_where_is_refused_by_name():
    assert component_problem(GPTQ, Component.VISION) is None
    assert component_problem(GPTQ, Component.PROJECTOR) is None
    assert "needs calibration data" in component_problem(GPTQ, Component.HEAD)
    assert component_problem(QuantScheme(backend="rtn", bits=4, group_size=-1), Component.HEAD) is None
    awq = QuantScheme(backend="gptq", bits=4, group_size=-1, args={"awq": True})
    assert component_problem(awq, Component.VISION) is None  # folds into the vision blocks' norms and Linears
    assert "decoder and vision blocks only" in component_problem(awq, Component.PROJECTOR)
    loaded, samples = _setup("llava")
    with pytest.raises(ValueError, match="lm_head.*needs calibration data"):
        quantize(loaded, {"lm_head": GPTQ}, samples, progress=False)
    text_only = [s for s in samples if not s.has_image]
    with pytest.raises(ValueError, match="image calibration samples"):
        quantize(loaded, _vision_plan(loaded, GPTQ), text_only or [], progress=False)


def test_a_run_quantizes_the_vision_tower_with_gptq_and_exports_it(tmp_path):
    """A recipe rule puts the CLIP tower at GPTQ W8: preflight accepts it, the compressed-tensors export holds
    packed vision Linears, and the loaded export's image embeddings stay within 0.999 cosine of fp."""
    import json

    import yaml
    from safetensors import safe_open

    from quantlab.pipeline import run_all

    recipe = {
        "name": "vision-gptq",
        "calibration": {"num_samples": 6, "alpha": 0.5, "max_tokens": 128, "seed": 0},
        "plan": {"planner": "uniform", "scheme": {"backend": "gptq", "bits": 4, "group_size": 32},
                 "rules": [{"match": "component:vision", "scheme": {"backend": "gptq", "bits": 8, "group_size": -1}},
                           {"match": "component:projector", "scheme": None},
                           {"match": "component:head", "scheme": None}]},
        "export": {"format": "compressed-tensors"},
        "eval": {"tasks": [], "vision_check": {"images": 4, "min_cosine": 0.999}},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    run_all("toy-llava", tmp_path / "r.yaml", tmp_path / "run", progress=False, say=lambda m: None)
    with safe_open(str(tmp_path / "run" / "model" / "model.safetensors"), "pt") as f:
        assert any(k.startswith("vision_tower.") and k.endswith("q_proj.weight_packed") for k in f.keys())
    assert json.loads((tmp_path / "run" / "eval" / "vision_check.json").read_text())["passed"]


@pytest.mark.parametrize(("change", "message"), [
    ({"export": {"format": "gptq"}}, r"gptq format keeps vision-tower and projector Linears unquantized"),
    ({"stream": True}, r"--stream run streams it through the decoder blocks only"),
    ({"vision_args": {"image_weight": 0.5}}, r"args \['image_weight'\] apply to decoder blocks only"),
])
def test_vision_plans_a_run_cannot_carry_out_are_refused_before_any_work(tmp_path, change, message):
    import yaml

    from quantlab.core.errors import UserError
    from quantlab.pipeline import run_all
    from quantlab.toys.build import build_toy

    model, processor = build_toy("toy-llava")  # a local directory: --stream needs one
    model.save_pretrained(tmp_path / "toy")
    processor.save_pretrained(tmp_path / "toy")
    vision = {"backend": "gptq", "bits": 8, "group_size": -1, "args": change.get("vision_args", {})}
    recipe = {"calibration": {"num_samples": 4, "alpha": 0.5},
              "plan": {"planner": "uniform", "scheme": {"backend": "rtn", "bits": 8, "group_size": 32},
                       "rules": [{"match": "component:vision", "scheme": vision},
                                 {"match": "component:projector", "scheme": None},
                                 {"match": "component:head", "scheme": None}]},
              "export": change.get("export", {"format": "compressed-tensors"}), "eval": {"tasks": []}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(UserError, match=message):
        run_all(str(tmp_path / "toy"), tmp_path / "r.yaml", tmp_path / "run", progress=False, say=lambda m: None,
                stream=change.get("stream", False))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_vision_awq_folds_leave_the_fp_tower_unchanged(family):
    """Every vision scale pair folds (norm weight and bias, v_proj rows and bias, up_proj rows) without changing
    the full-precision image embeddings beyond float rounding."""
    from quantlab.quant import awq

    loaded, samples = _setup(family)
    adapter, model = loaded.adapter, loaded.model
    before = projector_output(loaded, samples)
    gen = torch.Generator().manual_seed(0)
    folded = 0
    for i, block in enumerate(adapter.blocks(model, Component.VISION)):
        prefix = f"{adapter.vision_blocks}.{i}."
        planned = {prefix + n: QuantScheme(backend="rtn", bits=4, group_size=-1, args={"awq": True})
                   for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        for producer, consumers in awq.block_pairs(adapter.vision_scale_pairs, block, prefix, planned):
            lins = [block.get_submodule(c.removeprefix(prefix)) for c in consumers]
            s = torch.rand(lins[0].in_features, generator=gen) * 3 + 0.25
            awq.fold_scales(block.get_submodule(producer.removeprefix(prefix)), lins, s)
            folded += 1
    after = projector_output(loaded, samples)
    assert folded >= 2 * len(adapter.blocks(model, Component.VISION))
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_vision_awq_records_its_scales_and_beats_plain_rtn_on_the_embeddings(family):
    embeddings = projector_output
    errors, results = {}, {}
    for name, args in (("rtn", {}), ("awq", {"awq": True})):
        loaded, samples = _setup(family)
        reference = embeddings(loaded, samples)
        scheme = QuantScheme(backend="rtn", bits=3, group_size=-1, args=args)
        plan = {n: scheme for n, _ in loaded.adapter.iter_linears(loaded.model, Component.VISION)}
        results[name] = quantize(loaded, plan, samples, progress=False)
        errors[name] = float((embeddings(loaded, samples) - reference).norm() / reference.norm())
    scaled = {n for n, r in results["awq"].items() if r.input_scales is not None}
    assert scaled and all(results["awq"][n].args["awq"] for n in scaled)
    assert not any(r.input_scales is not None for r in results["rtn"].values())
    assert errors["awq"] < errors["rtn"], errors
