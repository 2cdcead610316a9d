"""AWQ's pure parts: folding scales leaves the fp function unchanged; the grid search finds the best α."""

from __future__ import annotations

import pytest
import torch

from quantlab.models import Component, get_adapter
from quantlab.quant.awq import awq_scales, fold_scales, search_alpha
from tests.conftest import TINY_BUILDERS


def test_scales_are_normalised_powers_of_the_activation_means():
    m = torch.tensor([0.5, 2.0, 8.0])
    s = awq_scales(m, 0.5)
    torch.testing.assert_close(s.max() * s.min(), torch.tensor(1.0))
    torch.testing.assert_close(s / s[0], (m / m[0]).sqrt())
    assert torch.equal(awq_scales(m, 0.0), torch.ones(3))


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_folding_into_norms_and_linears_leaves_the_block_unchanged(family):
    """input_layernorm -> q/k/v, post_attention_layernorm -> gate/up, up -> down and, where v_proj's rows
    match o_proj's inputs, v -> o: the block's output moves by at most 1e-5 (relative)."""
    model = TINY_BUILDERS[family]().eval().float()
    block = get_adapter(model).blocks(model, Component.DECODER)[0]
    torch.manual_seed(0)
    hidden = torch.randn(1, 9, model.config.text_config.hidden_size)
    pos = torch.arange(9)[None]
    rotary = model.model.language_model.rotary_emb
    emb = rotary(hidden, pos[None].expand(3, 1, 9) if family == "qwen2_5_vl" else pos)
    before = block(hidden, position_embeddings=emb)
    width = hidden.shape[-1]
    g = torch.Generator().manual_seed(1)
    a, m = block.self_attn, block.mlp
    fold_scales(block.input_layernorm, [a.q_proj, a.k_proj, a.v_proj], torch.rand(width, generator=g) + 0.5)
    fold_scales(block.post_attention_layernorm, [m.gate_proj, m.up_proj], torch.rand(width, generator=g) + 0.5)
    fold_scales(m.up_proj, [m.down_proj], torch.rand(m.up_proj.out_features, generator=g) + 0.5)
    if a.v_proj.out_features == a.o_proj.in_features:
        fold_scales(a.v_proj, [a.o_proj], torch.rand(a.v_proj.out_features, generator=g) + 0.5)
    after = block(hidden, position_embeddings=emb)
    before, after = (t[0] if isinstance(t, tuple) else t for t in (before, after))
    assert (after - before).norm() / before.norm() < 1e-5


def test_fold_refuses_mismatched_widths():
    lin = torch.nn.Linear(8, 4)
    with pytest.raises(ValueError, match="consumer has 8 inputs, scales 4"):
        fold_scales(torch.nn.LayerNorm(4), [lin], torch.ones(4))


def test_search_alpha_picks_the_grid_minimum_and_keeps_alpha_zero():
    m = torch.tensor([1.0, 4.0])
    alpha, s, losses = search_alpha(m, lambda s: float((s[1] / s[0] - 1.6) ** 2), grid=10)
    assert len(losses) == 10 and losses[int(alpha * 10)] == min(losses)
    assert alpha == pytest.approx(0.3)  # 4^0.3 = 1.516, the closest grid point to 1.6
    torch.testing.assert_close(s, awq_scales(m, alpha))
    assert search_alpha(m, lambda s: 0.0, grid=4)[0] == 0.0  # ties keep plain quantization


def test_folding_v_into_o_without_grouped_heads():
    """v_proj -> o_proj (AWQ's scale_fc_fc) where every query head has its own value head."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import (
        LlamaDecoderLayer,
        LlamaRotaryEmbedding,
    )

    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4)
    torch.manual_seed(0)
    block = LlamaDecoderLayer(cfg, 0).eval()
    hidden = torch.randn(1, 7, 64)
    emb = LlamaRotaryEmbedding(cfg)(hidden, torch.arange(7)[None])
    before = block(hidden, position_embeddings=emb)
    fold_scales(block.self_attn.v_proj, [block.self_attn.o_proj], torch.rand(64) + 0.5)
    after = block(hidden, position_embeddings=emb)
    before, after = (t[0] if isinstance(t, tuple) else t for t in (before, after))
    assert (after - before).norm() / before.norm() < 1e-5


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen2_5_vl"])
def test_every_adapter_scale_pair_resolves_in_a_decoder_block(family):
    model = TINY_BUILDERS[family]()
    adapter = get_adapter(model)
    block = adapter.blocks(model, Component.DECODER)[0]
    for producer, consumers in adapter.scale_pairs:
        p = block.get_submodule(producer)
        width = p.out_features if isinstance(p, torch.nn.Linear) else p.weight.shape[0]
        for c in consumers:
            lin = block.get_submodule(c)
            assert isinstance(lin, torch.nn.Linear)
            assert lin.in_features == width or producer.endswith("v_proj"), (producer, c)


def test_block_pairs_are_the_foldable_pairs_whose_consumers_are_all_quantized():
    """A pair applies when a consumer asks for awq, every consumer is quantized (a kept one is exported as the
    checkpoint has it) and the shapes fold (v -> o not under the tiny LLaVA's grouped heads)."""
    from quantlab.quant.awq import block_pairs
    from quantlab.quant.scheme import QuantScheme

    model = TINY_BUILDERS["llava"]()
    adapter = get_adapter(model)
    block = adapter.blocks(model, Component.DECODER)[0]
    prefix = f"{adapter.decoder_blocks}.0."
    awq_scheme = QuantScheme(backend="rtn", bits=4, group_size=32, args={"awq": True})
    planned = {prefix + n: awq_scheme for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    every = block_pairs(adapter.scale_pairs, block, prefix, planned)
    assert [p for p, _ in every] == [prefix + "input_layernorm", prefix + "post_attention_layernorm",
                                     prefix + "mlp.up_proj"]  # v_proj: 2 kv heads, o_proj: 4 heads
    planned[prefix + "self_attn.v_proj"] = None
    planned[prefix + "mlp.down_proj"] = QuantScheme(backend="rtn", bits=4, group_size=32)  # no awq asked
    assert [p for p, _ in block_pairs(adapter.scale_pairs, block, prefix, planned)] == [
        prefix + "post_attention_layernorm"]
