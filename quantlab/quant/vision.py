"""Calibrated quantization of the vision tower and projector: the image samples streamed block by block.

The decoder's pass (``quantlab.quant.apply.quantize``) only reaches decoder blocks. For vision and projector
Linears whose backend needs a Hessian (GPTQ, BiLLM), this pass runs first, on the image calibration samples:

1. each sample's call into every vision block is captured once (``calib.executor.capture_vision_inputs``, on
   ``model.get_image_features``, so Qwen2.5-VL's window indices, ``cu_seqlens`` and rotary embeddings are the
   model's own);
2. vision blocks in order, each Linear step (Linears that read one input together, ``sequential_steps``)
   accumulating its Hessian over every image token of every sample and solved, then the block run again to
   give the next block its (quantized) inputs, as GPTQ does for the decoder;
3. the planned Linears after the blocks (the projector, Qwen's merger) one at a time, in module order, each
   on the full quantized tower's output.

The decoder pass that follows captures its inputs through the quantized tower, so the decoder is calibrated
on the image embeddings it will see. Every token of an image counts the same (no modality weighting inside a
vision tower).

AWQ (``args: {awq: true}``) runs per vision block before its solves, as in the decoder: each of the adapter's
``vision_scale_pairs`` whose consumers ask for it is searched on the block's output error and folded in
(``quantlab.quant.awq.search_block_scales``); the consumers' results record their scales. A resumed run
recomputes this whole pass (it is deterministic), folds included.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from quantlab.calib.executor import (
    CalibSample,
    capture_vision_inputs,
    every_token,
    run_block,
)
from quantlab.core.device import placed, resolve_device
from quantlab.models.adapter import Component
from quantlab.models.inputs import encode_images
from quantlab.models.load import LoadedModel
from quantlab.quant import awq
from quantlab.quant.scheme import QuantScheme
from quantlab.quant.steps import HessianHook, quantize_module, sequential_steps


def _encode(model: nn.Module, sample: CalibSample) -> Callable[[], object]:
    return lambda: encode_images(model, sample.inputs)


@torch.no_grad()
def quantize_vision(loaded: LoadedModel, planned: Mapping[str, QuantScheme], samples: Sequence[CalibSample], *,
                    device: str | torch.device | None = None) -> dict[str, object]:
    """Quantize the vision/projector Linears in ``planned`` (name -> scheme) in place on ``samples``' images;
    returns name -> result (module doc).

    Raises:
        ValueError: no calibration sample has an image.
    """
    if not planned:
        return {}
    images = [s for s in samples if s.has_image]
    if not images:
        raise ValueError(f"{next(iter(planned))}: vision/projector Linears with a calibrated backend need image "
                         "calibration samples; set calibration.alpha above 0")
    model, adapter = loaded.model, loaded.adapter
    device = resolve_device(device)
    modules = dict(model.named_modules())
    blocks = adapter.blocks(model, Component.VISION)
    results: dict[str, object] = {}

    def solve_step(step: list[str], feed: Callable[[list[nn.Linear]], None]) -> None:
        linears = [modules[n] for n in step]
        hook = HessianHook(linears)
        try:
            feed(linears)
        finally:
            hook.remove()
        for k, n in enumerate(step):
            # each solve factors its Hessian in place: all but the last Linear of the step get a copy
            results[n] = quantize_module(n, modules[n], planned[n], hook.h if k == len(step) - 1 else hook.h.clone())

    in_blocks = {n for n in planned if n.startswith(adapter.vision_blocks + ".")}
    if in_blocks:
        calls = capture_vision_inputs(loaded, images)
        hidden = [c[0].hidden for c in calls]
        for i, block in enumerate(blocks):
            prefix = f"{adapter.vision_blocks}.{i}."
            names = [prefix + n for n, m in block.named_modules() if isinstance(m, nn.Linear) and prefix + n in planned]
            def run(until=(), i=i, block=block, hidden=hidden) -> list[torch.Tensor]:
                return run_block(block, calls, i, hidden, device, until=until)

            with placed([block], device):
                pairs = awq.block_pairs(adapter.vision_scale_pairs, block, prefix, planned)
                scaled = {}
                if pairs:  # AWQ first, on the block still in full precision (module doc)
                    scaled = awq.search_block_scales(block, prefix, pairs, planned, run, every_token(hidden))
                for step in sequential_steps(names, adapter.fused_groups):
                    solve_step(step, lambda linears, run=run: run(until=linears))
                for n, (alpha, s) in scaled.items():
                    results[n] = awq.with_scales(results[n], alpha, s)
                hidden = run_block(block, calls, i, hidden, device)
    rest = [n for n in modules if n in planned and n not in in_blocks]  # module order
    for name in rest:
        solve_step([name], lambda _linears: [_encode(model, s)() for s in images])
    return results
