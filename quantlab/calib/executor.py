"""The streaming executor: run a VLM's decoder one block at a time over calibration samples.

This is the engine both calibration and quantization use. For every decoder block, in order:

1. its weights are materialised (a no-op for in-memory models);
2. the ``stage`` callback receives ``(index, block, run)``; ``run()`` executes the block on every sample's
   current input and returns the outputs. A stage may register hooks and call ``run()`` to observe
   activations, replace the block's weights (quantize) and call ``run()`` again, any number of times;
   ``run(until=modules)`` stops each sample's pass as soon as one of ``modules`` receives its input (for a
   stage that observes only that input: quantize's steps skip the rest of the block);
3. the block's outputs (what the stage returned, or a final ``run()``) become the next block's inputs;
4. the block's weights are released.

Inputs are captured once per sample by :func:`quantlab.calib.capture.capture_calls`, so every kwarg
the model's own forward computes (attention masks, position embeddings, Qwen's mrope) is reused as is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from accelerate.utils import send_to_device
from torch import nn

from quantlab.calib.capture import BlockCall, block_output, capture_calls
from quantlab.calib.weights import InMemory, WeightSource
from quantlab.core.device import placed, resolve_device
from quantlab.models.adapter import Component
from quantlab.models.inputs import encode_images
from quantlab.models.load import LoadedModel


@dataclass
class CalibSample:
    """One calibration sample: model inputs (batch of one) and which of its tokens are image tokens."""

    id: str
    inputs: dict[str, torch.Tensor]
    image_mask: torch.Tensor  # (seq,) bool
    meta: dict = field(default_factory=dict)

    @property
    def has_image(self) -> bool:
        return bool(self.image_mask.any())

    @property
    def valid_mask(self) -> torch.Tensor:
        """``(seq,)`` bool: the tokens that are not padding (from the attention mask, when it has one per token)."""
        seq = self.image_mask.shape[-1]
        am = self.inputs.get("attention_mask")
        if am is not None and am.shape[-1] == seq:
            return am.reshape(-1, seq)[0].bool()
        return torch.ones(seq, dtype=torch.bool, device=self.image_mask.device)


Run = Callable[..., list[torch.Tensor]]


class _Reached(Exception):
    """Raised by the stop hook of ``run(until=...)``: the pass has delivered the input asked for."""


def _stop(module: nn.Module, args: tuple) -> None:
    raise _Reached


class BlockStage(Protocol):
    """A per-block hook: observe and/or modify ``block``; may return the outputs it computed."""

    def __call__(self, index: int, block: nn.Module, run: Run) -> list[torch.Tensor] | None: ...


def _forward(model: nn.Module, sample: CalibSample) -> Callable[[], object]:
    def call() -> object:
        if hasattr(getattr(model, "model", None), "rope_deltas"):
            model.model.rope_deltas = None  # Qwen caches mrope offsets between calls
        return model(**sample.inputs, use_cache=False)

    return call


@torch.no_grad()
def capture_decoder_inputs(loaded: LoadedModel, samples: Sequence[CalibSample]) -> list[list[BlockCall]]:
    """Per sample, the call every decoder block would receive (``[sample][block]``)."""
    blocks = loaded.adapter.blocks(loaded.model, Component.DECODER)
    return [capture_calls(blocks, _forward(loaded.model, s)) for s in samples]


@torch.no_grad()
def capture_vision_inputs(loaded: LoadedModel, images: Sequence[CalibSample]) -> list[list[BlockCall]]:
    """Per image sample, the call every vision block would receive (from the family's ``get_image_features``:
    Qwen2.5-VL's window order, ``cu_seqlens`` and rotary embeddings are the model's own).

    One plain pass comes first: transformers installs its hidden-state capturing hooks (which the families'
    ``get_image_features`` use to pick a layer) lazily on the first call; installed while the blocks are
    wrapped for the capture, they would miss them and every later forward would find no hidden states.
    """
    model = loaded.model
    blocks = loaded.adapter.blocks(model, Component.VISION)
    encode_images(model, images[0].inputs)
    return [capture_calls(blocks, lambda s=s: encode_images(model, s.inputs)) for s in images]


def every_token(hidden: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """All-true token masks for hidden states without padding (a vision block's): one per sample, one entry
    per row of ``(..., c)``."""
    return [torch.ones(h.reshape(-1, h.shape[-1]).shape[0], dtype=torch.bool) for h in hidden]


def run_block(block: nn.Module, calls: Sequence[Sequence[BlockCall]], index: int,
              hidden: Sequence[torch.Tensor], device: torch.device | None = None,
              until: Sequence[nn.Module] = ()) -> list[torch.Tensor]:
    """Decoder block ``index`` over every sample's hidden state, each with that sample's captured call.

    With ``device``, each sample's call is moved there (the block must already be) and its output comes
    back to where its hidden state was, so only one sample's activations occupy the device at a time.
    With ``until``, each pass stops when the first of those modules is called, after its other forward
    pre-hooks ran (those registered before this call), and nothing is returned.
    """
    stops = [m.register_forward_pre_hook(_stop) for m in until]
    outs = []
    try:
        for s, h in enumerate(hidden):
            call = calls[s][index].with_hidden(h)
            if device is not None:
                call = BlockCall(send_to_device(call.args, device), send_to_device(call.kwargs, device))
            try:
                out = block_output(block(*call.args, **call.kwargs))
            except _Reached:
                continue
            outs.append(out if device is None else out.to(h.device))
    finally:
        for stop in stops:
            stop.remove()
    if until and outs:
        raise RuntimeError(f"block {index}: none of the modules to stop at was called")
    return outs


@torch.no_grad()
def stream_decoder(
    loaded: LoadedModel,
    samples: Sequence[CalibSample],
    stage: BlockStage | None = None,
    *,
    weights: WeightSource | None = None,
    on_block_done: Callable[[int], None] | None = None,
    device: str | torch.device | None = None,
) -> list[torch.Tensor]:
    """Stream all decoder blocks over ``samples``; returns the last block's outputs (one per sample).

    ``device`` (e.g. ``"cuda"``): each block is moved there for its stage and back to the CPU after it;
    hidden states and captured inputs stay on the CPU between blocks. None computes where the block is.
    """
    if not samples:
        raise ValueError("stream_decoder: no calibration samples")
    weights = weights or InMemory()
    device = resolve_device(device)
    adapter = loaded.adapter
    blocks = adapter.blocks(loaded.model, Component.DECODER)
    calls = capture_decoder_inputs(loaded, samples)
    hidden = [c[0].hidden for c in calls]
    for i, block in enumerate(blocks):
        prefix = f"{adapter.decoder_blocks}.{i}"
        weights.load(block, prefix)

        def run(block: nn.Module = block, i: int = i, until: Sequence[nn.Module] = ()) -> list[torch.Tensor]:
            return run_block(block, calls, i, hidden, device, until)

        with placed([block], device):
            outs = stage(i, block, run) if stage is not None else None
            hidden = outs if outs is not None else run()
        weights.release(block, prefix)
        if on_block_done is not None:
            on_block_done(i)
    return hidden


@torch.no_grad()
def decoder_logits(loaded: LoadedModel, hidden: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Final norm + lm_head over the last block's outputs (for logit-level quality proxies)."""
    norm = loaded.adapter.get(loaded.model, loaded.adapter.final_norm)
    head = loaded.adapter.get(loaded.model, loaded.adapter.lm_head)
    return [head(norm(h)) for h in hidden]
