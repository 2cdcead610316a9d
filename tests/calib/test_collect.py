"""The calibration pass on the tiny models: modality split, determinism, Hessians, the artifact."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from quantlab.calib.artifact import CalibrationStats
from quantlab.calib.collect import CollectOptions, StatsCollector, calibrate
from quantlab.calib.executor import CalibSample, stream_decoder
from quantlab.models import get_adapter
from quantlab.models.load import LoadedModel
from tests.conftest import IMG, tiny_inputs

FAST = dict(entropy_k=8, kmeans_max_iter=50, progress=False)


def _samples(family: str) -> list[CalibSample]:
    torch.manual_seed(1)
    out = []
    for i in range(2):
        full = tiny_inputs(family, batch=1)
        out.append(CalibSample(f"img{i}", full, full["input_ids"][0] == IMG))
    text_ids = torch.tensor([[1, 30, 31, 32, 33, 34, 35]])
    out.append(CalibSample("txt", {"input_ids": text_ids, "attention_mask": torch.ones_like(text_ids)},
                           text_ids[0] == IMG))
    padded = torch.tensor([[0, 0, 1, 40, 41, 42]])  # left padding: the two pad positions are not counted
    out.append(CalibSample("pad", {"input_ids": padded, "attention_mask": (padded != 0).long()}, padded[0] == IMG))
    return out


def _loaded(tiny_family) -> LoadedModel:
    family, model = tiny_family
    return LoadedModel(model, None, get_adapter(model), family)


def _assert_same(a: CalibrationStats, b: CalibrationStats) -> None:
    """Bit-for-bit equality of two artifacts (NaN == NaN)."""
    assert a.meta == b.meta
    for mine, theirs in ((a.blocks, b.blocks), (a.linears, b.linears)):
        assert list(mine) == list(theirs)
        for key in mine:
            assert list(mine[key]) == list(theirs[key])
            for m, st in mine[key].items():
                other = theirs[key][m]
                for k, v in st.scalars().items():
                    w = other.scalars()[k]
                    assert (v == w) or (isinstance(v, float) and math.isnan(v) and math.isnan(w)), (key, m, k)
                for k, t in st.tensors().items():
                    assert torch.equal(t, other.tensors()[k]), (key, m, k)
    assert list(a.hessians) == list(b.hessians)
    assert all(torch.equal(a.hessians[k], b.hessians[k]) for k in a.hessians)
    assert a.hessian_weight == b.hessian_weight


def test_token_counts_split_by_modality(tiny_family):
    loaded = _loaded(tiny_family)
    samples = _samples(tiny_family[0])
    stats = calibrate(loaded, samples, **FAST)
    n_img = sum(int((s.inputs["input_ids"] == IMG).sum()) for s in samples)
    n_all = sum(int(s.inputs["attention_mask"].sum()) for s in samples)
    assert stats.meta["tokens"] == {"image": n_img, "text": n_all - n_img, "all": n_all}
    assert stats.meta["samples"] == {"total": 4, "image": 2, "text": 2, "skipped": 0, "skipped_by_reason": {}}
    n_blocks = loaded.config.text_config.num_hidden_layers
    assert sorted(stats.blocks) == list(range(n_blocks))
    per_block = sum(1 for m in loaded.adapter.blocks(loaded.model)[0].modules() if isinstance(m, torch.nn.Linear))
    assert len(stats.linears) == n_blocks * per_block
    for per in [*stats.blocks.values(), *stats.linears.values()]:
        assert {m: st.tokens for m, st in per.items()} == {"image": n_img, "text": n_all - n_img, "all": n_all}
    hidden = loaded.config.text_config.hidden_size
    assert stats.mean_sq(f"{loaded.adapter.decoder_blocks}.0.mlp.down_proj").shape == (
        loaded.config.text_config.intermediate_size,)
    assert stats.blocks[0]["all"].mean_sq.shape == (hidden,)
    ent = stats.block_entropy("all")
    assert sorted(ent) == list(range(n_blocks)) and all(0 < v <= 3.0 for v in ent.values())  # log2(8)
    assert set(stats.block_entropy("image", kind="hist")) == set(range(n_blocks))
    assert stats.block_linears()[1] == [n for n in stats.linears if ".layers.1." in n]
    assert len(stats.table()) == n_blocks


def test_deterministic_bit_for_bit(tiny_family):
    loaded = _loaded(tiny_family)
    samples = _samples(tiny_family[0])
    a = calibrate(loaded, samples, hessians=True, **FAST)
    b = calibrate(loaded, samples, hessians=True, **FAST)
    _assert_same(a, b)


def test_hessian_equals_xtx_of_hooked_inputs(tiny_family):
    loaded = _loaded(tiny_family)
    samples = _samples(tiny_family[0])
    wi, wt = 2.0, 0.5
    stats = calibrate(loaded, samples, hessians=True, linears=False, modality_weights={"image": wi, "text": wt},
                      **FAST)
    assert not stats.linears and stats.hessians
    inputs: list[torch.Tensor] = []

    def stage(i, block, run):
        if i != 1:
            return None
        h = block.self_attn.q_proj.register_forward_hook(lambda m, a, o: inputs.append(a[0][0]))
        try:
            return run()
        finally:
            h.remove()

    stream_decoder(loaded, samples, stage)
    ref = torch.zeros(inputs[0].shape[-1], inputs[0].shape[-1], dtype=torch.float64)
    total = 0.0
    for x, s in zip(inputs, samples):
        keep = s.inputs["attention_mask"][0].bool()
        w = torch.where(s.image_mask[keep], wi, wt).double()
        xv = x[keep].double()
        ref += (xv * w[:, None]).T @ xv
        total += float(w.sum())
    name = f"{loaded.adapter.decoder_blocks}.1.self_attn.q_proj"
    torch.testing.assert_close(stats.hessians[name].double(), ref, rtol=1e-5, atol=1e-5)
    assert stats.hessian_weight[name] == pytest.approx(total)
    # q, k and v read the same input: the same Hessian, held separately
    k_name = name.replace("q_proj", "k_proj")
    assert torch.equal(stats.hessians[k_name], stats.hessians[name])
    assert stats.hessians[k_name].data_ptr() != stats.hessians[name].data_ptr()


def test_save_load_round_trip_exact(tiny_family, tmp_path):
    loaded = _loaded(tiny_family)
    calib_set = SimpleNamespace(samples=_samples(tiny_family[0]), skipped={"unreadable image": 1})  # data.CalibSet
    stats = calibrate(loaded, calib_set, hessians=True, **FAST)
    assert stats.meta["samples"]["skipped"] == 1
    out = stats.save(tmp_path / "stats")
    assert sorted(p.name for p in out.iterdir()) == ["stats.safetensors", "summary.json"]
    json.loads((out / "summary.json").read_text())  # strict JSON (no NaN tokens)
    _assert_same(CalibrationStats.load(out), stats)
    with pytest.raises(FileExistsError):
        stats.save(out)
    stats.save(out, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["stats"]  # no temporary leftovers


def test_block_output_option_and_text_only(tiny_family, tmp_path):
    from quantlab.calib.plot import plot_entropy

    loaded = _loaded(tiny_family)
    samples = _samples(tiny_family[0])
    outs: list[list[torch.Tensor]] = []

    def keep(i, block, run):
        outs.append(run())
        return outs[-1]

    stream_decoder(loaded, samples, keep)
    stats = calibrate(loaded, samples, entropy_on="block_output", linears=False, **FAST)
    n = sum(int(s.inputs["attention_mask"].sum()) for s in samples)
    for i, per in stats.blocks.items():
        x = torch.cat([o[0][s.inputs["attention_mask"][0].bool()] for o, s in zip(outs[i], samples)])
        assert per["all"].tokens == n
        torch.testing.assert_close(per["all"].mean_sq, (x.double() ** 2).mean(0).float())
    text_only = calibrate(loaded, samples[2:], **FAST)
    assert "image" not in text_only.blocks[0]
    with pytest.raises(ValueError, match="image"):
        text_only.block_entropy("image")
    assert plot_entropy(stats, tmp_path / "entropy.png").stat().st_size > 1000


def test_collector_is_a_stage_and_options_are_checked():
    with pytest.raises(ValueError, match="entropy_on"):
        CollectOptions(entropy_on="output")
    with pytest.raises(ValueError, match="modality_weights"):
        CollectOptions(modality_weights={"video": 1.0})
    assert CollectOptions.from_dict(CollectOptions(hessians=True).to_dict()) == CollectOptions(hessians=True)
    collector = StatsCollector([CalibSample("x", {}, torch.zeros(3, dtype=torch.bool))], CollectOptions())
    assert collector.token_counts == {"image": 0, "text": 3, "all": 3}
