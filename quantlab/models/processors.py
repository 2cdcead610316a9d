"""Processor loading that works without torchvision.

transformers' Qwen2-VL / Qwen2.5-VL processors declare a video processor, and video processors need
torchvision, which this project cannot install (its CPU wheel breaks transformers). The image-only
subclasses below drop that attribute; they save and load like the originals, so a checkpoint written
with them opens with ``AutoProcessor`` on a machine that has torchvision.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoProcessor, Qwen2_5_VLProcessor, Qwen2VLProcessor


class _ImageOnly:
    """Mixin: drop the video processor (no torchvision needed here), but save what loaders elsewhere expect.

    vLLM builds the full Qwen processor from the saved files and refuses a checkpoint without a video
    processor config ("Can't load video processor"), so :meth:`save_pretrained` adds a ``video_processor``
    entry with the image processor's settings (Qwen2-VL's video processor shares patch, merge and
    normalisation parameters with it). ``processor_class`` stays this image-only class: GPTQModel opens a
    checkpoint with ``AutoProcessor``, which builds a video processor for the original class name and fails
    without torchvision (docs/engines.md).
    """

    @classmethod
    def get_attributes(cls) -> list[str]:
        return [a for a in super().get_attributes() if a != "video_processor"]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        kwargs.pop("video_processor", None)
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)
        self.video_processor = None

    def save_pretrained(self, save_directory, *args, **kwargs):
        out = super().save_pretrained(save_directory, *args, **kwargs)
        path = Path(save_directory) / "processor_config.json"
        config = json.loads(path.read_text(encoding="utf-8"))
        video = {k: v for k, v in config["image_processor"].items() if k != "image_processor_type"}
        config["video_processor"] = {**video, "video_processor_type": "Qwen2VLVideoProcessor"}
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return out


class ImageOnlyQwen2VLProcessor(_ImageOnly, Qwen2VLProcessor):
    """Qwen2-VL processor without the video processor (no torchvision needed)."""


class ImageOnlyQwen2_5_VLProcessor(_ImageOnly, Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor without the video processor (no torchvision needed)."""


IMAGE_ONLY_PROCESSORS: dict[str, type] = {  # processor_class as saved -> the class that loads it here
    "Qwen2VLProcessor": ImageOnlyQwen2VLProcessor,
    "Qwen2_5_VLProcessor": ImageOnlyQwen2_5_VLProcessor,
    "ImageOnlyQwen2VLProcessor": ImageOnlyQwen2VLProcessor,
    "ImageOnlyQwen2_5_VLProcessor": ImageOnlyQwen2_5_VLProcessor,
}


def load_processor(path: str | Path, processor_class: str | None = None, **kwargs: Any):
    """Load a processor with ``AutoProcessor``; fall back to the image-only Qwen classes without torchvision."""
    image_only = IMAGE_ONLY_PROCESSORS.get(processor_class or "")
    try:
        proc = AutoProcessor.from_pretrained(path, **kwargs)
    except (AttributeError, ImportError, ModuleNotFoundError, ValueError):
        if image_only is None:
            raise
        # Only the torchvision-dependent video processor failed; the image path is unaffected.
        return image_only.from_pretrained(path, **kwargs)
    if image_only is not None and not hasattr(proc, "image_processor"):
        # Without torchvision, AutoProcessor silently degrades a Qwen processor to its bare tokenizer.
        return image_only.from_pretrained(path, **kwargs)
    return proc
