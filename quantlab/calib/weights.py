"""Where a streamed block's weights come from.

:class:`InMemory` is for models already loaded. :class:`SafetensorsWeights` reads one module's tensors
from a checkpoint's safetensors files on demand and drops them afterwards, so a model built on the meta
device can be run block by block with only one block materialised. Checkpoints carry hub-legacy names;
the adapter maps the in-memory (transformers 5.x) names to them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import torch
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from torch import nn

from quantlab.core.device import compute_dtype
from quantlab.models.adapter import Adapter, Component, ties_embeddings
from quantlab.models.load import (
    LoadedModel,
    checkpoint_dtype,
    get_adapter,
    load_config,
    load_dtype,
    processor_class,
    resolve,
)
from quantlab.models.processors import load_processor


class WeightSource(Protocol):
    """Materialises and releases the parameters of one submodule (named by its full path)."""

    def load(self, module: nn.Module, prefix: str) -> None: ...

    def release(self, module: nn.Module, prefix: str) -> None: ...


class InMemory:
    """Weights already live in the model: nothing to do."""

    def load(self, module: nn.Module, prefix: str) -> None:
        return None

    def release(self, module: nn.Module, prefix: str) -> None:
        return None


class SafetensorsWeights:
    """Reads parameters of one submodule at a time from a checkpoint directory's safetensors files."""

    def __init__(self, directory: str | Path, adapter: Adapter, dtype: torch.dtype = torch.float32,
                 tied: dict[str, str] | None = None):
        self.directory = Path(directory)
        self.adapter = adapter
        self.dtype = dtype
        self.tied = tied or {}
        self.key_file = self._index()
        self._handles: dict[str, object] = {}

    def _index(self) -> dict[str, str]:
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            return dict(json.loads(index.read_text())["weight_map"])
        single = self.directory / "model.safetensors"
        if not single.is_file():
            raise FileNotFoundError(f"{self.directory}: no model.safetensors or model.safetensors.index.json")
        with safe_open(str(single), framework="pt") as f:
            return {k: single.name for k in f.keys()}

    def key_for(self, name: str) -> str:
        """The checkpoint key holding in-memory parameter ``name``."""
        name = self.tied.get(name, name)
        legacy = self.adapter.legacy_name(name)
        for cand in (name, legacy, legacy.replace("vision_tower.vision_model.", "vision_tower.")):
            if cand in self.key_file:
                return cand
        raise KeyError(f"{self.directory}: no tensor for parameter {name!r} (tried {name!r}, {legacy!r})")

    def tensor(self, name: str, *, mapped: bool = False) -> torch.Tensor:
        """The parameter's tensor: a copy in ``self.dtype``, or (``mapped``) a view of the memory-mapped file
        in its stored dtype, whose pages are read only where touched (an embedding lookup reads its rows,
        not the whole 0.6 GB table) and go when the tensor does."""
        key = self.key_for(name)
        fname = self.key_file[key]
        if fname not in self._handles:
            self._handles[fname] = safe_open(str(self.directory / fname), framework="pt")
        t = self._handles[fname].get_tensor(key)  # type: ignore[attr-defined]
        if mapped:
            return t
        # Otherwise a copy, never a view of the memory map: mapped pages would stay resident (and counted)
        # for as long as the tensor lives, defeating the one-block-at-a-time bound for resident tensors.
        return t.to(self.dtype, copy=True)

    def load(self, module: nn.Module, prefix: str, *, mapped: bool = False, stored_dtype: bool = False) -> None:
        """Materialise ``module``'s parameters: copies in ``self.dtype``, or (``mapped``) views of the file
        where no cast is needed, or (``stored_dtype`` too) always views, in the stored dtype (see
        :func:`compute_in` for running such a module among ``self.dtype`` ones)."""
        for pname, _ in list(module.named_parameters()):
            t = self.tensor(f"{prefix}.{pname}", mapped=mapped)
            if mapped and not stored_dtype and t.dtype != self.dtype:
                t = t.to(self.dtype)  # a copy, so nothing keeps the mapped pages
            set_module_tensor_to_device(module, pname, "cpu", value=t, dtype=t.dtype)
            if not mapped:
                # the module holds a copy: unmap the pages it was read from now, not after the whole block
                # (a bf16 block's pages beside its float32 copies were calibration's peak at 7B, +0.38 GiB)
                self.close()

    def release(self, module: nn.Module, prefix: str) -> None:
        for pname, _ in list(module.named_parameters()):
            set_module_tensor_to_device(module, pname, "meta")
        self.close()

    def close(self) -> None:
        """Unmap the checkpoint files (pages read through an open handle stay resident); reopened on demand."""
        self._handles.clear()


def stream_dtype(name_or_path: str | Path, device: str | None = None) -> torch.dtype:
    """The dtype a streamed model computes in: :func:`quantlab.models.load.load_dtype` (toys in float32,
    checkpoints in their own), in float32 where that is a 16-bit float the CPU has no instructions for
    (:func:`quantlab.core.device.compute_dtype`). ``device``: where the blocks compute (None: the CPU)."""
    return compute_dtype(load_dtype(name_or_path), device)


def stream_model(name_or_path: str | Path, *, device: str | None = None, with_processor: bool = True):
    """:func:`load_streaming` for a model as :func:`quantlab.models.load.load_model` names it: aliases
    resolved, computing in :func:`stream_dtype`."""

    return load_streaming(resolve(name_or_path), dtype=stream_dtype(name_or_path, device),
                          with_processor=with_processor)


def compute_in(module: nn.Module, dtype: torch.dtype) -> None:
    """Let ``module``, whose weights may be held in another dtype (a mapped view of the checkpoint), run
    among modules computing in ``dtype``: its floating inputs are cast to its weights' dtype and its
    floating outputs to ``dtype``. Costs nothing where the dtypes agree."""

    def inputs(m: nn.Module, args: tuple) -> tuple:
        w = next(m.parameters()).dtype
        return tuple(a.to(w) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    def output(m: nn.Module, args: tuple, out):
        return out.to(dtype) if torch.is_tensor(out) and out.is_floating_point() else out

    module.register_forward_pre_hook(inputs)
    module.register_forward_hook(output)


def load_streaming(directory: str | Path, *, dtype: torch.dtype | str = torch.float32, with_processor: bool = True):
    """A model whose decoder and vision blocks stay on the meta device until streamed (models larger than
    memory). One of quantlab's four loaders (see :mod:`quantlab.export.open`).

    Everything else (norms, projector, the vision tower's embeddings) is read now. Vision blocks, the token
    embedding and the head are loaded by forward hooks just before they run and dropped right after, so
    the vision tower holds one block at a time and the embedding (0.6 GB in Qwen2.5-VL-3B, a sixth of its
    decoder) is in memory only while a sample is embedded; decoder blocks are left to
    :func:`quantlab.calib.executor.stream_decoder`. A tied head shares the embedding's (meta) parameter
    until it runs; exports read both from the checkpoint.
    ``dtype``: what the model computes in, a torch dtype or its name; ``"auto"`` takes the checkpoint's
    (``config.dtype``, float32 when it names none). Blocks and the head are read as copies in it (the head
    as a view where no cast is needed); the embedding as a view in its stored dtype, its rows cast.
    Returns ``(LoadedModel, SafetensorsWeights)``.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForImageTextToText


    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: streaming reads a local checkpoint directory's safetensors; "
                                f"download the model first (huggingface-cli download {directory} --local-dir DIR) "
                                "and pass DIR")
    config = load_config(directory)
    adapter = get_adapter(config)
    if dtype == "auto":
        dtype = checkpoint_dtype(config)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with init_empty_weights(include_buffers=False):  # buffers (rotary inv_freq) must stay real
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    tied = {}
    if ties_embeddings(config):
        tied[f"{adapter.lm_head}.weight"] = f"{adapter.embed_tokens}.weight"
    weights = SafetensorsWeights(directory, adapter, dtype, tied)
    on_demand = (adapter.embed_tokens, adapter.lm_head)  # big (vocab x hidden) and used once per sample
    streamed = (adapter.decoder_blocks + ".", adapter.vision_blocks + ".", *(m + "." for m in on_demand))
    for name, _ in list(model.named_parameters()):
        if not name.startswith(streamed) and name not in tied:
            set_module_tensor_to_device(model, name, "cpu", value=weights.tensor(name))
    weights.close()  # the resident tensors are copies: drop the mapped pages they were read from
    for name, source in tied.items():  # one tensor, as in the loaded model (not a second copy of the embedding)
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(source))
    for i, block in enumerate(adapter.blocks(model, Component.VISION)):
        prefix = f"{adapter.vision_blocks}.{i}"
        block.register_forward_pre_hook(lambda m, a, p=prefix: weights.load(m, p))
        block.register_forward_hook(lambda m, a, o, p=prefix: weights.release(m, p))
    for prefix in on_demand:
        module = model.get_submodule(prefix)
        # a lookup reads a few rows of the mapped table, in its stored dtype (values cast exactly); the head
        # reads all of it, so it computes as the blocks do (a copy in ``dtype`` where the dtypes differ)
        lookup = prefix == adapter.embed_tokens
        module.register_forward_pre_hook(lambda m, a, p=prefix, k=lookup: weights.load(m, p, mapped=True,
                                                                                      stored_dtype=k))
        module.register_forward_hook(lambda m, a, o, p=prefix: weights.release(m, p))
        if lookup:
            compute_in(module, dtype)
    processor = load_processor(directory, processor_class(directory)) if with_processor else None
    return LoadedModel(model.eval(), processor, adapter, str(directory)), weights
