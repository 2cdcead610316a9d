"""Adapters resolve the real module trees of every family and classify their modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantlab.models import ADAPTERS, Component, get_adapter
from tests.conftest import IMG, tiny_inputs


def test_every_family_resolves_all_paths(tiny_family):
    family, model = tiny_family
    a = get_adapter(model)
    assert a.family == family
    for path in (a.vision, a.vision_blocks, a.projector, a.decoder, a.decoder_blocks, a.embed_tokens, a.final_norm,
                 a.lm_head):
        assert isinstance(a.get(model, path), nn.Module), path
    assert len(a.blocks(model)) == model.config.text_config.num_hidden_layers
    assert len(a.blocks(model, Component.VISION)) == 2
    assert isinstance(a.get(model, a.embed_tokens), nn.Embedding)


def test_linears_are_classified_by_component(tiny_family):
    family, model = tiny_family
    a = get_adapter(model)
    comps = {name: a.component_of(name) for name, _ in a.iter_linears(model)}
    assert Component.OTHER not in comps.values(), comps
    decoder = [n for n, c in comps.items() if c == Component.DECODER]
    assert len(decoder) == 2 * 7  # q, k, v, o, gate, up, down per block
    assert comps["lm_head"] == Component.HEAD
    assert {a.block_index(n) for n in decoder} == {0, 1}
    assert a.block_index("lm_head") is None


def test_image_mask_matches_image_tokens(tiny_family):
    family, model = tiny_family
    a = get_adapter(model)
    inputs = tiny_inputs(family)
    mask = a.image_mask(model.config, inputs["input_ids"])
    assert a.image_token_id(model.config) == IMG
    assert int(mask[0].sum()) == (16 if family == "llava" else 4)
    with torch.no_grad():
        model(**inputs)  # the mask's token count is what the model itself accepts


@pytest.mark.parametrize("family,name,legacy", [
    ("llava", "model.language_model.layers.3.mlp.up_proj.weight", "language_model.model.layers.3.mlp.up_proj.weight"),
    ("llava", "model.vision_tower.encoder.layers.0.mlp.fc1.bias", "vision_tower.vision_model.encoder.layers.0.mlp.fc1.bias"),
    ("llava", "model.multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_1.weight"),
    ("llava", "lm_head.weight", "language_model.lm_head.weight"),
    ("qwen2_5_vl", "model.language_model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight"),
    ("qwen2_5_vl", "model.visual.merger.mlp.0.weight", "visual.merger.mlp.0.weight"),
    ("qwen2_vl", "lm_head.weight", "lm_head.weight"),
])
def test_legacy_names(family, name, legacy):
    assert ADAPTERS[family].legacy_name(name) == legacy


def test_unknown_architecture_lists_supported():
    class Cfg:
        model_type = "gpt2"

    with pytest.raises(ValueError, match=r"unsupported architecture 'gpt2'.*llava.*qwen2_5_vl.*qwen2_vl"):
        get_adapter(Cfg())


def test_qwen_merger_is_the_projector_not_vision():
    a = ADAPTERS["qwen2_5_vl"]
    assert a.component_of("model.visual.merger.mlp.0") == Component.PROJECTOR
    assert a.component_of("model.visual.blocks.0.attn.qkv") == Component.VISION


def test_captured_image_features_are_in_the_decoders_token_order(tiny_family):
    """The hook keeps what the decoder's image tokens receive. Qwen2.5-VL's merger sees its tokens in window
    order (an 8 x 8 patch grid: four 2 x 2 windows of merged tokens), so a hook on the projector would not."""
    family, model = tiny_family
    a = get_adapter(model)
    if family == "llava":
        pixels = {"pixel_values": torch.randn(2, 3, 32, 32)}
    else:
        pixels = {"pixel_values": torch.randn(2 * 64, 1176), "image_grid_thw": torch.tensor([[1, 8, 8]] * 2)}
    store: dict[str, torch.Tensor] = {}
    merger: list[torch.Tensor] = []
    handles = [a.capture_image_features(model, store),
               a.get(model, a.projector).register_forward_hook(lambda _m, _i, o: merger.append(o))]
    with torch.no_grad():
        out = model.get_image_features(**pixels)
    for h in handles:
        h.remove()
    feats = getattr(out, "pooler_output", out)
    expected = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats]).float()
    assert torch.equal(store["features"], expected)
    if family == "qwen2_5_vl":  # the case the adapter fact exists for
        assert not torch.equal(merger[0].float(), expected)
