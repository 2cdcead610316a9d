"""Open any checkpoint quantlab can evaluate: its own exports in every format, and base checkpoints.

quantlab has four loaders; this one picks between the first two by what the directory holds:

| function                                   | opens                                                      |
|--------------------------------------------|------------------------------------------------------------|
| :func:`quantlab.models.load.load_model`    | an alias, a checkpoint directory (plain, compressed-tensors, GPTQ) or a hub id, through transformers; a config alone as a meta/random skeleton |
| :func:`quantlab.export.native.load_native` | a quantlab native export (``quantlab.json``: BiLLM layers), dequantized |
| :func:`quantlab.calib.weights.load_streaming` | a checkpoint directory as a meta-device skeleton whose blocks are read from its safetensors on demand (models larger than memory) |
| :func:`open_model` (here)                  | either of the first two, by the directory's contents        |

All of them refuse a checkpoint whose tensors do not match its config, naming the tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch

from quantlab.export.native import MARKER, load_native
from quantlab.models.load import LoadedModel, load_model, resolve


def open_model(name_or_path: str | Path, *, dtype: torch.dtype | None = None) -> LoadedModel:
    """A quantlab native export (dequantized, fp32 unless ``dtype``), or whatever :func:`load_model` opens."""
    path = Path(resolve(name_or_path))
    if (path / MARKER).is_file():
        return load_native(path, dtype=dtype or torch.float32)
    return load_model(name_or_path, dtype=dtype)
