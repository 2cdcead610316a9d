"""Memory of a multimodal context beside the weights: image tokens, KV cache, prefill activations.

With :func:`quantlab.plan.cost.model_size` this answers "does the model fit in N GB with K images":
``weights + kv_cache_bytes(...) + activation_bytes(...) <= N``.

Image tokens per image (``docs/context-memory.md#image-tokens-per-image``):

| family              | tokens per image                                                                |
|---------------------|---------------------------------------------------------------------------------|
| llava               | ``(image_size // patch_size)**2`` (+1 with ``vision_feature_select_strategy="full"``) |
| qwen2_vl, qwen2_5_vl | ``(H'/patch)·(W'/patch) / merge**2`` with (H', W') = Qwen's ``smart_resize`` of the |
|                     | image to multiples of ``patch·merge`` inside [min_pixels, max_pixels]             |
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

QWEN_MIN_PIXELS = 56 * 56  # Qwen2(.5)-VL preprocessor_config.json defaults
QWEN_MAX_PIXELS = 12845056
DEFAULT_IMAGE_HW = (448, 448)


def smart_resize(height: int, width: int, factor: int, min_pixels: int = QWEN_MIN_PIXELS,
                 max_pixels: int = QWEN_MAX_PIXELS) -> tuple[int, int]:
    """Qwen2-VL's resize rule: multiples of ``factor``, pixel count inside [min_pixels, max_pixels]."""
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def _llava_tokens(config: Any, image_hw: tuple[int, int] | None, max_pixels: int) -> tuple[int, int]:
    vc = config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    extra = 1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else 0
    return n + extra, n + 1  # (LM tokens, vision-tower tokens incl. CLS)


def _qwen_tokens(config: Any, image_hw: tuple[int, int] | None, max_pixels: int) -> tuple[int, int]:
    vc = config.vision_config
    merge = vc.spatial_merge_size
    h, w = smart_resize(*(image_hw or DEFAULT_IMAGE_HW), factor=vc.patch_size * merge, max_pixels=max_pixels)
    patches = (h // vc.patch_size) * (w // vc.patch_size)
    return patches // merge**2, patches


_IMAGE_TOKENS: dict[str, Callable[[Any, tuple[int, int] | None, int], tuple[int, int]]] = {
    "llava": _llava_tokens,
    "qwen2_vl": _qwen_tokens,
    "qwen2_5_vl": _qwen_tokens,
}


def _tokens(config: Any, image_hw: tuple[int, int] | None, max_pixels: int) -> tuple[int, int]:
    if config.model_type not in _IMAGE_TOKENS:
        raise ValueError(f"no image-token rule for model_type {config.model_type!r}; known: {sorted(_IMAGE_TOKENS)}")
    return _IMAGE_TOKENS[config.model_type](config, image_hw, max_pixels)


def image_tokens(config: Any, image_hw: tuple[int, int] | None = None, *, max_pixels: int = QWEN_MAX_PIXELS
                 ) -> int:
    """Language-model tokens one image occupies.

    Args:
        config: the VLM config (``model.config``).
        image_hw: (height, width) of the input image; Qwen only (LLaVA resizes to ``image_size``).
            Default 448x448, i.e. (448/14)**2 / 4 = 256 tokens for Qwen.
        max_pixels: Qwen pixel budget per image.
    """
    return _tokens(config, image_hw, max_pixels)[0]


def _text(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config.text_config


def kv_cache_bytes(config: Any, *, images: int, text_tokens: int, batch: int = 1, dtype_bytes: int = 2,
                   image_hw: tuple[int, int] | None = None) -> int:
    """KV cache of a context of ``images`` images plus ``text_tokens`` text tokens (generated included).

    ``2 (K, V) · layers · kv_heads · head_dim · tokens · batch · dtype_bytes``.
    """
    tc = _text(config)
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    kv_heads = getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
    tokens = images * image_tokens(config, image_hw) + text_tokens
    return 2 * tc.num_hidden_layers * kv_heads * head_dim * tokens * batch * dtype_bytes


def activation_bytes(config: Any, *, images: int, text_tokens: int, batch: int = 1, dtype_bytes: int = 2,
                     image_hw: tuple[int, int] | None = None, eager_attention: bool = False) -> int:
    """Rough peak of transient prefill activations (weights and KV cache excluded). An estimate, not exact.

    The larger of the vision tower and the decoder, for one layer at a time: residual stream + normed input
    (2·hidden) and the MLP's gate, up and product (3·intermediate) per token; with ``eager_attention`` also
    the ``heads·T²`` score matrix (SDPA / flash attention do not materialize it). Plus fp32 logits for the
    last position only (``logits_to_keep=1`` during generation).
    """
    tc, vc = _text(config), config.vision_config
    lm_tokens, vis_tokens = _tokens(config, image_hw, QWEN_MAX_PIXELS)
    t = images * lm_tokens + text_tokens
    decoder = t * (2 * tc.hidden_size + 3 * tc.intermediate_size)
    if eager_attention:
        decoder += tc.num_attention_heads * t * t
    v_hidden = getattr(vc, "embed_dim", None) or vc.hidden_size
    v_inter = getattr(vc, "intermediate_size", None) or int(v_hidden * vc.mlp_ratio)
    vision = images * vis_tokens * (2 * v_hidden + 3 * v_inter)
    return batch * max(decoder, vision) * dtype_bytes + batch * tc.vocab_size * 4
