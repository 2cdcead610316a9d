"""make_plan end to end on a tiny model: LUQ (k, nominal-bit target, KL search) and the budget planner."""

from __future__ import annotations

import pytest
import torch

from quantlab.calib.collect import calibrate
from quantlab.plan.make import make_plan
from quantlab.quant.scheme import QuantScheme
from quantlab.recipe import PlanSpec, RuleSpec
from tests.test_apply import _setup, linear_inputs

LOW = QuantScheme(backend="billm", bits=1, group_size=32)
HIGH = QuantScheme(backend="gptq", bits=4, group_size=32)
KEEP = [RuleSpec(match="component:vision", scheme=None), RuleSpec(match="component:head", scheme=None)]


@pytest.fixture(scope="module")
def setup():
    loaded, samples = _setup("llava")
    stats = calibrate(loaded, samples, hessians=True, entropy_k=4, max_tokens=64, linear_max_tokens=64, progress=False)
    return loaded, samples, stats


def test_luq_fixed_k_puts_lowest_entropy_block_low(setup):
    loaded, samples, stats = setup
    plan = make_plan(loaded, stats, PlanSpec(planner="luq", low=LOW, high=HIGH, k=1, rules=KEEP))
    ent = stats.block_entropy("all")
    low_block = min(ent, key=ent.get)
    for name, scheme in plan.layers.items():
        if ".language_model.layers." in name:
            expected = LOW if f".layers.{low_block}." in name else HIGH
            assert scheme == expected, name
        elif "vision_tower" in name or name == "lm_head":
            assert scheme is None
    assert plan.format == "native" and plan.info["luq"]["k"] == 1


def test_luq_nominal_target_picks_smallest_k(setup):
    loaded, samples, stats = setup
    plan = make_plan(loaded, stats, PlanSpec(planner="luq", low=LOW, high=HIGH, target_avg_bits=2.54, rules=KEEP))
    assert plan.info["luq"]["k"] == 1  # (1.08 + 4) / 2 = 2.54 with two blocks
    assert plan.info["luq"]["nominal_avg_bits"] == pytest.approx(2.54)


def test_luq_search_reports_probes(setup):
    loaded, samples, stats = setup
    plan = make_plan(loaded, stats, PlanSpec(planner="luq", low=LOW, high=HIGH, search_max_kl=1e9, rules=KEEP),
                     samples=samples)
    assert plan.info["luq"]["k"] == 2 and plan.info["luq"]["search_probes"]
    strict = make_plan(loaded, stats, PlanSpec(planner="luq", low=LOW, high=HIGH, search_max_kl=0.0, rules=KEEP),
                       samples=samples)
    assert strict.info["luq"]["k"] == 0


def test_budget_planner_respects_budget_and_ties(setup):
    loaded, samples, stats = setup
    cands = [QuantScheme(backend="gptq", bits=b, group_size=32) for b in (2, 4, 8)]
    spec = PlanSpec(planner="budget", candidates=cands, target_avg_bits=4.0, rules=KEEP)
    plan = make_plan(loaded, stats, spec, samples=samples, progress=False)
    dec = {n: s for n, s in plan.layers.items() if ".language_model.layers." in n}
    bits = [s.bits for s in dec.values()]
    assert set(bits) <= {2, 4, 8} and len(set(bits)) > 1  # a real mix, not a uniform answer
    for b in range(2):
        p = f"model.language_model.layers.{b}."
        assert dec[p + "self_attn.q_proj"] == dec[p + "self_attn.k_proj"] == dec[p + "self_attn.v_proj"]
        assert dec[p + "mlp.gate_proj"] == dec[p + "mlp.up_proj"]
    assert plan.info["budget"]["unit_bytes"] <= plan.info["budget"]["unit_budget_bytes"]
    tight = make_plan(loaded, stats, spec.model_copy(update={"target_avg_bits": 2.6}), samples=samples, progress=False)
    assert tight.predicted_bytes < plan.predicted_bytes


def test_budget_below_reachable_fails_before_measuring(setup, monkeypatch):
    loaded, samples, stats = setup
    from quantlab.plan import budget_plan

    def no_measuring(*a, **k):
        raise AssertionError("sensitivity was measured for an infeasible budget")

    monkeypatch.setattr(budget_plan, "measure_damage", no_measuring)
    cands = [QuantScheme(backend="gptq", bits=b, group_size=32) for b in (2, 4)]
    spec = PlanSpec(planner="budget", candidates=cands, budget_gb=1e-6, rules=KEEP)
    with pytest.raises(ValueError, match=r"below the smallest reachable size .* the largest is .*gptq-w2-g32"):
        make_plan(loaded, stats, spec, samples=samples, progress=False)


def test_weighted_candidates_are_measured_with_the_hessian_they_are_quantized_with(setup, monkeypatch):
    """A budget planner's candidates that differ only in ``image_weight`` stay apart (their labels differ) and
    each is measured with its own Hessian: the weighted one equals ``Σ XᵀDX / ΣD`` of the fp inputs computed
    here (image tokens at 0.25), the plain one is calibration's."""
    from quantlab.plan import sensitivity
    from quantlab.quant.hessian import weighted_hessian_from_inputs

    loaded, samples, stats = setup
    q = "model.language_model.layers.1.self_attn.q_proj"
    module = dict(loaded.model.named_modules())[q]
    d = torch.cat([torch.where(s.image_mask.reshape(-1), 0.25, 1.0) * s.valid_mask.float() for s in samples])
    expected = weighted_hessian_from_inputs(linear_inputs(loaded, samples, q), d)

    given = {}
    real = sensitivity._fake_quantize

    def spy(linear, weight, scheme, h):
        if linear is module:
            given[scheme.label()] = h
        return real(linear, weight, scheme, h)

    monkeypatch.setattr(sensitivity, "_fake_quantize", spy)
    plain = QuantScheme(backend="gptq", bits=2, group_size=32)
    weighted = QuantScheme(backend="gptq", bits=2, group_size=32, args={"image_weight": 0.25})
    spec = PlanSpec(planner="budget", candidates=[plain, weighted, HIGH], target_avg_bits=3.0, rules=KEEP,
                    sensitivity_samples=len(samples))
    plan = make_plan(loaded, stats, spec, samples=samples, progress=False)
    assert weighted.label() == "gptq-w2-g32-img0.25" and set(plan.info[q]["damage"]) == {
        "gptq-w2-g32", "gptq-w2-g32-img0.25", "gptq-w4-g32"}
    torch.testing.assert_close(given["gptq-w2-g32-img0.25"], expected, rtol=1e-4, atol=1e-6)
    assert given["gptq-w2-g32"] is stats.hessians[q]


def test_budget_planner_measures_awq_candidates_with_their_scales_and_restores_the_model(setup):
    """An ``awq`` candidate is measured with AWQ's scales searched and folded for its unit (the quantize
    stage's search): its total damage is below plain RTN's at the same bits, and planning leaves every
    tensor of the model as it was."""
    loaded, samples, stats = setup
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    plain = QuantScheme(backend="rtn", bits=2, group_size=32)
    scaled = QuantScheme(backend="rtn", bits=2, group_size=32, args={"awq": True})
    spec = PlanSpec(planner="budget", candidates=[plain, scaled, HIGH], target_avg_bits=3.0, rules=KEEP,
                    sensitivity_samples=len(samples))
    plan = make_plan(loaded, stats, spec, samples=samples, progress=False)
    units = {k: v for k, v in plan.info.items() if isinstance(v, dict) and "damage" in v}
    total = {lab: sum(u["damage"][lab] for u in units.values()) for lab in (plain.label(), scaled.label())}
    assert total["rtn-w2-g32-awq"] < total["rtn-w2-g32"], total
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
