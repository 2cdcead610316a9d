"""Build the toy VLMs: real transformers architectures at tiny size, with real processors made offline.

Each toy is described by a :class:`ToySpec` (data, not code paths): its transformers config, its
special tokens and its chat template. :func:`build_toy` trains a small byte-level BPE tokenizer on the
shapes-VQA vocabulary, wraps it in the family's real processor class, and instantiates the model with
random weights; :mod:`quantlab.toys.train` then trains it.

Two sizes (:class:`ToySize`):

- ``toy-llava``, ``toy-qwen2.5-vl`` (shapes-VQA, demo and fast tests): decoder widths are multiples of 128
  (so group-size-128 recipes written for real models apply unchanged); the vision MLP width is deliberately
  awkward (228, not divisible by 32, like Qwen2.5-VL-7B's 3420) so that shape fallbacks are exercised.
- ``toy-llava-hard``, ``toy-qwen2.5-vl-hard`` (shapes-VQA-hard, the test bed of docs/hard-testbed.md):
  every Linear width, decoder and vision, in and out, is a multiple of 256 (GGUF's K-quant super-blocks,
  vLLM's kernels), and the model is small for its task so quantization error shows in accuracy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
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

from quantlab.data.synthetic import SETS
from quantlab.models.processors import ImageOnlyQwen2_5_VLProcessor

VOCAB_SIZE = 512
AWKWARD_VISION_MLP = 228  # not divisible by 32: exercises the "shape a scheme cannot take" paths


@dataclass(frozen=True)
class ToySize:
    """The dimensions of one toy: board, widths and depths (one image token per board cell)."""

    dataset: str = "shapes-vqa"
    text_hidden: int = 128
    text_mlp: int = 384
    text_layers: int = 8
    text_kv_heads: int | None = None  # None: the family's small-toy default
    vision_hidden: int = 128
    vision_mlp: int = AWKWARD_VISION_MLP
    vision_layers: int = 3
    heads: int = 4
    window_px: int = 32  # Qwen2.5-VL vision attention window (pixels); the last vision block attends fully
    qwen_patch: int = 8  # Qwen2.5-VL patch (pixels) and spatial merge: patch * merge = one image token per cell
    qwen_merge: int = 2
    pad_vocab: bool = False  # config vocab = VOCAB_SIZE (lm_head rows a multiple of 256), not len(tokenizer)

    @property
    def image_px(self) -> int:
        return SETS.get(self.dataset).image_px

    @property
    def cell_px(self) -> int:
        return SETS.get(self.dataset).cell_px

    def vocab(self, tok: PreTrainedTokenizerFast) -> int:
        return VOCAB_SIZE if self.pad_vocab else len(tok)


SMALL = ToySize()
HARD = ToySize(dataset="shapes-vqa-hard", text_hidden=256, text_mlp=768, text_kv_heads=4, vision_hidden=256,
               vision_mlp=512, vision_layers=4, pad_vocab=True, window_px=32)
# One 16 px patch per cell and no 2 x 2 merge: 36 patches per image, as LLaVA's tower sees (with the released
# models' 8 px patches merged 2 x 2 the tower saw 144, and a training step cost 1.7 times LLaVA's)
HARD_QWEN = replace(HARD, qwen_patch=16, qwen_merge=1)

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
    make_config: Callable[[ToySize, PreTrainedTokenizerFast], Any]
    make_processor: Callable[[ToySize, PreTrainedTokenizerFast, str], Any]
    model_class: type
    size: ToySize = ToySize()
    # the vision tower adds an absolute position embedding (CLIP) so that each image token can be trained to
    # name its cell's row and column; Qwen2.5-VL's tower has only 2-D rotary positions inside attention, so its
    # tokens cannot learn them (docs/hard-testbed.md, run 16) and the decoder reads rows and columns from mrope
    tower_positions: bool = True
    notes: dict[str, Any] = field(default_factory=dict)


def _llava_config(size: ToySize, tok: PreTrainedTokenizerFast) -> LlavaConfig:
    return LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=size.vision_hidden, intermediate_size=size.vision_mlp, num_hidden_layers=size.vision_layers,
            num_attention_heads=size.heads, image_size=size.image_px, patch_size=size.cell_px,
            projection_dim=size.vision_hidden,
        ),
        text_config=LlamaConfig(
            vocab_size=size.vocab(tok), hidden_size=size.text_hidden, intermediate_size=size.text_mlp,
            num_hidden_layers=size.text_layers, num_attention_heads=size.heads,
            num_key_value_heads=size.text_kv_heads or size.heads, max_position_embeddings=256,
            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            tie_word_embeddings=False,
        ),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=(size.image_px // size.cell_px) ** 2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )


def _llava_processor(size: ToySize, tok: PreTrainedTokenizerFast, template: str) -> LlavaProcessor:
    px = size.image_px
    ip = CLIPImageProcessorPil(size={"shortest_edge": px}, crop_size={"height": px, "width": px}, do_center_crop=True)
    return LlavaProcessor(
        image_processor=ip, tokenizer=tok, patch_size=size.cell_px, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, image_token="<image>", chat_template=template,
    )


# Qwen2.5-VL: patch 8, merge 2 -> one merged image token per 16 px cell (ToySize.qwen_patch / qwen_merge).
QWEN_TPATCH = 2


def _qwen25_config(size: ToySize, tok: PreTrainedTokenizerFast) -> Qwen2_5_VLConfig:
    ids = tok.convert_tokens_to_ids
    head_dim = size.text_hidden // size.heads
    unit = head_dim // 16  # mrope splits the head_dim / 2 rotary pairs 2:3:3 (temporal, height, width)
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=size.vocab(tok), hidden_size=size.text_hidden, intermediate_size=size.text_mlp,
            num_hidden_layers=size.text_layers, num_attention_heads=size.heads,
            num_key_value_heads=size.text_kv_heads or 2, max_position_embeddings=512,
            bos_token_id=ids("<|im_start|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": [2 * unit, 3 * unit, 3 * unit]},
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            depth=size.vision_layers, hidden_size=size.vision_hidden, intermediate_size=size.vision_mlp,
            num_heads=size.heads, out_hidden_size=size.text_hidden,
            patch_size=size.qwen_patch, temporal_patch_size=QWEN_TPATCH, spatial_merge_size=size.qwen_merge,
            window_size=size.window_px, fullatt_block_indexes=[size.vision_layers - 1], in_channels=3,
        ),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def _qwen25_processor(size: ToySize, tok: PreTrainedTokenizerFast, template: str) -> ImageOnlyQwen2_5_VLProcessor:
    px = size.image_px * size.image_px
    ip = Qwen2VLImageProcessorPil(
        min_pixels=px, max_pixels=px, patch_size=size.qwen_patch, temporal_patch_size=QWEN_TPATCH,
        merge_size=size.qwen_merge,
    )
    return ImageOnlyQwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, chat_template=template)


LLAVA = dict(
    model_type="llava",
    specials=("<pad>", "<s>", "</s>", "<unk>", "<image>"),
    tokenizer_kwargs=dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                          extra_special_tokens={"image_token": "<image>"}),
    chat_template=LLAVA_TEMPLATE,
    make_config=_llava_config,
    make_processor=_llava_processor,
    model_class=LlavaForConditionalGeneration,
)
QWEN25 = dict(
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
    tower_positions=False,
)
TOYS: dict[str, ToySpec] = {
    spec.name: spec for spec in (
        ToySpec(name="toy-llava", size=SMALL, **LLAVA),
        ToySpec(name="toy-qwen2.5-vl", size=SMALL, **QWEN25),
        ToySpec(name="toy-llava-hard", size=HARD, **LLAVA),
        ToySpec(name="toy-qwen2.5-vl-hard", size=HARD_QWEN, **QWEN25),
    )
}


def tokenizer_corpus(dataset: str = "shapes-vqa", n_scenes: int = 2000) -> Iterable[str]:
    """Text the toy tokenizers are trained on: the set's questions, answers and captions.

    Read text (label answers, captions that quote a label) stays out, so labels tokenize character by
    character instead of into merges learnt from a few random strings.
    """
    member = SETS.get(dataset)
    for split in ("train", "calibration"):
        for s in member.samples(split, n_scenes):
            yield s.question
            if s.question_type not in member.text_types:
                yield " " + s.answer
            if getattr(s, "label", None) is None:
                yield s.caption()
    if member.alphabet:
        yield "A label reads"
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
    tok.train_from_iterator(tokenizer_corpus(spec.size.dataset), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **spec.tokenizer_kwargs)


def build_toy(name: str, seed: int = 0, size: ToySize | None = None) -> tuple[torch.nn.Module, Any]:
    """A randomly initialised toy VLM and its processor (untrained; see ``quantlab.toys.train``); ``size``
    replaces the toy's own dimensions (a training trial, e.g. a narrower decoder MLP)."""
    if name not in TOYS:
        raise KeyError(f"unknown toy model {name!r}; expected one of {sorted(TOYS)}")
    spec = TOYS[name]
    size = size or spec.size
    tok = build_tokenizer(spec)
    processor = spec.make_processor(size, tok, spec.chat_template)
    torch.manual_seed(seed)
    model = spec.model_class(spec.make_config(size, tok)).eval()
    return model, processor
