"""Shared pieces of the format writers: dense tensors, model directory files, the JSON writer."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from quantlab.core.files import write_dir_atomic  # noqa: F401 - the export stage's writers use it from here


def write_json(path: Path, data: dict) -> None:
    """Keys keep their order: GPTQModel's ``dynamic`` rules are first-match, so ``-:`` rules must lead."""
    path.write_text(json.dumps(data, indent=2) + "\n")


def model_tensors(loaded, skip: Callable[[str], bool], weights=None) -> Iterator[tuple[str, Any]]:
    """``(name, tensor)`` of the model's state dict, but for names ``skip`` rejects.

    A streamed model (``quantlab.load_streaming``) keeps its blocks on the meta device: their tensors are
    read from ``weights`` (its second value), one at a time, so an export needs no more memory than that.
    """
    for name, t in loaded.model.state_dict().items():
        if skip(name):
            continue
        if t.device.type == "meta":
            if weights is None:
                raise ValueError(f"{name} is on the meta device (a streamed model): pass weights=, the second "
                                 "value of quantlab.load_streaming, so the export can read it from the checkpoint")
            t = weights.tensor(name)
        yield name, t
    if weights is not None:
        weights.close()


def dense_tensors(loaded, quantized: set[str], dtype, *, legacy_names: bool = True, weights=None) -> dict:
    """Every checkpoint tensor except the weights of ``quantized`` Linears, under hub-legacy names
    (or, with ``legacy_names=False``, transformers 5's layout as ``Adapter.checkpoint_name`` spells it).

    Floating tensors are cast to ``dtype``; a head tied to the embeddings is written once (as the embedding).
    ``weights``: where a streamed model's meta tensors are read from (see :func:`model_tensors`).
    """
    model, adapter = loaded.model, loaded.adapter
    tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))

    def skip(name: str) -> bool:
        module_name, _, leaf = name.rpartition(".")
        return (module_name in quantized and leaf == "weight") or (tied and name == f"{adapter.lm_head}.weight")

    rename = adapter.legacy_name if legacy_names else adapter.checkpoint_name
    return {rename(name): (t.to(dtype) if t.is_floating_point() else t).contiguous()
            for name, t in model_tensors(loaded, skip, weights)}


def write_model_dir(loaded, tensors: dict, quantization_config: dict, out: Path, dtype) -> None:
    """model.safetensors + config.json (with ``quantization_config``) + generation config + processor."""
    from safetensors.torch import save_file

    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = loaded.model.config.to_dict()
    config["dtype"] = str(dtype).removeprefix("torch.")
    config["quantization_config"] = quantization_config
    write_json(out / "config.json", config)
    if getattr(loaded.model, "generation_config", None) is not None:
        loaded.model.generation_config.save_pretrained(out)
    if loaded.processor is not None:
        loaded.processor.save_pretrained(out)
