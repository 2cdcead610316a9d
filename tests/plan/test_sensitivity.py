"""The streamed damage measurement equals the whole-model definition (only the unit quantized, full forward)."""

from __future__ import annotations

import pytest

from quantlab.calib.collect import calibrate
from quantlab.plan.sensitivity import measure_damage, quantized_kl, units_of
from quantlab.quant.scheme import QuantScheme
from tests.test_apply import _setup


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_streamed_damage_matches_full_forward(family):
    loaded, samples = _setup(family)
    stats = calibrate(loaded, samples, hessians=True, entropy=False, progress=False)
    adapter = loaded.adapter
    blocks: dict[int, list[str]] = {}
    for n, _ in adapter.iter_linears(loaded.model):
        b = adapter.block_index(n)
        if b is not None and adapter.component_of(n).value == "decoder":
            blocks.setdefault(b, []).append(n)
    units = units_of(blocks, [("x",)])
    cands = [QuantScheme(backend="gptq", bits=2, group_size=32), QuantScheme(backend="rtn", bits=3, group_size=32)]
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    damage = measure_damage(loaded, samples, units, cands, stats.hessians, progress=False)
    assert len(damage) == len(units) * len(cands) and len({adapter.block_index(u[0]) for u in units}) > 1
    for (unit, label), value in damage.items():
        scheme = next(c for c in cands if c.label() == label)
        full = quantized_kl(loaded, samples, {n: scheme for n in unit}, stats.hessians)
        assert value == pytest.approx(full, rel=1e-4, abs=1e-9), (unit, label)
        assert value > -1e-7  # a KL (rounding can make an unharmed unit slightly negative)
    for n, p in loaded.model.named_parameters():  # the model is left as it was
        assert (p == before[n]).all(), n
