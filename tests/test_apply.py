"""Applying a plan block by block: fake-quant weights, stored-scale fidelity, resume, refusals."""

from __future__ import annotations

import pytest
import torch

from quantlab.calib.executor import CalibSample
from quantlab.models import Component, get_adapter
from quantlab.models.load import LoadedModel
from quantlab.quant.apply import quantize, sequential_steps
from quantlab.quant.results_io import load_results, save_results
from quantlab.quant.scheme import QuantScheme
from tests.conftest import IMG, TINY_BUILDERS, tiny_inputs


def _setup(family="llava"):
    model = TINY_BUILDERS[family]()
    loaded = LoadedModel(model, None, get_adapter(model), family)
    torch.manual_seed(3)
    samples = []
    for i in range(3):
        x = tiny_inputs(family, batch=1)
        samples.append(CalibSample(f"s{i}", x, x["input_ids"][0] == IMG))
    return loaded, samples


def linear_inputs(loaded, samples, name: str) -> torch.Tensor:
    """Every token's input to Linear ``name`` over ``samples``, ``(tokens, in)``, from a plain forward of the
    full-precision model (the reference the token-weighted Hessians are checked against)."""
    module = dict(loaded.model.named_modules())[name]
    seen = []
    handle = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    try:
        for s in samples:
            loaded.model(**s.inputs)
    finally:
        handle.remove()
    return torch.cat(seen)


def _plan(loaded, scheme):
    return {n: scheme for n, _ in loaded.adapter.iter_linears(loaded.model, Component.DECODER)}


def test_sequential_steps_follow_fused_groups():
    a = get_adapter(TINY_BUILDERS["llava"]())
    p = "model.language_model.layers.0."
    names = [p + s for s in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert sequential_steps(names, a.fused_groups) == [names[:3], [names[3]], names[4:6], [names[6]]]


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_uniform_gptq_writes_fake_quant_weights(family):
    loaded, samples = _setup(family)
    before = {n: m.weight.detach().clone() for n, m in loaded.adapter.iter_linears(loaded.model)}
    results = quantize(loaded, _plan(loaded, QuantScheme(backend="gptq", bits=4, group_size=32)), samples,
                       progress=False)
    assert set(results) == {n for n, _ in loaded.adapter.iter_linears(loaded.model, Component.DECODER)}
    for n, m in loaded.adapter.iter_linears(loaded.model):
        if n in results:
            r = results[n]
            assert torch.equal(m.weight, r.dequantized)
            assert torch.equal(r.scales, r.scales.half().float())  # as stored in fp16 checkpoints
            assert torch.equal(r.dequantize(), r.dequantized)
            assert 0 <= r.error < 0.1
        else:
            assert torch.equal(m.weight, before[n])  # vision, projector, head untouched


def test_resume_from_saved_blocks_is_bit_identical(tmp_path):
    scheme = QuantScheme(backend="gptq", bits=3, group_size=32)
    loaded, samples = _setup()
    full = quantize(loaded, _plan(loaded, scheme), samples, progress=False,
                    save_block=lambda i, r: save_results(tmp_path / f"block{i}.safetensors", r))
    loaded2, _ = _setup()
    # resume with block 0 done: its results are loaded, block 1 is quantized again
    resumed = quantize(loaded2, _plan(loaded2, scheme), samples, progress=False,
                       load_block=lambda i: load_results(tmp_path / f"block{i}.safetensors") if i == 0 else None)
    for n in full:
        assert torch.equal(full[n].codes, resumed[n].codes), n
        assert torch.equal(full[n].dequantized, resumed[n].dequantized), n


def test_refuses_group_size_that_does_not_divide():
    loaded, samples = _setup()
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.down_proj.*in_features=128.*group_size=48"):
        quantize(loaded, {"model.language_model.layers.0.mlp.down_proj": QuantScheme(backend="rtn", bits=4, group_size=48)},
                 samples, progress=False)


def test_gptq_where_no_calibration_reaches_is_refused():
    loaded, samples = _setup()
    with pytest.raises(ValueError, match="lm_head.*needs calibration data"):
        quantize(loaded, {"lm_head": QuantScheme(backend="gptq", bits=4, group_size=32)}, samples, progress=False)


def test_image_weight_solves_against_the_token_weighted_hessian(monkeypatch):
    """GPTQ with ``image_weight`` gets ``Σ XᵀDX / ΣD`` of its inputs (image tokens weighted), computed here
    independently from the fp block's inputs; the plain scheme gets the unweighted Hessian."""
    from quantlab.quant import steps
    from quantlab.quant.hessian import hessian_from_inputs, weighted_hessian_from_inputs

    loaded, samples = _setup()
    q = "model.language_model.layers.0.self_attn.q_proj"
    x = linear_inputs(loaded, samples, q)
    image = torch.cat([s.image_mask.reshape(-1) for s in samples])
    assert 0 < int(image.sum()) < len(image)

    given = {}
    real = steps.quantize_weight

    def spy(weight, scheme, *, hessian, **kw):
        given[scheme.args.get("image_weight", 1.0)] = hessian.clone()
        return real(weight, scheme, hessian=hessian, **kw)

    monkeypatch.setattr(steps, "quantize_weight", spy)
    for w in (0.25, 1.0):
        loaded, samples = _setup()
        scheme = QuantScheme(backend="gptq", bits=4, group_size=32, args={} if w == 1.0 else {"image_weight": w})
        results = quantize(loaded, {q: scheme}, samples, progress=False)
        assert results[q].args.get("image_weight", 1.0) == w
    d = torch.where(image, 0.25, 1.0)
    torch.testing.assert_close(given[0.25], weighted_hessian_from_inputs(x, d), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(given[1.0], hessian_from_inputs(x), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(given[0.25], given[1.0], rtol=1e-2)


def test_token_weight_gradient_solves_against_the_saliency_weighted_hessian(monkeypatch):
    """``token_weight: gradient`` (with ``image_weight`` 0.5 on top) gets ``Σ XᵀDX / ΣD`` with D = each token's
    given saliency times its modality weight, computed here from the fp block's inputs; without the
    saliencies the stage refuses."""
    from quantlab.quant import steps
    from quantlab.quant.hessian import weighted_hessian_from_inputs

    loaded, samples = _setup()
    q = "model.language_model.layers.0.self_attn.q_proj"
    x = linear_inputs(loaded, samples, q)
    g = torch.Generator().manual_seed(0)
    importance = {0: {s.id: torch.rand(s.image_mask.numel(), generator=g) * 2 for s in samples}}
    given = []
    real = steps.quantize_weight

    def spy(weight, scheme, *, hessian, **kw):
        given.append(hessian.clone())
        return real(weight, scheme, hessian=hessian, **kw)

    monkeypatch.setattr(steps, "quantize_weight", spy)
    scheme = QuantScheme(backend="gptq", bits=4, group_size=32, args={"image_weight": 0.5, "token_weight": "gradient"})
    with pytest.raises(ValueError, match="pass token_importance"):
        quantize(loaded, {q: scheme}, samples, progress=False)
    results = quantize(loaded, {q: scheme}, samples, progress=False, token_importance=importance)
    assert results[q].args["token_weight"] == "gradient"
    d = torch.cat([torch.where(s.image_mask.reshape(-1), 0.5, 1.0) * s.valid_mask.float() * importance[0][s.id]
                   for s in samples])
    torch.testing.assert_close(given[0], weighted_hessian_from_inputs(x, d), rtol=1e-4, atol=1e-6)
