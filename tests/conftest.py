"""Shared fixtures: tiny random VLMs of every supported family, built offline from HF configs."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

IMG, VID, VSTART, VEND = 250, 251, 252, 253

_QWEN_TEXT = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})


def tiny_llava() -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                       image_size=32, patch_size=8, projection_dim=64),
        text_config=LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2),
        image_token_index=IMG, image_seq_length=16, vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="gelu")
    return LlavaForConditionalGeneration(cfg).eval()


def tiny_qwen2_vl() -> Qwen2VLForConditionalGeneration:
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(Qwen2VLConfig(
        text_config=_QWEN_TEXT,
        vision_config=dict(depth=2, embed_dim=32, num_heads=4, mlp_ratio=2, hidden_size=64, patch_size=14,
                           temporal_patch_size=2, spatial_merge_size=2, in_channels=3),
        image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART, vision_end_token_id=VEND)).eval()


def tiny_qwen2_5_vl() -> Qwen2_5_VLForConditionalGeneration:
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=_QWEN_TEXT,
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                           patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=56,
                           fullatt_block_indexes=[1], in_channels=3),
        image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART, vision_end_token_id=VEND)).eval()


TINY_BUILDERS = {"llava": tiny_llava, "qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl}


def tiny_inputs(family: str, batch: int = 2) -> dict[str, torch.Tensor]:
    """Hand-expanded inputs (one image per row) for the tiny models above."""
    if family == "llava":
        ids = torch.tensor([[1, 10, 11] + [IMG] * 16 + [20, 21, 22, 23]] * batch)
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(batch, 3, 32, 32))
    ids = torch.tensor([[1, 10, VSTART] + [IMG] * 4 + [VEND, 20, 21, 22]] * batch)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(batch * 16, 1176),
                image_grid_thw=torch.tensor([[1, 4, 4]] * batch), mm_token_type_ids=(ids == IMG).long())


@pytest.fixture(params=sorted(TINY_BUILDERS))
def tiny_family(request):
    """(family, model) for every supported family."""
    return request.param, TINY_BUILDERS[request.param]()


def pytest_configure(config) -> None:
    """Under pytest-xdist (``make test`` runs two workers on the two cores) each worker and the processes its
    tests start compute on one thread: two workers with two threads each would fight over the cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = "1"
        torch.set_num_threads(1)
