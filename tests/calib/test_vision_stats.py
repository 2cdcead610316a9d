"""Calibration of the vision tower and projector (quantlab.calib.vision): each Linear's Hessian equals the
explicit sum over its real inputs, every statistic is an image-token one, and the vision blocks' LUQ
entropies land in the artifact and survive a save/load."""

from __future__ import annotations

import pytest
import torch

from quantlab.calib.artifact import CalibrationStats
from quantlab.calib.collect import calibrate
from quantlab.models import Component
from tests.test_apply import _setup, linear_inputs


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_vision_hessians_are_the_explicit_sums_of_the_real_inputs(family, tmp_path):
    loaded, samples = _setup(family)
    stats = calibrate(loaded, samples, hessians=True, vision=True, entropy_k=4, max_tokens=64,
                      linear_max_tokens=64, progress=False)
    adapter = loaded.adapter
    vision = [n for c in (Component.VISION, Component.PROJECTOR) for n, _ in adapter.iter_linears(loaded.model, c)]
    assert set(vision) <= set(stats.hessians) and set(vision) <= set(stats.linears)
    for name in vision:
        x = linear_inputs(loaded, samples, name).float()
        torch.testing.assert_close(stats.hessians[name], x.T @ x, rtol=1e-4, atol=1e-4)
        assert stats.hessian_weight[name] == len(x)
        per = stats.linears[name]
        assert "text" not in per and per["image"].tokens == per["all"].tokens == len(x)
    n_blocks = len(adapter.blocks(loaded.model, Component.VISION))
    assert sorted(stats.vision_blocks) == list(range(n_blocks))
    assert all(per["all"].kmeans_entropy is not None for per in stats.vision_blocks.values())
    # the decoder's view is unchanged: its blocks, its Linears
    assert set(stats.block_linears()) == set(range(len(adapter.blocks(loaded.model))))
    assert all(adapter.component_of(n) == Component.DECODER for ns in stats.block_linears().values() for n in ns)
    again = CalibrationStats.load(stats.save(tmp_path / "stats"))
    assert again.vision_block_entropy() == stats.vision_block_entropy()
    torch.testing.assert_close(again.hessians[vision[0]], stats.hessians[vision[0]])


def test_without_the_option_nothing_of_the_tower_is_collected():
    loaded, samples = _setup("llava")
    stats = calibrate(loaded, samples, hessians=True, entropy_k=4, max_tokens=64, linear_max_tokens=64,
                      progress=False)
    assert not stats.vision_blocks
    assert all(loaded.adapter.component_of(n) == Component.DECODER for n in stats.hessians)
