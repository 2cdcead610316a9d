"""The vision tower and projector as plannable parts (plan.components): luq ranks vision blocks by their own
entropy beside the decoder's, budget measures vision/projector units against the same KL and honours the
budget in stored bytes, pinned Linears count at their pinned scheme in the budget."""

from __future__ import annotations

import pytest
import torch

from quantlab.calib.collect import calibrate
from quantlab.models import Component
from quantlab.plan.cost import model_size
from quantlab.plan.make import make_plan
from quantlab.plan.planners import luq_order
from quantlab.quant.scheme import QuantScheme
from quantlab.recipe import PlanSpec, RuleSpec
from tests.test_apply import _setup

LOW = QuantScheme(backend="gptq", bits=2, group_size=32)
HIGH = QuantScheme(backend="gptq", bits=4, group_size=32)
ALL = ["decoder", "vision", "projector"]


@pytest.fixture(scope="module", params=["llava", "qwen2_5_vl"])
def setup(request):
    loaded, samples = _setup(request.param)
    stats = calibrate(loaded, samples, hessians=True, vision=True, entropy_k=4, max_tokens=64, linear_max_tokens=64,
                      progress=False)
    return loaded, samples, stats


def _component(loaded, name):
    return loaded.adapter.component_of(name)


def test_luq_ranks_vision_blocks_with_the_decoders_and_gives_the_projector_high(setup):
    loaded, _samples, stats = setup
    adapter = loaded.adapter
    entropy = {**stats.block_entropy("all"), **{("vision", i): e for i, e in stats.vision_block_entropy().items()}}
    order = luq_order(entropy)
    k = 2
    plan = make_plan(loaded, stats, PlanSpec(planner="luq", low=LOW, high=HIGH, k=k, components=ALL))
    lows = set(order[:k])
    for name, scheme in plan.layers.items():
        comp = _component(loaded, name)
        if comp is Component.DECODER:
            expected = LOW if adapter.block_index(name) in lows else HIGH
        elif comp is Component.VISION and adapter.vision_block_index(name) is not None:
            expected = LOW if ("vision", adapter.vision_block_index(name)) in lows else HIGH
        elif comp is Component.PROJECTOR:
            expected = HIGH
        else:
            expected = None
        assert scheme == expected, name
    assert plan.info["luq"]["order"] == [f"vision.{b[1]}" if isinstance(b, tuple) else b for b in order]
    # the default plans the decoder only
    decoder_only = make_plan(loaded, stats, PlanSpec(planner="luq", low=LOW, high=HIGH, k=k))
    assert all(s is None for n, s in decoder_only.layers.items() if _component(loaded, n) is not Component.DECODER)


def test_luq_without_vision_statistics_says_how_to_get_them(setup):
    loaded, samples, _ = setup
    plain = calibrate(loaded, samples, entropy_k=4, max_tokens=64, linear_max_tokens=64, progress=False)
    with pytest.raises(ValueError, match="calibration.stats.vision"):
        make_plan(loaded, plain, PlanSpec(planner="luq", low=LOW, high=HIGH, k=1, components=ALL))


def test_budget_plans_vision_units_within_the_budget(setup):
    loaded, samples, stats = setup
    cands = [QuantScheme(backend="gptq", bits=b, group_size=32) for b in (2, 4, 8)]
    spec = PlanSpec(planner="budget", candidates=cands, target_avg_bits=4.0, components=ALL)
    plan = make_plan(loaded, stats, spec, samples=samples)
    planned = {n: s for n, s in plan.layers.items() if s is not None}
    comps = {_component(loaded, n) for n in planned}
    assert comps == {Component.DECODER, Component.VISION, Component.PROJECTOR}
    vision_units = [v for k, v in plan.info.items() if isinstance(v, dict) and "unit" in v
                    and _component(loaded, k) is not Component.DECODER]
    assert vision_units and all(set(v["damage"]) == {c.label() for c in cands} for v in vision_units)
    # the measurement sees the quantized tower: 2 bits move the output far more than 8, over the tower
    w2, w8 = (sum(v["damage"][f"gptq-w{b}-g32"] for v in vision_units) for b in (2, 8))
    assert w2 > 1e-6 and w2 > 10 * abs(w8), (w2, w8)
    budget = plan.info["budget"]
    assert budget["unit_bytes"] <= budget["unit_budget_bytes"]


def test_pinned_linears_count_at_their_scheme_in_the_budget():
    loaded, samples = _setup("llava")
    stats = calibrate(loaded, samples, hessians=True, entropy_k=4, max_tokens=64, linear_max_tokens=64,
                      progress=False)
    w8 = QuantScheme(backend="rtn", bits=8, group_size=32)
    rules = [RuleSpec(match="component:vision", scheme=w8)]
    cands = [QuantScheme(backend="rtn", bits=b, group_size=32) for b in (2, 4, 8)]
    fp_vision = make_plan(loaded, stats, PlanSpec(planner="budget", candidates=cands, target_avg_bits=4.0),
                          samples=samples)
    size = model_size(loaded.model, loaded.adapter, fp_vision.layers, fp_vision.format, dtype_bytes=2).total_bytes
    # the same whole-model budget with the tower pinned at 8 bits leaves the decoder more room, not less
    pinned = make_plan(loaded, stats, PlanSpec(planner="budget", candidates=cands, rules=rules), samples=samples,
                       budget_bytes=size)
    assert pinned.predicted_bytes <= size
    fixed_fp = size - fp_vision.info["budget"]["unit_bytes"]
    fixed_pinned = size - pinned.info["budget"]["unit_budget_bytes"]
    assert fixed_pinned < fixed_fp


def test_a_luq_run_over_the_tower_calibrates_it_quantizes_it_and_checks_its_embeddings(tmp_path):
    """plan.components [decoder, vision, projector] with luq on toy-llava: calibration carries the vision
    statistics, the plan ranks vision blocks, the export holds packed vision Linears, the embedding check runs."""
    import json

    import yaml
    from safetensors import safe_open

    from quantlab.calib.artifact import CalibrationStats
    from quantlab.pipeline import run_all
    from quantlab.plan.plan import Plan

    recipe = {
        "name": "vision-luq",
        "calibration": {"num_samples": 6, "alpha": 0.5, "max_tokens": 128, "seed": 0},
        "stats": {"entropy_k": 8, "entropy_max_tokens": 256},
        "plan": {"planner": "luq", "k": 2, "components": ALL,
                 "low": {"backend": "gptq", "bits": 4, "group_size": 32},
                 "high": {"backend": "gptq", "bits": 8, "group_size": -1},
                 "rules": [{"match": "component:head", "scheme": None}]},
        "export": {"format": "compressed-tensors"},
        "eval": {"tasks": [], "vision_check": {"images": 4}},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    run_all("toy-llava", tmp_path / "r.yaml", tmp_path / "run", progress=False, say=lambda m: None)
    stats = CalibrationStats.load(tmp_path / "run" / "stats")
    assert stats.vision_blocks and stats.meta["vision_tokens"]["images"] == 3
    plan = Plan.from_yaml(tmp_path / "run" / "plan.yaml")
    assert any(k.startswith("vision_block.") for k in plan.info)
    assert all(s is not None for n, s in plan.layers.items() if "multi_modal_projector" in n)
    with safe_open(str(tmp_path / "run" / "model" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("vision_tower.") and k.endswith("fc1.weight_packed") for k in keys)
    assert any(k.startswith("multi_modal_projector.") and k.endswith("weight_packed") for k in keys)
    check = json.loads((tmp_path / "run" / "eval" / "vision_check.json").read_text())
    assert check["cosine_mean"] > 0.9


@pytest.mark.parametrize(("plan", "fmt", "stream", "message"), [
    ({"planner": "luq", "k": 1, "low": {"backend": "gptq", "bits": 4, "group_size": 32},
      "high": {"backend": "gptq", "bits": 8, "group_size": -1}}, "gptq", False,
     r"plan.components: vision \(gptq-w4-g32\): the gptq format keeps vision-tower"),
    ({"planner": "luq", "k": 1, "low": {"backend": "rtn", "bits": 4, "group_size": 32},
      "high": {"backend": "rtn", "bits": 8, "group_size": -1}}, "compressed-tensors", True,
     r"--stream does not hold"),
    ({"planner": "uniform", "scheme": {"backend": "gptq", "bits": 4, "group_size": 32, "args": {"awq": True}}},
     "compressed-tensors", False, r"plan.components: projector .*apply to decoder and vision blocks only"),
])
def test_component_plans_a_run_cannot_carry_out_are_refused_before_any_work(tmp_path, plan, fmt, stream, message):
    import yaml

    from quantlab.core.errors import UserError
    from quantlab.pipeline import run_all
    from quantlab.toys.build import build_toy

    model, processor = build_toy("toy-llava")
    model.save_pretrained(tmp_path / "toy")
    processor.save_pretrained(tmp_path / "toy")
    recipe = {"calibration": {"num_samples": 4, "alpha": 0.5},
              "plan": {**plan, "components": ALL, "rules": [{"match": "component:head", "scheme": None}]},
              "export": {"format": fmt}, "eval": {"tasks": []}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(UserError, match=message):
        run_all(str(tmp_path / "toy"), tmp_path / "r.yaml", tmp_path / "run", progress=False, say=lambda m: None,
                stream=stream)
    assert not (tmp_path / "run").exists()


def test_budget_measures_awq_on_vision_units_with_its_scale_search(setup):
    loaded, samples, stats = setup
    scaled = QuantScheme(backend="rtn", bits=3, group_size=32, args={"awq": True})
    plain = QuantScheme(backend="rtn", bits=3, group_size=32)
    wide = QuantScheme(backend="rtn", bits=8, group_size=32)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    plan = make_plan(loaded, stats, PlanSpec(planner="budget", candidates=[scaled, plain, wide], target_avg_bits=6.0,
                                             components=ALL), samples=samples)
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # every fold and fake-quantization undone
    units = {k: v for k, v in plan.info.items() if isinstance(v, dict) and "unit" in v}
    labels = {scaled.label(), plain.label(), wide.label()}
    vision = [v for k, v in units.items() if _component(loaded, k) is Component.VISION]
    projector = [v for k, v in units.items() if _component(loaded, k) is Component.PROJECTOR]
    assert vision and all(set(v["damage"]) == labels for v in vision)
    assert projector and all(set(v["damage"]) == labels - {scaled.label()} for v in projector)
    # the search ran: some unit scores differently with AWQ than plain RTN at the same bits
    assert any(v["damage"][scaled.label()] != v["damage"][plain.label()] for v in vision)
