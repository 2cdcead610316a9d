"""Capture what every block of a stack receives, without running the blocks.

Each block of the stack is swapped for a :class:`_Recorder` that stores its call (positional args and
every kwarg: attention mask, position ids/embeddings incl. Qwen's mrope, cu_seqlens, ...) and passes its
hidden state through unchanged. The model's own forward therefore computes all the per-block arguments,
exactly as it would for the real blocks, and stops (via a private exception) at the last block. Only the
first block's hidden state is a real input; the executor recomputes the rest block by block.

Kwargs are captured per block because they can differ between blocks (Qwen2.5-VL's windowed vs
full-attention vision blocks, sliding-window decoder layers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class _StopForward(Exception):
    """Raised by the last recorder to end a capture pass (never escapes :func:`capture_calls`)."""


@dataclass
class BlockCall:
    """The arguments one block is called with for one sample; ``args[0]`` is the hidden state."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden(self, hidden: torch.Tensor) -> BlockCall:
        if self.args:
            return BlockCall((hidden, *self.args[1:]), self.kwargs)
        return BlockCall(self.args, {**self.kwargs, "hidden_states": hidden})


class _Recorder(nn.Module):
    """Stands in for a block during capture: records its call, returns the hidden state unchanged."""

    def __init__(self, block: nn.Module, index: int, last: bool, sink: list[BlockCall | None]):
        super().__init__()
        self.index, self.last, self.sink = index, last, sink
        # Parent forwards read attributes such as ``attention_type`` off their blocks: mirror plain ones.
        for key, value in vars(block).items():
            if not key.startswith("_") and isinstance(value, (str, int, float, bool, type(None))):
                setattr(self, key, value)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        call = BlockCall(args, kwargs)
        self.sink[self.index] = call
        if self.last:
            raise _StopForward
        return call.hidden


def capture_calls(blocks: nn.ModuleList, run_model: Callable[[], Any]) -> list[BlockCall]:
    """Run ``run_model()`` with every block of ``blocks`` replaced by a recorder; return one call per block.

    Raises:
        RuntimeError: if the forward never reached the last block (e.g. a text-only sample given to a
            vision stack).
    """
    originals = list(blocks)
    sink: list[BlockCall | None] = [None] * len(originals)
    for i, block in enumerate(originals):
        blocks[i] = _Recorder(block, i, i == len(originals) - 1, sink)
    try:
        run_model()
    except _StopForward:
        pass
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    missing = [i for i, c in enumerate(sink) if c is None]
    if missing:
        raise RuntimeError(f"capture: the forward pass never reached blocks {missing}")
    return sink  # type: ignore[return-value]


def block_output(out: Any) -> torch.Tensor:
    """The hidden state a block returned (transformers 5.x blocks return a tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"block returned {type(out).__name__}; expected a tensor (transformers 5.x block)")
