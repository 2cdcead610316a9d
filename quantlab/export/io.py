"""Shared pieces of the format writers: dense tensors, sharded safetensors, model directory files, JSON."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
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
            weights.close()  # a copy was read: unmap the file, or every page read so far stays resident
        yield name, t
    if weights is not None:
        weights.close()


# Tensors are written as they come, in shards of at most this many bytes (one tensor larger than that gets
# a shard of its own): with a streamed model, the export's memory is one shard plus safetensors' copy of it,
# not the whole checkpoint. Loaders (transformers, vLLM, GPTQModel) read the hub's sharded layout, an index
# ``model.safetensors.index.json`` with ``weight_map`` (huggingface_hub's ``save_torch_state_dict`` writes the
# same); a checkpoint that fits one shard stays a single ``model.safetensors``.
SHARD_BYTES = 512 << 20


def dense_tensors(loaded, quantized: set[str], dtype, *, legacy_names: bool = True, weights=None
                  ) -> Iterator[tuple[str, Any]]:
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
    for name, t in model_tensors(loaded, skip, weights):
        yield rename(name), (t.to(dtype) if t.is_floating_point() else t).contiguous()


def write_shards(tensors: Iterable[tuple[str, Any]], out: Path, max_bytes: int | None = None) -> list[Path]:
    """Write ``(name, tensor)`` pairs to ``out`` as they come: ``model.safetensors`` when they fit one shard
    of ``max_bytes`` (default :data:`SHARD_BYTES`), else ``model-0000i-of-0000N.safetensors`` plus
    ``model.safetensors.index.json``. Returns the files."""
    from safetensors.torch import save_file

    max_bytes = SHARD_BYTES if max_bytes is None else max_bytes
    shards: list[tuple[Path, list[str]]] = []
    pending: dict[str, Any] = {}
    size = total = 0

    def flush() -> None:
        nonlocal pending, size
        path = out / f"model-part-{len(shards) + 1:05d}.safetensors"
        save_file(pending, str(path), metadata={"format": "pt"})
        shards.append((path, list(pending)))
        pending, size = {}, 0

    for name, t in tensors:
        if name in pending or any(name in names for _, names in shards):
            raise ValueError(f"export: tensor {name} written twice")
        nbytes = t.numel() * t.element_size()
        if pending and size + nbytes > max_bytes:
            flush()
        pending[name] = t
        size += nbytes
        total += nbytes
    if pending or not shards:
        flush()
    if len(shards) == 1:
        single = out / "model.safetensors"
        shards[0][0].rename(single)
        return [single]
    files = []
    weight_map: dict[str, str] = {}
    for i, (path, names) in enumerate(shards, 1):
        final = out / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        path.rename(final)
        files.append(final)
        weight_map.update({n: final.name for n in names})
    write_json(out / "model.safetensors.index.json",
               {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    return files


def write_model_dir(loaded, tensors: Iterable[tuple[str, Any]], quantization_config: dict, out: Path,
                    dtype) -> None:
    """The tensors in shards (:func:`write_shards`) + config.json (with ``quantization_config``) +
    generation config + processor."""
    write_shards(tensors, out)
    config = loaded.model.config.to_dict()
    config["dtype"] = str(dtype).removeprefix("torch.")
    config["quantization_config"] = quantization_config
    write_json(out / "config.json", config)
    if getattr(loaded.model, "generation_config", None) is not None:
        loaded.model.generation_config.save_pretrained(out)
    if loaded.processor is not None:
        loaded.processor.save_pretrained(out)
