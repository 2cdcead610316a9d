"""Load a VLM, its processor and its adapter from an alias, a local checkpoint, a config, or the hub.

| what you pass                         | what you get                                                 |
|---------------------------------------|--------------------------------------------------------------|
| ``toy-llava``, ``toy-qwen2.5-vl``     | the trained toy shipped with quantlab (fp16 on disk)         |
| ``toy-llava-hard``, ``toy-qwen2.5-vl-hard`` | the capacity-bound toys of the hard test bed (docs/hard-testbed.md) |
| ``llava``, ``qwen2.5-vl``, ...        | the real hub model, through the normal transformers path     |
| a checkpoint directory                | model + processor from that directory                        |
| a ``config.json`` (file or dir)       | ``weights=False``: meta-device skeleton; ``"random"``: random |
| a hub id                              | transformers/huggingface_hub loading; offline: a clear error |
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText

from quantlab.core.errors import NotFound, did_you_mean, problems_error
from quantlab.models.adapter import ADAPTERS, Adapter
from quantlab.models.processors import load_processor

ASSETS = Path(__file__).resolve().parent.parent / "assets"

ALIASES: dict[str, str] = {
    "toy-llava": str(ASSETS / "toy-llava"),
    "toy-qwen2.5-vl": str(ASSETS / "toy-qwen2.5-vl"),
    "toy-llava-hard": str(ASSETS / "toy-llava-hard"),
    "toy-qwen2.5-vl-hard": str(ASSETS / "toy-qwen2.5-vl-hard"),
    "llava": "llava-hf/llava-1.5-7b-hf",
    "llava-1.5-7b": "llava-hf/llava-1.5-7b-hf",
    "qwen2.5-vl": "Qwen/Qwen2.5-VL-7B-Instruct",
    "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
    "qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct",
    "qwen2-vl": "Qwen/Qwen2-VL-7B-Instruct",
}

Weights = bool | Literal["random"]


@dataclass
class LoadedModel:
    """A model with what quantlab needs beside it: its processor (None for skeletons) and adapter."""

    model: nn.Module
    processor: Any
    adapter: Adapter
    source: str

    @property
    def config(self):
        return self.model.config


def get_adapter(config_or_model: Any) -> Adapter:
    """The adapter for a config or model; unknown families get an error listing the supported ones."""
    config = getattr(config_or_model, "config", config_or_model)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"unsupported architecture {model_type!r}; quantlab supports model_type in {sorted(ADAPTERS)}"
        )
    return ADAPTERS[model_type]


def resolve(name_or_path: str | Path) -> str:
    """Alias -> hub id or local path; anything else is returned unchanged."""
    return ALIASES.get(str(name_or_path), str(name_or_path))


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo_id, "config.json")
    return isinstance(hit, str)


def processor_class(path: Path) -> str | None:
    """The processor class a local checkpoint names in its processor/preprocessor config, or None."""
    for fname in ("processor_config.json", "preprocessor_config.json"):
        f = path / fname
        if f.is_file():
            return json.loads(f.read_text()).get("processor_class")
    return None


def load_config(name_or_path: str | Path):
    """A transformers config from an alias, a config file, a checkpoint directory or a (cached) hub id."""
    src = resolve(name_or_path)
    p = Path(src)
    if p.is_file():
        return AutoConfig.from_pretrained(str(p))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p}: no config.json in this directory")
        return AutoConfig.from_pretrained(str(p))
    _check_hub(src)
    return AutoConfig.from_pretrained(src)


def _check_hub(repo_id: str) -> None:
    if str(repo_id).startswith(("/", ".", "~")) or str(repo_id).count("/") != 1:
        raise NotFound(f"model {repo_id!r}{did_you_mean(repo_id, ALIASES)}: no such file or directory, built-in "
                       "alias or hub id (org/name)", "`quantlab models` lists the aliases; or pass a checkpoint "
                       "directory")
    if not _hub_cached(repo_id) and not _hub_reachable():
        raise ConnectionError(
            f"cannot load {repo_id!r}: the Hugging Face Hub is not reachable and the model is not in the local "
            "cache. Download it on a connected machine and pass its local directory instead "
            "(e.g. `huggingface-cli download {0} --local-dir DIR`, then `quantlab ... DIR`).".format(repo_id)
        )


def default_dtype(name_or_path: str | Path) -> torch.dtype | str:
    """The compute dtype a model is loaded in when none is asked for: the toys ship in fp16 but are
    evaluated in fp32; every other checkpoint keeps its own (``"auto"``)."""
    return torch.float32 if str(name_or_path).startswith("toy-") else "auto"


def checkpoint_dtype(config) -> torch.dtype:
    """The dtype a checkpoint's config says its tensors are stored in (float32 when it names none)."""
    dtype = getattr(config, "dtype", None) or getattr(config.get_text_config(), "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def load_dtype(name_or_path: str | Path) -> torch.dtype:
    """:func:`default_dtype` resolved: the dtype :func:`load_model` gives the model when none is asked for."""
    dtype = default_dtype(name_or_path)
    return checkpoint_dtype(load_config(resolve(name_or_path))) if dtype == "auto" else dtype


def load_checkpoint(src: str, *, dtype) -> nn.Module:
    """``from_pretrained``, but a checkpoint whose tensors do not match its config is an error.

    transformers initialises missing tensors at random and only logs it (an export with a deleted tensor
    then scores 0.000 and looks fine); here any missing, unexpected or mis-shaped tensor is refused, named.

    Raises:
        UserError: every tensor that does not match (names as transformers 5 spells them).
    """
    model, info = AutoModelForImageTextToText.from_pretrained(src, dtype=dtype, output_loading_info=True,
                                                              ignore_mismatched_sizes=True)
    problems = [f"missing: {k}" for k in sorted(info.get("missing_keys", ()))]
    problems += [f"unexpected: {k}" for k in sorted(info.get("unexpected_keys", ()))]
    problems += [f"wrong shape: {k}: checkpoint {tuple(a)}, config {tuple(b)}"
                 for k, a, b in sorted(info.get("mismatched_keys", ()), key=lambda m: m[0])]
    problems += [str(e) for e in info.get("error_msgs", ())]
    if problems:
        raise problems_error(f"{src}: the checkpoint's tensors do not match its config.json", problems,
                             "restore the checkpoint from its source, or export it again (quantlab export RUN)")
    decompress_now(model)
    return model


def decompress_now(model: nn.Module) -> None:
    """Unpack a compressed-tensors checkpoint's Linears at load rather than on the first top-level forward.

    compressed-tensors decompresses in a pre-hook on the model's own ``forward``; transformers 5's ``generate``
    encodes the images first (``get_image_features``, straight into the vision tower), so with a quantized vision
    tower the packed Linears run before the hook and fail (``'Linear' object has no attribute 'weight'``).
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if getattr(model, "ct_decompress_hook", None) is not None and hasattr(quantizer, "compressor"):
        quantizer.compressor.decompress_model(model)


def load_model(
    name_or_path: str | Path,
    *,
    weights: Weights = True,
    dtype: torch.dtype | None = None,
    with_processor: bool = True,
) -> LoadedModel:
    """Load model + processor + adapter through transformers: the loader for everything transformers opens.

    One of quantlab's four loaders (the table is in :mod:`quantlab.export.open`): aliases, checkpoint
    directories (plain, compressed-tensors, GPTQ), hub ids, and config-only skeletons.

    Args:
        name_or_path: built-in alias, local checkpoint dir, config.json path, or hub id.
        weights: True loads the checkpoint; False builds a meta-device skeleton from the config;
            ``"random"`` builds the architecture with random weights.
        dtype: compute dtype; defaults to float32 for toys and skeletons, the checkpoint's dtype otherwise.
        with_processor: also load the processor (ignored for skeletons).
    """
    src = resolve(name_or_path)
    config = load_config(src)
    adapter = get_adapter(config)
    if weights is not True:
        if weights is False:
            with torch.device("meta"):
                model = AutoModelForImageTextToText.from_config(config)
        else:
            model = AutoModelForImageTextToText.from_config(config, dtype=dtype or torch.float32)
        return LoadedModel(model.eval(), None, adapter, src)

    is_local = Path(src).is_dir()
    if not is_local:
        _check_hub(src)
    model = load_checkpoint(src, dtype=dtype if dtype is not None else default_dtype(name_or_path))
    processor = None
    if with_processor:
        cls = processor_class(Path(src)) if is_local else None
        processor = load_processor(src, cls)
    return LoadedModel(model.eval(), processor, adapter, src)
