"""The budget planner chooses among GGUF types (K-quant grids and Q8_0) under a byte budget, and the GGUF the
export writes holds exactly the bytes the plan predicted for each quantized Linear.

K-quants need rows that are multiples of 256, which the shipped toys do not have, so this runs on a tiny
random LLaVA whose decoder widths are 256 and 512.
"""

from __future__ import annotations

import gguf
import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from quantlab.calib.collect import calibrate
from quantlab.calib.data import CalibSample
from quantlab.models import LoadedModel
from quantlab.models.adapter import Component
from quantlab.models.load import get_adapter
from quantlab.plan.cost import linear_bytes
from quantlab.plan.make import make_plan
from quantlab.quant.apply import quantize
from quantlab.quant.scheme import QuantScheme
from quantlab.recipe import PlanSpec, RuleSpec
from tests.conftest import IMG, tiny_inputs

CANDIDATES = [QuantScheme(backend="gptq", bits=2, group_size=16, sym=False, args={"grid": "q2_k"}),
              QuantScheme(backend="gptq", bits=4, group_size=32, sym=False, args={"grid": "q4_k"}),
              QuantScheme(backend="gptq", bits=6, group_size=16, sym=True, args={"grid": "q6_k"}),
              QuantScheme(backend="gptq", bits=8, group_size=32)]  # Q8_0
KEEP = [RuleSpec(match="component:vision", scheme=None), RuleSpec(match="component:projector", scheme=None),
        RuleSpec(match="component:head", scheme=None)]


@pytest.fixture(scope="module")
def wide():
    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                       image_size=32, patch_size=8, projection_dim=64),
        text_config=LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
        image_token_index=IMG, image_seq_length=16, vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(cfg).eval()
    loaded = LoadedModel(model, None, get_adapter(model), "wide-llava")
    samples = [CalibSample(f"s{i}", x, x["input_ids"][0] == IMG)
               for i, x in enumerate(tiny_inputs("llava", batch=1) for _ in range(3))]
    stats = calibrate(loaded, samples, hessians=True, entropy_k=4, max_tokens=64, linear_max_tokens=64, progress=False)
    return loaded, samples, stats


def test_budget_planner_mixes_gguf_types_and_the_file_holds_the_predicted_bytes(wide, tmp_path):
    loaded, samples, stats = wide
    spec = PlanSpec(planner="budget", candidates=CANDIDATES, target_avg_bits=4.0, rules=KEEP)
    plan = make_plan(loaded, stats, spec, export_format="gguf", samples=samples, progress=False)
    dec = {n: s for n, s in plan.layers.items() if s is not None}
    assert {n for n, _ in loaded.adapter.iter_linears(loaded.model, Component.DECODER)} == set(dec)
    labels = {s.label() for s in dec.values()}
    assert len(labels) > 1 and labels <= {c.label() for c in CANDIDATES}, labels  # a real mix of GGUF types
    assert plan.info["budget"]["unit_bytes"] <= plan.info["budget"]["unit_budget_bytes"]

    from quantlab.export.gguf import encode

    results = quantize(loaded, plan.layers, samples, progress=False)
    for name, r in results.items():
        t_type, blocks = encode(name, r)
        out_f, in_f = r.codes.shape
        assert blocks.nbytes == linear_bytes(out_f, in_f, dec[name], "gguf", bias=False), name
        back = gguf.quants.dequantize(blocks, t_type).reshape(out_f, in_f)
        assert torch.equal(torch.from_numpy(back), r.dequantized.float()), name
