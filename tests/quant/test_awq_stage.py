"""AWQ in the quantize stage: searched per block, folded into the norms, exported, resumed, refused where
it cannot run faithfully (docs/method.md#awq)."""

from __future__ import annotations

import pytest
import torch

from quantlab.calib.data import CalibDataOptions, build_calibration_set
from quantlab.calib.executor import stream_decoder
from quantlab.models import Component, load_model
from quantlab.quant.apply import quantize
from quantlab.quant.scheme import QuantScheme
from tests.export.test_compressed_tensors import transformers_logits

TOY = "toy-llava"


@pytest.fixture(scope="module")
def calib():
    return build_calibration_set(load_model(TOY, dtype=torch.float32),
                                 CalibDataOptions(num_samples=8, alpha=0.5)).samples


def _plan(loaded, backend: str, bits: int, group: int, awq: bool):
    args = {"awq": True} if awq else {}
    return {n: QuantScheme(backend=backend, bits=bits, group_size=group, args=args)
            for n, _ in loaded.adapter.iter_linears(loaded.model, Component.DECODER)}


def _decoder_error(loaded, reference, samples) -> float:
    out = stream_decoder(loaded, samples)
    return sum(float((a - b).pow(2).sum()) for a, b in zip(out, reference)) / sum(float(b.pow(2).sum())
                                                                                 for b in reference)


def test_awq_lowers_the_decoder_output_error_of_rtn(calib):
    """RTN W3 g32 on every decoder Linear of the trained toy, with and without AWQ's scales: the last block's
    output error against full precision is lower with them, and every pair that folds got an α (v -> o only
    where v_proj's rows match o_proj's inputs: not under grouped heads)."""
    fp = load_model(TOY, dtype=torch.float32)
    reference = stream_decoder(fp, calib)
    errors = {}
    for awq in (False, True):
        loaded = load_model(TOY, dtype=torch.float32)
        results = quantize(loaded, _plan(loaded, "rtn", 3, 32, awq), calib, progress=False)
        errors[awq] = _decoder_error(loaded, reference, calib)
    assert errors[True] < 0.97 * errors[False], errors
    by_leaf = {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1]: r for n, r in results.items()
               if ".layers.0." in n}
    for leaf in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj",
                 "mlp.down_proj"):
        r = by_leaf[leaf]
        assert r.input_scales is not None and r.args["awq"] and 0 <= r.args["awq_alpha"] < 1, leaf
    attn = loaded.model.model.language_model.layers[0].self_attn
    folds_v = attn.v_proj.out_features == attn.o_proj.in_features
    assert (by_leaf["self_attn.o_proj"].input_scales is not None) == folds_v


def test_awq_export_is_what_the_quantized_model_computes(calib, tmp_path):
    """AWQ then GPTQ W4 g32, exported as compressed-tensors: transformers (another process, no quantlab)
    loads the folded norms and the codes and reproduces the in-memory model's logits."""
    from quantlab.export.compressed_tensors import write_compressed_tensors
    from quantlab.export.io import write_dir_atomic

    loaded = load_model(TOY)
    results = quantize(loaded, _plan(loaded, "gptq", 4, 32, True), calib, progress=False)
    norm = loaded.model.model.language_model.layers[0].input_layernorm.weight
    assert not torch.equal(norm, load_model(TOY).model.model.language_model.layers[0].input_layernorm.weight)
    out = write_dir_atomic(tmp_path / "ckpt", lambda d: write_compressed_tensors(loaded, results, d))
    inputs = next(s for s in calib if s.has_image).inputs
    theirs = transformers_logits(out, inputs, tmp_path)
    with torch.no_grad():
        ours = loaded.model.float()(**inputs).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def test_a_resumed_awq_run_folds_the_norms_again(calib):
    """Blocks saved by one run and loaded by a fresh model (a resume): every tensor, the norms AWQ folded
    included, equals the first run's."""
    first = load_model(TOY, dtype=torch.float32)
    saved: dict[int, dict] = {}
    quantize(first, _plan(first, "rtn", 3, 32, True), calib, progress=False,
             save_block=lambda i, r: saved.__setitem__(i, dict(r)))
    again = load_model(TOY, dtype=torch.float32)
    quantize(again, _plan(again, "rtn", 3, 32, True), calib, progress=False, load_block=saved.get)
    mine, theirs = first.model.state_dict(), again.model.state_dict()
    differ = [k for k in mine if not torch.equal(mine[k], theirs[k])]
    assert not differ, differ[:3]


def test_awq_option_is_checked_before_any_work():
    from quantlab.quant.registry import get_backend

    assert get_backend("gptq").problem(QuantScheme(backend="gptq", bits=3, args={"awq": "yes"})) == \
        "awq must be true or false, got 'yes'"
    assert "does not combine with a GGUF K grid" in get_backend("rtn").problem(
        QuantScheme(backend="rtn", bits=4, group_size=32, args={"awq": True, "grid": "q4_k"}))
    assert "unknown option(s) ['awq']" in get_backend("billm").problem(
        QuantScheme(backend="billm", bits=1, args={"awq": True}))


def test_mbq_balance_on_rtn_weighs_the_awq_search(calib):
    """AWQ then RTN with ``image_weight`` (MBQ's balanced search): accepted only with ``awq`` (RTN alone reads no
    tokens), and the weight reaches the search: image tokens weighted 0 choose other scales than unweighted."""
    from quantlab.quant.registry import get_backend

    rtn = get_backend("rtn")
    assert "add awq: true" in rtn.problem(QuantScheme(backend="rtn", bits=3, args={"image_weight": 0.5}))
    assert rtn.problem(QuantScheme(backend="rtn", bits=3, group_size=32, args={"awq": True, "image_weight": 0.5})) is None
    alphas = {}
    for w in (1.0, 0.0):
        loaded = load_model(TOY, dtype=torch.float32)
        plan = {n: s.model_copy(update={"args": {**s.args, "image_weight": w}})
                for n, s in _plan(loaded, "rtn", 3, 32, True).items()}
        results = quantize(loaded, plan, calib, progress=False)
        alphas[w] = [r.args["awq_alpha"] for r in results.values() if r.input_scales is not None]
    assert alphas[1.0] != alphas[0.0], alphas
