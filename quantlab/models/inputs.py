"""Model inputs for a sample, built with the model's own processor and chat template.

Works for every family: the chat template decides where the image placeholder goes, the processor
expands it into the right number of image tokens and prepares pixel values (and, for Qwen, the grid and
``mm_token_type_ids``).
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

PIXEL_KEYS = ("pixel_values", "image_grid_thw")  # the image inputs the families' get_image_features take


def encode_images(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
    """The model's ``get_image_features`` on the image inputs of a processed batch (vision tower + projector)."""
    device = next(model.parameters()).device
    return model.get_image_features(**{k: inputs[k].to(device) for k in PIXEL_KEYS if k in inputs})


def chat_messages(prompt: str, has_image: bool, answer: str | None = None) -> list[dict[str, Any]]:
    """A single-turn conversation in the transformers chat format."""
    content: list[dict[str, Any]] = [{"type": "image"}] if has_image else []
    content.append({"type": "text", "text": prompt})
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def prompt_text(processor, prompt: str, has_image: bool) -> str:
    """The templated prompt, ending where the assistant's answer begins."""
    return processor.apply_chat_template(chat_messages(prompt, has_image), add_generation_prompt=True, tokenize=False)


def answer_suffix(processor, prompt: str, has_image: bool, answer: str) -> str:
    """The text the template appends after the prompt for ``answer`` (e.g. ``" red</s>"``)."""
    head = prompt_text(processor, prompt, has_image)
    full = processor.apply_chat_template(chat_messages(prompt, has_image, answer), tokenize=False)
    if not full.startswith(head):
        raise ValueError("chat template: the conversation with an answer does not extend the generation prompt")
    return full[len(head):].rstrip("\n")


def build_inputs(
    processor, prompts: list[str], images: list[Image.Image | None], *, padding_side: str = "left"
) -> dict[str, torch.Tensor]:
    """Batched model inputs for prompts with an optional image each (all or none must have images)."""
    has = [img is not None for img in images]
    if any(has) and not all(has):
        raise ValueError("build_inputs: a batch must be all image+text or all text-only")
    texts = [prompt_text(processor, p, h) for p, h in zip(prompts, has)]
    tok = processor.tokenizer
    old_side, tok.padding_side = tok.padding_side, padding_side
    try:
        if all(has) and images:
            return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))
        return dict(tok(texts, return_tensors="pt", padding=True))
    finally:
        tok.padding_side = old_side
