"""GPTQ v1 export: packing equals AutoGPTQ's reference loops; config rules for mixed plans."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from quantlab.export.gptq import check_result, gptq_config, gptq_tensors
from quantlab.export.io import write_json
from quantlab.models import Component


def autogptq_pack(intweight: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's QuantLinear.pack loop (qlinear_cuda.py), on an (in, out) array of unsigned codes."""
    iw = intweight.astype(np.uint32)
    qweight = np.zeros((iw.shape[0] // 32 * bits, iw.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                qweight[row] |= iw[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3 bits: the 10-1-10-1-10 layout
            for j in range(i, i + 10):
                qweight[row] |= iw[j] << (3 * (j - i))
            i += 10
            qweight[row] |= iw[i] << 30
            row += 1
            qweight[row] |= (iw[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= iw[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= iw[i] << 31
            row += 1
            qweight[row] |= (iw[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= iw[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return qweight.view(np.int32)


def result(bits: int, out: int = 64, cols: int = 96, group: int = 32):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (out, cols), generator=g, dtype=torch.uint8)
    scales = torch.rand(out, cols // group, generator=g) + 0.1
    return SimpleNamespace(bits=bits, group_size=group, sym=True, codes=codes, scales=scales, zeros=None, g_idx=None, args={})


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_qweight_and_qzeros_match_autogptq(bits):
    r = result(bits)
    t = gptq_tensors(r, "m")
    ref = autogptq_pack(r.codes.T.numpy(), bits)
    assert np.array_equal(t["m.qweight"].numpy(), ref)
    zeros_minus_one = np.full((r.scales.shape[1], 64), 2 ** (bits - 1) - 1)
    assert np.array_equal(t["m.qzeros"].numpy(), autogptq_pack(zeros_minus_one.T, bits).T)
    assert t["m.scales"].dtype == torch.float16 and t["m.scales"].shape == (3, 64)
    assert torch.equal(t["m.g_idx"], (torch.arange(96) // 32).int())


def test_refusals_name_the_module():
    bad = SimpleNamespace(bits=5, group_size=32, sym=False, codes=torch.zeros(40, 96, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"layers.0.q_proj.*bits=5.*asymmetric.*40x96"):
        check_result("layers.0.q_proj", bad)


def test_mixed_plan_writes_dynamic_rules():
    res = {f"model.language_model.layers.{i}.mlp.down_proj": result(8 if i == 1 else 4) for i in range(3)}
    linears = list(res) + ["model.language_model.layers.0.self_attn.o_proj", "lm_head"]
    comp = lambda n: Component.DECODER if "layers" in n else Component.HEAD  # noqa: E731
    cfg = gptq_config(res, linears, comp)
    assert (cfg["bits"], cfg["group_size"], cfg["sym"], cfg["desc_act"], cfg["format"]) == (4, 32, True, False, "gptq")
    assert cfg["dynamic"][r"+:.*layers\.1\.mlp\.down_proj.*"] == {"bits": 8, "group_size": 32}
    assert r"-:.*layers\.0\.self_attn\.o_proj.*" in cfg["dynamic"]
    assert all(k[:2] in ("+:", "-:") for k in cfg["dynamic"])


def test_dynamic_exclusions_precede_overrides_on_disk(tmp_path):
    # GPTQModel resolves ``dynamic`` first-match: a "+:" override listed before a "-:" exclusion would win.
    res = {f"model.language_model.layers.{i}.mlp.down_proj": result(8 if i == 1 else 4) for i in range(3)}
    linears = list(res) + ["model.language_model.layers.0.self_attn.o_proj", "lm_head"]
    comp = lambda n: Component.DECODER if "layers" in n else Component.HEAD  # noqa: E731
    write_json(tmp_path / "config.json", {"quantization_config": gptq_config(res, linears, comp)})
    keys = list(json.loads((tmp_path / "config.json").read_text())["quantization_config"]["dynamic"])
    kinds = [k[:2] for k in keys]
    assert kinds == sorted(kinds, key=lambda k: k != "-:") and "+:" in kinds
