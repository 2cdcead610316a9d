"""Batched greedy generation through the model's processor and chat template."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from accelerate.utils import send_to_device
from PIL import Image

from quantlab.models.inputs import build_inputs
from quantlab.models.load import LoadedModel


@torch.no_grad()
def generate_answers(
    loaded: LoadedModel,
    prompts: Sequence[str],
    images: Sequence[Image.Image | None],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 8,
) -> list[str]:
    """Greedy answers, one per (prompt, image); special tokens stripped, whitespace trimmed."""
    if len(prompts) != len(images):
        raise ValueError(f"generate_answers: {len(prompts)} prompts but {len(images)} images")
    model, processor = loaded.model, loaded.processor
    if processor is None:
        raise ValueError(f"{loaded.source}: no processor loaded; generation needs one")
    tok = processor.tokenizer
    answers: list[str] = []
    for lo in range(0, len(prompts), batch_size):
        batch = build_inputs(processor, list(prompts[lo:lo + batch_size]), list(images[lo:lo + batch_size]))
        batch = send_to_device(batch, model.device)  # inputs go where the model is (CPU, or a GPU)
        if hasattr(getattr(model, "model", None), "rope_deltas"):
            model.model.rope_deltas = None  # Qwen caches mrope offsets across calls; stale ones corrupt positions
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        new = out[:, batch["input_ids"].shape[1]:]
        answers.extend(t.strip() for t in tok.batch_decode(new, skip_special_tokens=True))
    return answers
