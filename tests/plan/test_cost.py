"""cost: exact bytes on the real skeletons (against hand computations from docs/formats.md#reference-shapes) and
against a checkpoint written by compressed-tensors itself."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from quantlab.models import load_model
from quantlab.models.adapter import LLAVA, Component
from quantlab.plan.cost import (
    billm_layout,
    linear_bytes,
    linear_layout,
    model_size,
)
from quantlab.quant.scheme import QuantScheme

CONFIGS = Path(__file__).resolve().parents[2].parent / "shared" / "configs"

# Per decoder layer (in, out, bias) in module order q, k, v, o, gate, up, down, and totals
# (docs/formats.md#reference-shapes).
LAYERS = {
    "llava-1.5-7b-hf.json": dict(
        shapes=[(4096, 4096, False)] * 4 + [(4096, 11008, False)] * 2 + [(11008, 4096, False)],
        n=32, params=7_063_427_072, per_layer=202_375_168, tied=False),
    "qwen2.5-vl-7b-instruct.json": dict(
        shapes=[(3584, 3584, True), (3584, 512, True), (3584, 512, True), (3584, 3584, False),
                (3584, 18944, False), (3584, 18944, False), (18944, 3584, False)],
        n=28, params=8_292_166_656, per_layer=233_046_016, tied=False),
    "qwen2.5-vl-3b-instruct.json": dict(
        shapes=[(2048, 2048, True), (2048, 256, True), (2048, 256, True), (2048, 2048, False),
                (2048, 11008, False), (2048, 11008, False), (11008, 2048, False)],
        n=36, params=3_754_622_976, per_layer=77_070_336, tied=True),
}

W4 = QuantScheme(backend="gptq", bits=4, group_size=128)
W2A = QuantScheme(backend="rtn", bits=2, group_size=64, sym=False)
BILLM = QuantScheme(backend="billm", bits=1, group_size=128)


@pytest.fixture(scope="module", params=sorted(LAYERS))
def skeleton(request):
    path = CONFIGS / request.param
    if not path.is_file():
        pytest.skip(f"{path} not present")
    lm = load_model(path, weights=False)
    return request.param, lm


def _decoder(lm):
    return [n for n, _ in lm.adapter.iter_linears(lm.model, Component.DECODER)]


def _hand_ct(out_f: int, in_f: int, bits: int, group: int, sym: bool) -> int:
    """compressed-tensors pack-quantized bytes of one Linear, bias excluded, written out by hand."""
    g = in_f // group
    packed = out_f * math.ceil(in_f * bits / 32) * 4
    zero = 0 if sym else math.ceil(out_f * bits / 32) * g * 4
    return packed + out_f * g * 2 + zero + 2 * 8


def test_fp16_total_is_params_times_two(skeleton):
    fname, lm = skeleton
    ref = LAYERS[fname]
    rep = model_size(lm.model, lm.adapter, {}, "compressed-tensors")
    assert rep.total_bytes == ref["params"] * 2
    assert sum(rep.by_component.values()) == rep.total_bytes
    assert (rep.by_component.get("head", 0) == 0) == ref["tied"]  # tied lm_head counted once (as embed)
    assert rep.decoder_linear_numel == ref["per_layer"] * ref["n"]
    assert sum(i * o for i, o, _ in ref["shapes"]) == ref["per_layer"]  # the hand table matches §8
    assert rep.avg_bits == rep.nominal_bits == 16.0


def test_components_llava_and_qwen_projector(skeleton):
    fname, lm = skeleton
    rep = model_size(lm.model, lm.adapter, {}, "fp")
    vision, projector = {"llava-1.5-7b-hf.json": (303_507_456, 20_979_712),
                         "qwen2.5-vl-7b-instruct.json": (631_975_680, 44_574_464),
                         "qwen2.5-vl-3b-instruct.json": (631_975_680, 36_708_608)}[fname]
    assert rep.by_component["vision"] == 2 * vision
    assert rep.by_component["projector"] == 2 * projector


@pytest.mark.parametrize("scheme", [W4, W2A], ids=["w4g128", "w2g64asym"])
def test_uniform_decoder_ct_matches_hand(skeleton, scheme):
    fname, lm = skeleton
    ref = LAYERS[fname]
    rep = model_size(lm.model, lm.adapter, {n: scheme for n in _decoder(lm)}, "compressed-tensors")
    per_layer = sum(_hand_ct(o, i, scheme.bits, scheme.group_size, scheme.sym) for i, o, _ in ref["shapes"])
    weights = ref["per_layer"] * ref["n"]
    assert rep.total_bytes == ref["params"] * 2 - 2 * weights + per_layer * ref["n"]
    assert rep.decoder_linear_bytes == per_layer * ref["n"]
    assert rep.avg_bits == pytest.approx(8 * per_layer / ref["per_layer"])
    assert rep.nominal_bits == scheme.bits


def test_uniform_decoder_gptq_matches_hand(skeleton):
    fname, lm = skeleton
    ref = LAYERS[fname]
    rep = model_size(lm.model, lm.adapter, {n: W4 for n in _decoder(lm)}, "gptq")
    per_layer = 0
    for i, o, bias in ref["shapes"]:
        g = i // 128
        # qweight [in*4/32, out] i32 + qzeros [g, out*4/32] i32 + scales [g, out] f16 + g_idx [in] i32
        per_layer += (i * 4 // 32) * o * 4 + g * (o * 4 // 32) * 4 + g * o * 2 + i * 4
    assert rep.total_bytes == ref["params"] * 2 - 2 * ref["per_layer"] * ref["n"] + per_layer * ref["n"]


def test_luq_half_billm_native(skeleton):
    fname, lm = skeleton
    ref = LAYERS[fname]
    half = ref["n"] // 2
    mapping = {n: (BILLM if lm.adapter.block_index(n) < half else W4) for n in _decoder(lm)}
    rep = model_size(lm.model, lm.adapter, mapping, "native")
    assert rep.nominal_bits == pytest.approx((half * 1.08 + (ref["n"] - half) * 4) / ref["n"])
    if fname.startswith("llava"):
        assert rep.nominal_bits == pytest.approx(2.54)  # docs/method.md#nominal-bits
    billm = sum(2 * o * math.ceil(i / 8) + math.ceil(i / 8) + 2 * o * math.ceil(i / 128) * 4 * 2
                for i, o, _ in ref["shapes"])
    # native stores uniform codes as compressed-tensors does, less the int64 weight_shape [2]
    w4 = sum(_hand_ct(o, i, 4, 128, True) - 2 * 8 for i, o, _ in ref["shapes"])
    assert rep.decoder_linear_bytes == half * billm + (ref["n"] - half) * w4


def test_mapped_names_must_be_linears():
    lin = torch.nn.Module()
    lin.a = torch.nn.Module()
    lin.a.q = torch.nn.Linear(256, 64, bias=True, dtype=torch.float16)
    with pytest.raises(ValueError, match="not Linear modules"):
        model_size(lin, LLAVA, {"a.nope": W4}, "gptq")


def test_shape_errors_name_shape_and_reason():
    with pytest.raises(ValueError, match=r"1280x3420.*% 32"):
        linear_bytes(1280, 3420, W4, "gptq", bias=True)  # Qwen2.5-VL vision down_proj
    with pytest.raises(ValueError, match=r"group_size 128 does not divide in_features 3420"):
        linear_bytes(1280, 3420, W4, "compressed-tensors", bias=True)
    with pytest.raises(ValueError, match="GPTQ stores bits"):
        linear_bytes(64, 64, QuantScheme(backend="rtn", bits=5, group_size=32), "gptq", bias=False)
    with pytest.raises(ValueError, match="native"):
        linear_bytes(64, 64, BILLM, "compressed-tensors", bias=False)
    with pytest.raises(ValueError, match="valid formats"):
        linear_bytes(64, 64, W4, "onnx", bias=False)
    # fp ignores the scheme, None keeps any shape
    assert linear_bytes(1280, 3420, W4, "fp", bias=True) == (1280 * 3420 + 1280) * 2
    assert linear_bytes(1280, 3420, None, "gptq", bias=True, dtype_bytes=4) == (1280 * 3420 + 1280) * 4


def test_billm_layout_bits():
    lay = billm_layout(4096, 4096, bias=False)
    assert sum(t.nbytes for t in lay.values()) * 8 / 4096**2 == pytest.approx(3.0, abs=1e-3)
    assert linear_layout(4096, 4096, BILLM, "native", bias=False) == lay


# ---- real check: compressed-tensors' own pack-quantized checkpoint ----

def _ct_args(s: QuantScheme):
    from compressed_tensors.quantization import QuantizationArgs

    if s.group_size == -1:
        return QuantizationArgs(num_bits=s.bits, type="int", symmetric=s.sym, strategy="channel")
    return QuantizationArgs(num_bits=s.bits, type="int", symmetric=s.sym, strategy="group", group_size=s.group_size)


def _save_ct(model, mapping, out):
    """RTN + ModelCompressor pack-quantized, one config group per scheme.

    The round trip described in docs/formats.md#compressed-tensors-pack-quantized.
    """
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, apply_quantization_config
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    groups: dict[QuantScheme, list[str]] = {}
    for name, s in mapping.items():
        groups.setdefault(s, []).append(name)
    cfg = QuantizationConfig(config_groups={f"group_{i}": QuantizationScheme(targets=names, weights=_ct_args(s))
                                            for i, (s, names) in enumerate(groups.items())})
    apply_quantization_config(model, cfg)
    modules = dict(model.named_modules())
    for name, s in mapping.items():
        m = modules[name]
        g = m.in_features if s.group_size == -1 else s.group_size
        wg = m.weight.data.reshape(m.out_features, -1, g)  # [out, in/g, g]
        scale, zero = calculate_qparams(wg.amin(-1), wg.amax(-1), _ct_args(s))
        m.weight_scale.data.copy_(scale.reshape(m.weight_scale.shape))
        m.weight_zero_point.data.copy_(zero.reshape(m.weight_zero_point.shape))
    comp = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    comp.compress_model(model)
    model.save_pretrained(out)
    comp.update_config(out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_predicted_equals_saved_compressed_tensors(tmp_path, dtype):
    from safetensors import safe_open

    from tests.conftest import tiny_llava

    model = tiny_llava().to(dtype)
    lay = "model.language_model.layers"
    mapping = {f"{lay}.0.self_attn.{p}_proj": QuantScheme(backend="rtn", bits=4, group_size=32) for p in "qkv"}
    mapping |= {f"{lay}.0.self_attn.o_proj": QuantScheme(backend="rtn", bits=8, group_size=-1, sym=False),
                f"{lay}.0.mlp.gate_proj": QuantScheme(backend="rtn", bits=2, group_size=64, sym=False),
                f"{lay}.0.mlp.up_proj": QuantScheme(backend="rtn", bits=2, group_size=64, sym=False),
                f"{lay}.0.mlp.down_proj": QuantScheme(backend="rtn", bits=3, group_size=32),
                "model.multi_modal_projector.linear_1": QuantScheme(backend="rtn", bits=4, group_size=32)}
    mapping |= {n: QuantScheme(backend="gptq", bits=4, group_size=64)
                for n, _ in LLAVA.iter_linears(model) if n.startswith(f"{lay}.1.")}
    predicted = model_size(model, LLAVA, mapping, "compressed-tensors")
    layouts = {n: linear_layout(m.out_features, m.in_features, mapping[n], "compressed-tensors",
                                bias=m.bias is not None, dtype_bytes=m.weight.element_size())
               for n, m in model.named_modules() if n in mapping}
    _save_ct(model, mapping, tmp_path)

    saved: dict[str, tuple[tuple[int, ...], int]] = {}
    for f in tmp_path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                t = h.get_tensor(k)
                saved[k] = (tuple(t.shape), t.element_size())
    for name, lay_ in layouts.items():
        legacy = LLAVA.legacy_name(name)
        got = {k[len(legacy) + 1:]: v for k, v in saved.items() if k.startswith(legacy + ".")}
        assert got == {k: (t.shape, t.itemsize) for k, t in lay_.items()}, name
    total = sum(math.prod(s) * e for s, e in saved.values())
    assert abs(predicted.total_bytes - total) <= 0.01 * total
    assert predicted.total_bytes == total
