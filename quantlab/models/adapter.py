"""Architecture facts as data: where each family keeps its vision tower, projector, decoder and head.

One :class:`Adapter` per family lives in :data:`ADAPTERS`; nothing else in quantlab knows module paths.
Paths are transformers 5.x module names. ``legacy_names`` maps them to the hub-legacy tensor names that
exported checkpoints must carry (see ``docs/formats.md#tensor-names``): the first matching prefix wins.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import nn


class Component(str, Enum):
    """Which part of a VLM a module belongs to."""

    VISION = "vision"
    PROJECTOR = "projector"
    DECODER = "decoder"
    EMBED = "embed"
    NORM = "norm"
    HEAD = "head"
    OTHER = "other"


@dataclass(frozen=True)
class Adapter:
    """Module paths of one VLM family (transformers 5.x names) and how to rename them on export."""

    family: str
    model_types: tuple[str, ...]
    vision: str  # the whole vision tower (embeddings + blocks)
    vision_blocks: str  # the ModuleList of vision transformer blocks
    projector: str
    decoder: str  # the text model (embeddings + blocks + final norm)
    decoder_blocks: str  # the ModuleList of decoder blocks
    embed_tokens: str
    final_norm: str
    lm_head: str = "lm_head"
    # the pre-attention norm inside a vision block (CLIP: layer_norm1, Qwen2-VL/2.5-VL: norm1): its output is
    # the vision block's LUQ tensor in calibration, as input_layernorm's is a decoder block's
    vision_norm: str = "layer_norm1"
    # the module whose output is the image features in the decoder's token order (one row per image token,
    # raster order). LLaVA: the projector. Qwen2.5-VL's merger runs on tokens still in window order and the
    # tower un-permutes them after it (``Qwen2_5_VisionTransformerPretrainedModel.forward``), so there it is
    # the whole tower, whose ``pooler_output`` holds them. None: the projector.
    image_features: str | None = None
    image_token_attr: tuple[str, ...] = ("image_token_id", "image_token_index")
    legacy_names: tuple[tuple[str, str], ...] = ()
    # transformers 5 module names as checkpoints saved in that layout spell them: the same, but where a
    # sub-model keeps a level transformers 5 drops (LLaVA's CLIP tower: ``vision_model``). vLLM maps these
    # names to its own and needs that level; transformers 5 accepts both (docs/formats.md#tensor-names).
    checkpoint_names: tuple[tuple[str, str], ...] = ()
    # Linears that read the same input inside a block (one Hessian) and that vLLM fuses (one scheme).
    fused_groups: tuple[tuple[str, ...], ...] = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("mlp.gate_proj", "mlp.up_proj"),
    )
    # AWQ's scale pairs inside a decoder block: (producer, consumers that read its output). Scales on the
    # consumers' input columns fold into the producer's weight (a norm) or output rows (a Linear); v -> o only
    # where v_proj's rows match o_proj's inputs (no grouped-query heads). docs/method.md, quantlab/quant/awq.py.
    scale_pairs: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("self_attn.v_proj", ("self_attn.o_proj",)),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp.up_proj", ("mlp.down_proj",)),
    )
    # the same inside a vision block (names relative to the block). Pairs a family's blocks do not have are
    # skipped, so one list serves related towers; consumers behind a non-linear activation (CLIP's fc2, Qwen2-VL's
    # fc2) or a fused producer of another width (Qwen's attn.qkv -> attn.proj) have no pair and get no scales.
    vision_scale_pairs: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("layer_norm1", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("self_attn.v_proj", ("self_attn.out_proj",)),
        ("layer_norm2", ("mlp.fc1",)),
    )
    guessed: tuple[str, ...] = field(default=())  # fields a generic fallback had to guess

    def capture_image_features(self, model: nn.Module, store: dict[str, torch.Tensor], key: str = "features"):
        """Hook that keeps the image features (one row per image token, in the decoder's order, float32) in
        ``store[key]`` on every vision pass; returns the hook handle."""
        def keep(_module, _inputs, output) -> None:
            output = output[0] if isinstance(output, tuple) else output
            feats = getattr(output, "pooler_output", output)
            store[key] = feats.reshape(-1, feats.shape[-1]).float()

        return self.get(model, self.image_features or self.projector).register_forward_hook(keep)

    def get(self, model: nn.Module, path: str) -> nn.Module:
        """The submodule at ``path``, with an error naming the family and the missing path."""
        try:
            return model.get_submodule(path)
        except AttributeError as err:
            raise AttributeError(
                f"{self.family} adapter: module {path!r} not found in {type(model).__name__}; "
                "is this a transformers 5.x model of this family?"
            ) from err

    def blocks(self, model: nn.Module, component: Component = Component.DECODER) -> nn.ModuleList:
        """Decoder blocks (default) or vision blocks as a ModuleList."""
        path = {Component.DECODER: self.decoder_blocks, Component.VISION: self.vision_blocks}[component]
        return self.get(model, path)

    def image_token_id(self, config) -> int:
        """The id of the image placeholder token, read from the model config."""
        for attr in self.image_token_attr:
            value = getattr(config, attr, None)
            if value is not None:
                return int(value)
        raise ValueError(f"{self.family}: config has none of {self.image_token_attr}")

    def image_mask(self, config, input_ids: torch.Tensor) -> torch.Tensor:
        """Boolean mask of image-token positions in ``input_ids``."""
        return input_ids == self.image_token_id(config)

    def component_of(self, name: str) -> Component:
        """Which component a module or parameter name belongs to."""
        def under(prefix: str) -> bool:
            return name == prefix or name.startswith(prefix + ".")

        if under(self.projector):  # first: Qwen's merger sits inside the vision tower's module
            return Component.PROJECTOR
        if under(self.vision):
            return Component.VISION
        if under(self.decoder_blocks):
            return Component.DECODER
        if under(self.embed_tokens):
            return Component.EMBED
        if under(self.final_norm):
            return Component.NORM
        if under(self.lm_head):
            return Component.HEAD
        return Component.OTHER

    def block_index(self, name: str) -> int | None:
        """Decoder block index of a module name, or None if it is not inside a decoder block."""
        m = re.match(re.escape(self.decoder_blocks) + r"\.(\d+)(\.|$)", name)
        return int(m.group(1)) if m else None

    def vision_block_index(self, name: str) -> int | None:
        """Vision block index of a module name, or None if it is not inside a vision block."""
        m = re.match(re.escape(self.vision_blocks) + r"\.(\d+)(\.|$)", name)
        return int(m.group(1)) if m else None

    def legacy_name(self, name: str) -> str:
        """The hub-legacy tensor name for a transformers 5.x parameter name."""
        return _rename(name, self.legacy_names)

    def checkpoint_name(self, name: str) -> str:
        """The tensor name a transformers 5 layout checkpoint uses for a parameter name (see ``checkpoint_names``)."""
        return _rename(name, self.checkpoint_names)

    def iter_linears(self, model: nn.Module, component: Component | None = None) -> Iterator[tuple[str, nn.Linear]]:
        """All ``nn.Linear`` modules, optionally only those of one component, in module order."""
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and (component is None or self.component_of(name) == component):
                yield name, module


def ties_embeddings(config) -> bool:
    """Whether the head shares the token embedding's weight. transformers 5 keeps the flag on the top-level
    config for some families (Qwen2.5-VL) and on the text config for others, so both are read."""
    return bool(getattr(config, "tie_word_embeddings", False)
                or getattr(getattr(config, "text_config", None), "tie_word_embeddings", False))


def _rename(name: str, prefixes: tuple[tuple[str, str], ...]) -> str:
    """``name`` with the first matching ``(new, old)`` prefix replaced (whole dotted components only)."""
    for new, old in prefixes:
        if name == new or name.startswith(new + "."):
            return old + name[len(new):]
    return name


LLAVA = Adapter(
    family="llava",
    model_types=("llava",),
    vision="model.vision_tower",
    vision_blocks="model.vision_tower.encoder.layers",
    projector="model.multi_modal_projector",
    decoder="model.language_model",
    decoder_blocks="model.language_model.layers",
    embed_tokens="model.language_model.embed_tokens",
    final_norm="model.language_model.norm",
    legacy_names=(
        ("model.language_model", "language_model.model"),
        ("model.vision_tower", "vision_tower.vision_model"),
        ("model.multi_modal_projector", "multi_modal_projector"),
        ("lm_head", "language_model.lm_head"),
    ),
    checkpoint_names=(("model.vision_tower", "model.vision_tower.vision_model"),),
)

_QWEN_COMMON = dict(
    vision="model.visual",
    image_features="model.visual",
    vision_norm="norm1",
    vision_scale_pairs=(
        ("norm1", ("attn.qkv",)),
        ("norm2", ("mlp.gate_proj", "mlp.up_proj")),  # Qwen2.5-VL's gated MLP
        ("mlp.up_proj", ("mlp.down_proj",)),
        ("norm2", ("mlp.fc1",)),  # Qwen2-VL's plain MLP
    ),
    vision_blocks="model.visual.blocks",
    projector="model.visual.merger",
    decoder="model.language_model",
    decoder_blocks="model.language_model.layers",
    embed_tokens="model.language_model.embed_tokens",
    final_norm="model.language_model.norm",
    legacy_names=(
        ("model.language_model", "model"),
        ("model.visual", "visual"),
        ("lm_head", "lm_head"),
    ),
)

QWEN2_VL = Adapter(family="qwen2_vl", model_types=("qwen2_vl",), **_QWEN_COMMON)
QWEN2_5_VL = Adapter(family="qwen2_5_vl", model_types=("qwen2_5_vl",), **_QWEN_COMMON)

ADAPTERS: dict[str, Adapter] = {t: a for a in (LLAVA, QWEN2_VL, QWEN2_5_VL) for t in a.model_types}
