"""Planners: uniform with pins, LUQ ordering / k choice / search, and the exact MILP budget planner."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from quantlab.models.adapter import LLAVA
from quantlab.plan.make import PLANNERS
from quantlab.plan.planners import (
    budget,
    fused_groups,
    k_for_budget,
    luq,
    luq_order,
    luq_search,
    uniform,
)
from quantlab.quant.scheme import QuantScheme
from tests.conftest import tiny_llava

W4 = QuantScheme(backend="gptq", bits=4, group_size=128)
BILLM = QuantScheme(backend="billm", bits=1, group_size=128)


def test_registry():
    assert set(PLANNERS) == {"uniform", "luq", "budget"}


def test_uniform_with_rules():
    names = [n for n, _ in LLAVA.iter_linears(tiny_llava())]
    out = uniform(names, W4, [{"match": "component:vision", "scheme": None}, {"match": "lm_head", "scheme": None}],
                  adapter=LLAVA)
    assert list(out) == names
    assert out["lm_head"] is None and out["model.vision_tower.encoder.layers.1.mlp.fc2"] is None
    assert out["model.language_model.layers.0.self_attn.q_proj"] == W4


def test_luq_lowest_entropy_blocks_get_low():
    entropy = {0: 6.5, 1: 6.1, 2: 6.3, 3: 6.1}
    assert luq_order(entropy) == [1, 3, 2, 0]
    names = {b: [f"layers.{b}.q", f"layers.{b}.k"] for b in entropy}
    out = luq(entropy, 2, BILLM, W4, names)
    assert {n for n, s in out.items() if s == BILLM} == {"layers.1.q", "layers.1.k", "layers.3.q", "layers.3.k"}
    assert len(out) == 8
    with pytest.raises(ValueError, match="outside"):
        luq(entropy, 5, BILLM, W4, names)


@pytest.mark.parametrize("n,target,k", [(32, 2.54, 16), (28, 2.75, 12)])  # docs/method.md#nominal-bits
def test_k_for_nominal_bits(n, target, k):
    order = list(range(n))
    ones = dict.fromkeys(order, 1)
    assert k_for_budget(order, ones, ones, block_numel=ones, low=BILLM, high=W4, target_bits=target) == k


def test_k_for_budget_bytes():
    order = [2, 0, 1]
    low, high = {0: 10, 1: 10, 2: 30}, {0: 40, 1: 40, 2: 90}
    # k=0: 170, k=1: 110 (block 2 low), k=2: 80, k=3: 50
    assert k_for_budget(order, low, high, fixed_bytes=5, budget_bytes=175) == 0
    assert k_for_budget(order, low, high, fixed_bytes=5, budget_bytes=115) == 1
    assert k_for_budget(order, low, high, fixed_bytes=5, budget_bytes=84) == 3
    with pytest.raises(ValueError, match="55 bytes"):
        k_for_budget(order, low, high, fixed_bytes=5, budget_bytes=54)


def test_luq_search_finds_boundary_and_records_probes():
    calls = []

    def evaluate(k):
        calls.append(k)
        return 58.2 - 0.4 * k  # monotone in k

    k, probes = luq_search(list(range(32)), evaluate, threshold=55.0)
    assert k == 8 and [p[0] for p in probes] == calls and len(calls) == len(set(calls)) <= 6
    assert all((s >= 55.0) == (kk <= 8) for kk, s in probes)
    assert luq_search(list(range(32)), lambda k: 0.0, threshold=1.0)[0] is None
    assert luq_search(list(range(32)), lambda k: 1.0, threshold=1.0, lo=4, hi=10)[0] == 10


def test_fused_groups():
    names = [n for n, _ in LLAVA.iter_linears(tiny_llava())]
    groups = fused_groups(names, LLAVA)
    assert ("model.language_model.layers.0.self_attn.q_proj", "model.language_model.layers.0.self_attn.k_proj",
            "model.language_model.layers.0.self_attn.v_proj") in groups
    assert ("model.language_model.layers.1.mlp.gate_proj", "model.language_model.layers.1.mlp.up_proj") in groups
    assert len(groups) == 4 + 2  # vision blocks also have q/k/v (no gate/up)


def _instance(seed, n_units=6, cands=("w2", "w4", "w8"), drop=True):
    rng = np.random.default_rng(seed)
    units = [f"u{i}" for i in range(n_units)]
    cost, damage = {}, {}
    for u in units:
        size = int(rng.integers(50, 200))
        for c in cands:
            if drop and c == "w2" and rng.random() < 0.2:
                continue  # this shape cannot take w2
            cost[u, c] = size * int(c[1:]) + int(rng.integers(0, 10))
            damage[u, c] = float(rng.random() * 2.0 ** -int(c[1:]) * size)
    return units, list(cands), damage, cost


def _brute(units, cands, damage, cost, cap, groups):
    best = None
    for combo in itertools.product(cands, repeat=len(units)):
        ch = dict(zip(units, combo))
        if any((u, c) not in cost for u, c in ch.items()):
            continue
        if any(len({ch[u] for u in g}) > 1 for g in groups):
            continue
        if sum(cost[u, c] for u, c in ch.items()) > cap:
            continue
        obj = sum(damage[u, c] for u, c in ch.items())
        best = obj if best is None else min(best, obj)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_budget_matches_brute_force(seed):
    units, cands, damage, cost = _instance(seed)
    groups = [("u0", "u1", "u2"), ("u3", "u4")]
    lo = sum(min(cost[u, c] for c in cands if (u, c) in cost) for u in units)
    hi = sum(max(cost[u, c] for c in cands if (u, c) in cost) for u in units)
    prev = None
    for cap in np.linspace(lo + 200, hi, 6).astype(int):
        want = _brute(units, cands, damage, cost, cap, groups)
        if want is None:
            continue
        got = budget(units, cands, damage, cost, int(cap), groups=groups)
        assert got.objective == pytest.approx(want, rel=1e-9, abs=1e-12)
        assert got.total_bytes <= cap
        assert got.choice["u0"] == got.choice["u1"] == got.choice["u2"] and got.choice["u3"] == got.choice["u4"]
        if prev is not None:
            assert got.objective <= prev + 1e-12  # more budget never hurts
        prev = got.objective


def test_budget_infeasible_names_minimum():
    units, cands, damage, cost = _instance(0, drop=False)
    floor = sum(cost[u, "w2"] for u in units)
    with pytest.raises(ValueError, match=f"minimum achievable is {floor} bytes"):
        budget(units, cands, damage, cost, floor - 1)
    assert budget(units, cands, damage, cost, floor).choice == dict.fromkeys(units, "w2")


def test_budget_input_errors():
    units, cands, damage, cost = _instance(1, drop=False)
    with pytest.raises(ValueError, match="not in units"):
        budget(units, cands, damage, cost, 10**9, groups=[("u0", "zz")])
    del damage["u1", "w4"]
    with pytest.raises(ValueError, match="no damage"):
        budget(units, cands, damage, cost, 10**9)
