"""What llama.cpp expects of each family, as data: one :class:`GGUFFamily` per quantlab adapter family.

Facts from llama.cpp's converter and loaders (``convert_hf_to_gguf.py`` with ``conversion/{base,llama,
qwenvl}.py``, ``tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py`` for the CLIP encoder of
LLaVA-1.5, ``tools/mtmd/clip.cpp`` / ``clip-impl.h`` for the keys and tensor names mtmd reads,
``src/llama-vocab.cpp`` for the pre-tokenizers). Tensor names go through gguf-py's own tables
(``gguf.get_tensor_name_map``) from the hub-legacy names (``quantlab/models/adapter.py``), after the
renames below; see ``docs/formats.md#gguf``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import gguf
import torch

K = gguf.Keys.ClipVision


@dataclass(frozen=True)
class GGUFFamily:
    """How one family is split into a language-model GGUF and an mmproj GGUF.

    Attributes:
        family: the quantlab adapter family (``quantlab.models.adapter``).
        text_arch: llama.cpp architecture of the language model.
        projector: ``clip.projector_type`` of the mmproj.
        pre_tokenizer: ``tokenizer.ggml.pre`` (checked against the tokenizer, see ``PRE_TOKENIZERS``).
        vision: hub-legacy name prefixes that go to the mmproj (the rest goes to the language model).
        renames: ``(legacy prefix, name)`` applied first, first match wins; a name gguf-py's tables know, or
            with ``gguf:`` the GGUF name itself.
        drop: legacy tensor names llama.cpp does not read.
        rope_rows: Linears whose rows llama.cpp wants in its rotary order (``LlamaModel.permute``), with the
            config attribute giving their head count.
        fused_qkv: the Linear suffix of a fused ``[q; k; v]`` projection written as three tensors.
        temporal_patch: the Conv3d patch embedding written as two Conv2d (``v.patch_embd.weight``, ``.1``).
        vision_keys: ``(config, image processor) -> {key: value}`` for the mmproj.
        refuse: ``config -> reason | None``: configurations llama.cpp would run differently.
    """

    family: str
    text_arch: gguf.MODEL_ARCH
    projector: str
    pre_tokenizer: str
    vision: tuple[str, ...]
    vision_keys: Callable[[Any, Any], dict[str, Any]]
    renames: tuple[tuple[str, str], ...] = ()
    drop: tuple[str, ...] = ()
    rope_rows: tuple[tuple[str, str], ...] = ()
    fused_qkv: str | None = None
    temporal_patch: str | None = None
    refuse: Callable[[Any], str | None] = lambda config: None


# tokenizer.json ``pre_tokenizer`` of each llama.cpp pre-tokenizer quantlab writes (llama-vocab.cpp:
# "gpt-2" splits with GPT-2's regex, as the ByteLevel pre-tokenizer with ``use_regex`` does)
PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    "gpt-2": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
}


def _common_vision(v, processor, text_hidden: int) -> dict[str, Any]:
    return {gguf.Keys.Clip.HAS_VISION_ENCODER: True,
            K.PROJECTION_DIM: text_hidden,
            K.IMAGE_MEAN: [float(x) for x in processor.image_mean],
            K.IMAGE_STD: [float(x) for x in processor.image_std]}


def _clip_keys(config, processor) -> dict[str, Any]:
    """LLaVA's CLIP encoder (legacy converter): quick GELU unless ``hidden_act`` is gelu, the feature layer
    made non-negative (``n + 1 + layer``), no post-layernorm (LLaVA reads the hidden state before it)."""
    v = config.vision_config
    layer = config.vision_feature_layer
    return {**_common_vision(v, processor, config.text_config.hidden_size),
            K.IMAGE_SIZE: v.image_size, K.PATCH_SIZE: v.patch_size, K.EMBEDDING_LENGTH: v.hidden_size,
            K.FEED_FORWARD_LENGTH: v.intermediate_size, K.BLOCK_COUNT: v.num_hidden_layers,
            K.Attention.HEAD_COUNT: v.num_attention_heads, K.Attention.LAYERNORM_EPS: v.layer_norm_eps,
            K.USE_GELU: v.hidden_act == "gelu",
            "clip.vision.feature_layer": [layer if layer >= 0 else v.num_hidden_layers + 1 + layer]}


def _llava_refuse(config) -> str | None:
    if not isinstance(config.vision_feature_layer, int):
        return "several vision feature layers (llama.cpp's llava graph stacks them only for granite)"
    if config.vision_feature_select_strategy != "default":
        return f"vision_feature_select_strategy={config.vision_feature_select_strategy!r} (mtmd drops CLS always)"
    if config.projector_hidden_act != "gelu":
        return f"projector_hidden_act={config.projector_hidden_act!r} (mtmd's mlp projector applies GELU)"
    if config.vision_config.hidden_act not in ("gelu", "quick_gelu"):
        return f"vision hidden_act={config.vision_config.hidden_act!r}"
    return None


def _qwen25_keys(config, processor) -> dict[str, Any]:
    """Qwen2.5-VL (conversion/qwenvl.py): SiLU MLP, window attention every ``n_wa_pattern``-th block full,
    RMS eps 1e-6 (hard-coded in transformers' vision blocks), the window in pixels (``window_size``)."""
    v = config.vision_config
    full = list(v.fullatt_block_indexes)
    return {**_common_vision(v, processor, config.text_config.hidden_size),
            K.IMAGE_SIZE: 560, K.PATCH_SIZE: v.patch_size, K.EMBEDDING_LENGTH: v.hidden_size,
            K.FEED_FORWARD_LENGTH: v.intermediate_size, K.BLOCK_COUNT: v.depth,
            K.Attention.HEAD_COUNT: v.num_heads, K.Attention.LAYERNORM_EPS: 1e-6, K.USE_SILU: True,
            K.SPATIAL_MERGE_SIZE: v.spatial_merge_size, K.N_WA_PATTERN: full[0] + 1,
            K.WINDOW_SIZE: v.window_size}


def _qwen25_refuse(config) -> str | None:
    v = config.vision_config
    full = list(v.fullatt_block_indexes)
    if not full or any(b - a != full[0] + 1 for a, b in pairwise(full)):
        return f"fullatt_block_indexes={full} is not every n-th block (mtmd's n_wa_pattern)"
    if v.hidden_act != "silu" or v.temporal_patch_size != 2:
        return f"vision hidden_act={v.hidden_act!r}, temporal_patch_size={v.temporal_patch_size} (mtmd: silu, 2)"
    return None


LLAVA = GGUFFamily(
    family="llava", text_arch=gguf.MODEL_ARCH.LLAMA, projector="mlp", pre_tokenizer="gpt-2",
    vision=("vision_tower.", "multi_modal_projector."), vision_keys=_clip_keys, refuse=_llava_refuse,
    renames=(("language_model.", ""),  # conversion/base.py filter_tensors
             ("multi_modal_projector.linear_1", "gguf:mm.0"), ("multi_modal_projector.linear_2", "gguf:mm.2")),
    drop=("vision_tower.vision_model.post_layernorm.weight", "vision_tower.vision_model.post_layernorm.bias"),
    rope_rows=(("self_attn.q_proj", "num_attention_heads"), ("self_attn.k_proj", "num_key_value_heads")),
)

QWEN2_5_VL = GGUFFamily(
    family="qwen2_5_vl", text_arch=gguf.MODEL_ARCH.QWEN2VL, projector=gguf.VisionProjectorType.QWEN25VL,
    pre_tokenizer="gpt-2", vision=("visual.",), vision_keys=_qwen25_keys, refuse=_qwen25_refuse,
    fused_qkv="attn.qkv", temporal_patch="visual.patch_embed.proj.weight",
)

GGUF_FAMILIES: dict[str, GGUFFamily] = {f.family: f for f in (LLAVA, QWEN2_5_VL)}


def rope_permutation(rows: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp's Llama wants for q/k (``LlamaModel.permute``: each head's two rotary halves
    interleaved): ``weight[perm]`` is the converted weight."""
    idx = torch.arange(rows)
    return idx.reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)


def row_pieces(fam: GGUFFamily, legacy: str, rows: int, text_config) -> list[tuple[str, torch.Tensor | None]]:
    """The tensors one ``[rows, ...]`` weight or bias becomes: ``(legacy-style name, row index or None)``."""
    module, _, leaf = legacy.rpartition(".")
    if fam.fused_qkv and module.endswith(fam.fused_qkv):
        c = rows // 3
        return [(f"{module[:-3]}{p}.{leaf}", torch.arange(i * c, (i + 1) * c)) for i, p in enumerate("qkv")]
    for suffix, heads in fam.rope_rows:
        if module.endswith(suffix) and not legacy.startswith(fam.vision):
            return [(legacy, rope_permutation(rows, getattr(text_config, heads)))]
    return [(legacy, None)]


def gguf_name(fam: GGUFFamily, legacy: str, tensor_map: gguf.TensorNameMap) -> str | None:
    """The GGUF tensor name of a legacy tensor name (None: llama.cpp does not read it).

    Raises:
        KeyError: a tensor neither gguf-py's tables nor the family's renames know.
    """
    if legacy in fam.drop:
        return None
    name = legacy
    for old, new in fam.renames:
        if name.startswith(old):
            name = new + name[len(old):]
            break
    if name.startswith("gguf:"):
        return name[len("gguf:"):]
    mapped = tensor_map.get_name(name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise KeyError(f"gguf: no GGUF name for tensor {legacy!r} ({fam.family}); add it to its GGUFFamily")
    return mapped
