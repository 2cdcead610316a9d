"""context: image tokens, KV cache and activation estimates from the real configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantlab.models.load import load_config
from quantlab.plan.context import activation_bytes, image_tokens, kv_cache_bytes, smart_resize

CONFIGS = Path(__file__).resolve().parents[2].parent / "shared" / "configs"


@pytest.fixture(scope="module")
def configs():
    if not CONFIGS.is_dir():
        pytest.skip(f"{CONFIGS} not present")
    return {n: load_config(CONFIGS / f"{n}.json") for n in
            ("llava-1.5-7b-hf", "qwen2.5-vl-7b-instruct", "qwen2.5-vl-3b-instruct")}


def test_image_tokens(configs):
    assert image_tokens(configs["llava-1.5-7b-hf"]) == 576  # (336/14)^2, CLS dropped
    assert image_tokens(configs["qwen2.5-vl-7b-instruct"]) == 256  # (448/14)^2 / 4
    assert image_tokens(configs["qwen2.5-vl-7b-instruct"], (56, 56)) == 4
    assert image_tokens(configs["qwen2.5-vl-3b-instruct"], (1000, 700)) == (1008 // 28) * (700 // 28)


def test_smart_resize_budget():
    assert smart_resize(448, 448, 28) == (448, 448)
    h, w = smart_resize(4000, 3000, 28, max_pixels=1_003_520)
    assert h * w <= 1_003_520 and h % 28 == 0 and w % 28 == 0
    assert smart_resize(10, 10, 28) == (56, 56)


def test_kv_cache(configs):
    # LLaVA: 32 layers, 32 KV heads, head_dim 128; 1 image (576) + 512 text tokens
    assert kv_cache_bytes(configs["llava-1.5-7b-hf"], images=1, text_tokens=512) == 2 * 32 * 32 * 128 * 1088 * 2
    # Qwen2.5-VL-7B: 28 layers, 4 KV heads; 2 images of 448x448, batch 2
    assert kv_cache_bytes(configs["qwen2.5-vl-7b-instruct"], images=2, text_tokens=100, batch=2) == \
        2 * 28 * 4 * 128 * (512 + 100) * 2 * 2


def test_activation_estimate_grows(configs):
    cfg = configs["qwen2.5-vl-7b-instruct"]
    a1, a8 = (activation_bytes(cfg, images=k, text_tokens=256) for k in (1, 8))
    assert 0 < a1 < a8
    assert activation_bytes(cfg, images=1, text_tokens=256, eager_attention=True) > a1
