"""Build the toy VLMs: real transformers architectures at tiny size, with real processors made offline.

Each toy is described by a :class:`ToySpec` (data, not code paths): its transformers config, its
special tokens and its chat template. :func:`build_toy` trains a small byte-level BPE tokenizer on the
shapes-VQA vocabulary, wraps it in the family's real processor class, and instantiates the model with
random weights; :mod:`quantlab.toys.train` then trains it.

Widths: decoder widths are multiples of 128 (so group-size-128 recipes written for real models apply
unchanged); the vision MLP width is deliberately awkward (228, not divisible by 32, like Qwen2.5-VL-7B's
3420) so that shape fallbacks are exercised.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from quantlab.data import shapes
from quantlab.models.processors import ImageOnlyQwen2_5_VLProcessor

IMAGE_PX = 64  # 4x4 board of 16 px cells
CELL_PX = 16
VOCAB_SIZE = 512
AWKWARD_VISION_MLP = 228  # not divisible by 32: exercises the "shape a scheme cannot take" paths

LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class ToySpec:
    """Everything that distinguishes one toy VLM: a name, its tokens, template and builders."""

    name: str
    model_type: str
    specials: tuple[str, ...]
    tokenizer_kwargs: dict[str, Any]
    chat_template: str
    make_config: Callable[[PreTrainedTokenizerFast], Any]
    make_processor: Callable[[PreTrainedTokenizerFast, str], Any]
    model_class: type
    notes: dict[str, Any] = field(default_factory=dict)


def _llava_config(tok: PreTrainedTokenizerFast) -> LlavaConfig:
    return LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=128, intermediate_size=AWKWARD_VISION_MLP, num_hidden_layers=3, num_attention_heads=4,
            image_size=IMAGE_PX, patch_size=CELL_PX, projection_dim=128,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_hidden_layers=8,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            tie_word_embeddings=False,
        ),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=(IMAGE_PX // CELL_PX) ** 2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )


def _llava_processor(tok: PreTrainedTokenizerFast, template: str) -> LlavaProcessor:
    ip = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_PX}, crop_size={"height": IMAGE_PX, "width": IMAGE_PX}, do_center_crop=True,
    )
    return LlavaProcessor(
        image_processor=ip, tokenizer=tok, patch_size=CELL_PX, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, image_token="<image>", chat_template=template,
    )


# Qwen2.5-VL: patch 8, merge 2 -> one merged image token per 16 px cell.
QWEN_PATCH, QWEN_MERGE, QWEN_TPATCH = 8, 2, 2


def _qwen25_config(tok: PreTrainedTokenizerFast) -> Qwen2_5_VLConfig:
    ids = tok.convert_tokens_to_ids
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_hidden_layers=8,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            bos_token_id=ids("<|im_start|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            depth=3, hidden_size=128, intermediate_size=AWKWARD_VISION_MLP, num_heads=4, out_hidden_size=128,
            patch_size=QWEN_PATCH, temporal_patch_size=QWEN_TPATCH, spatial_merge_size=QWEN_MERGE,
            window_size=32, fullatt_block_indexes=[2], in_channels=3,
        ),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def _qwen25_processor(tok: PreTrainedTokenizerFast, template: str) -> ImageOnlyQwen2_5_VLProcessor:
    px = IMAGE_PX * IMAGE_PX
    ip = Qwen2VLImageProcessorPil(
        min_pixels=px, max_pixels=px, patch_size=QWEN_PATCH, temporal_patch_size=QWEN_TPATCH, merge_size=QWEN_MERGE,
    )
    return ImageOnlyQwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, chat_template=template)


TOYS: dict[str, ToySpec] = {
    "toy-llava": ToySpec(
        name="toy-llava",
        model_type="llava",
        specials=("<pad>", "<s>", "</s>", "<unk>", "<image>"),
        tokenizer_kwargs=dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                              extra_special_tokens={"image_token": "<image>"}),
        chat_template=LLAVA_TEMPLATE,
        make_config=_llava_config,
        make_processor=_llava_processor,
        model_class=LlavaForConditionalGeneration,
    ),
    "toy-qwen2.5-vl": ToySpec(
        name="toy-qwen2.5-vl",
        model_type="qwen2_5_vl",
        specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"),
        tokenizer_kwargs=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
                              extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                                    "vision_bos_token": "<|vision_start|>",
                                                    "vision_eos_token": "<|vision_end|>"}),
        chat_template=QWEN_TEMPLATE,
        make_config=_qwen25_config,
        make_processor=_qwen25_processor,
        model_class=Qwen2_5_VLForConditionalGeneration,
    ),
}


def tokenizer_corpus(n_scenes: int = 2000) -> Iterable[str]:
    """Text the toy tokenizers are trained on: shapes-VQA questions, answers and captions."""
    for split in ("train", "calibration"):
        for s in shapes.iter_samples(split, n_scenes):
            yield s.question
            yield " " + s.answer
            yield s.caption()
    yield "USER: ASSISTANT: user assistant system"


def build_tokenizer(spec: ToySpec, vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer offline (deterministic for a fixed corpus)."""
    tok = Tokenizer(models.BPE(unk_token=spec.tokenizer_kwargs.get("unk_token")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(spec.specials), special_tokens=list(spec.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **spec.tokenizer_kwargs)


def build_toy(name: str, seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """A randomly initialised toy VLM and its processor (untrained; see ``quantlab.toys.train``)."""
    if name not in TOYS:
        raise KeyError(f"unknown toy model {name!r}; expected one of {sorted(TOYS)}")
    spec = TOYS[name]
    tok = build_tokenizer(spec)
    processor = spec.make_processor(tok, spec.chat_template)
    torch.manual_seed(seed)
    model = spec.model_class(spec.make_config(tok)).eval()
    return model, processor
