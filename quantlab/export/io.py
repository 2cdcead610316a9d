"""Shared pieces of the format writers: dense tensors, sharded safetensors, model directory files, JSON."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from quantlab.core.files import write_dir_atomic  # noqa: F401 - the export stage's writers use it from here
from quantlab.export.safetensors_stream import SafetensorsWriter, tensor_bytes
from quantlab.models.adapter import ties_embeddings
from quantlab.quant import awq
from quantlab.quant.results_io import input_scales_of


def write_json(path: Path, data: dict) -> None:
    """Keys keep their order: GPTQModel's ``dynamic`` rules are first-match, so ``-:`` rules must lead."""
    path.write_text(json.dumps(data, indent=2) + "\n")


def model_tensors(loaded, skip: Callable[[str], bool], weights=None, results=None) -> Iterator[tuple[str, Any]]:
    """``(name, tensor)`` of the model's state dict, but for names ``skip`` rejects.

    A streamed model (``quantlab.load_streaming``) keeps its blocks on the meta device: their tensors are
    read from ``weights`` (its second value), one at a time, so an export needs no more memory than that.
    Read so, the tensors of a producer of AWQ's scales (a norm the quantize stage folded them into in memory,
    recorded by ``results``' ``input_scales``) are divided by them as the stage did (``quantlab.quant.awq``).
    """
    folds = {}
    if weights is not None and results is not None:
        adapter = loaded.adapter
        folds = awq.producer_folds(adapter.scale_pairs, adapter.decoder_blocks, input_scales_of(results))
    for name, t in loaded.model.state_dict().items():
        if skip(name):
            continue
        if t.device.type == "meta":
            if weights is None:
                raise ValueError(f"{name} is on the meta device (a streamed model): pass weights=, the second "
                                 "value of quantlab.load_streaming, so the export can read it from the checkpoint")
            module, _, leaf = name.rpartition(".")
            if module in folds:
                t = awq.fold_tensor(leaf, weights.tensor(name), folds[module])  # a small vector or one Linear
            else:
                # a view of the mapped file, not a copy: the writers read it a slice at a time, and its pages go
                # with the tensor (a copy would hold the largest tensor twice while it is read: 1.2 GB at 3B)
                t = weights.tensor(name, mapped=True)
            weights.close()  # the handle only: the view keeps what it maps
        yield name, t
        del t
    if weights is not None:
        weights.close()


# Tensors are written as they come, in shards of at most this many bytes (one tensor larger than that gets
# a shard of its own): with a streamed model, the export holds one tensor at a time, not the whole
# checkpoint. Loaders (transformers, vLLM, GPTQModel) read the hub's sharded layout, an index
# ``model.safetensors.index.json`` with ``weight_map`` (huggingface_hub's ``save_torch_state_dict`` writes the
# same); a checkpoint that fits one shard stays a single ``model.safetensors``.
SHARD_BYTES = 512 << 20


def dense_tensors(loaded, quantized: set[str], dtype, *, legacy_names: bool = True, weights=None,
                  lazy: bool = False, results=None) -> Iterator[tuple]:
    """Every checkpoint tensor except the weights of ``quantized`` Linears, under hub-legacy names
    (or, with ``legacy_names=False``, transformers 5's layout as ``Adapter.checkpoint_name`` spells it).

    Floating tensors are cast to ``dtype``; with ``lazy``, a floating tensor of another dtype comes as
    ``(name, tensor, dtype)`` instead, for :func:`write_shards` to cast a slice at a time (a whole cast copy of
    a 0.6 GB embedding would be the export's peak). A head tied to the embeddings is written once (as the
    embedding).
    ``weights``: where a streamed model's meta tensors are read from; ``results``: the quantization results,
    whose AWQ scales fold into what is read so (see :func:`model_tensors`).
    """
    model, adapter = loaded.model, loaded.adapter
    tied = ties_embeddings(model.config)

    def skip(name: str) -> bool:
        module_name, _, leaf = name.rpartition(".")
        return (module_name in quantized and leaf == "weight") or (tied and name == f"{adapter.lm_head}.weight")

    rename = adapter.legacy_name if legacy_names else adapter.checkpoint_name
    for name, t in model_tensors(loaded, skip, weights, results):
        if t.is_floating_point() and t.dtype != dtype:
            yield (rename(name), t.contiguous(), dtype) if lazy else (rename(name), t.to(dtype).contiguous())
        else:
            yield rename(name), t.contiguous()


def write_shards(tensors: Iterable[tuple], out: Path, max_bytes: int | None = None) -> list[Path]:
    """Write ``(name, tensor)`` pairs to ``out`` as they come: ``model.safetensors`` when they fit one shard
    of ``max_bytes`` (default :data:`SHARD_BYTES`), else ``model-0000i-of-0000N.safetensors`` plus
    ``model.safetensors.index.json``. An item ``(name, tensor, dtype)`` is written cast to ``dtype``.

    Each tensor goes to disk when it arrives, a slice at a time
    (:class:`~quantlab.export.safetensors_stream.SafetensorsWriter`), so the writer holds one slice whatever
    the shard size; the files are byte for byte what ``safetensors.torch.save_file`` writes. Returns them."""
    max_bytes = SHARD_BYTES if max_bytes is None else max_bytes
    shards: list[tuple[Path, list[str]]] = []
    seen: set[str] = set()
    writer: SafetensorsWriter | None = None
    names: list[str] = []  # the open shard's tensors
    total = 0
    try:
        for name, t, *cast in tensors:
            cast = cast[0] if cast else None
            if name in seen:
                raise ValueError(f"export: tensor {name} written twice")
            seen.add(name)
            nbytes = tensor_bytes(t, cast)
            if writer is not None and writer.nbytes and writer.nbytes + nbytes > max_bytes:
                shards.append((writer.close(), names))
                writer = None
            if writer is None:
                writer = SafetensorsWriter(out / f"model-part-{len(shards) + 1:05d}.safetensors", {"format": "pt"})
                names = []
            writer.add(name, t, cast)
            names.append(name)
            total += nbytes
        if writer is None:  # no tensors at all: one empty file, as save_file({}) writes
            writer, names = SafetensorsWriter(out / "model-part-00001.safetensors", {"format": "pt"}), []
        shards.append((writer.close(), names))
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
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


def write_model_dir(loaded, tensors: Iterable[tuple], quantization_config: dict, out: Path,
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
