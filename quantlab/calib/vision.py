"""The calibration pass over the vision tower and projector: the same statistics as the decoder's, image tokens only.

:func:`calibrate_vision` streams the image calibration samples through the vision blocks one block at a time
(each sample's call into every block captured once from ``get_image_features``, as the quantize stage's
vision pass does: ``quantlab.quant.vision``), with a :class:`~quantlab.calib.collector.StatsCollector` per stack:

- vision block ``i``: its LUQ tensor (the output of the block's pre-attention norm, ``Adapter.vision_norm``:
  CLIP's ``layer_norm1``, Qwen's ``norm1``) with k-means and histogram entropy, and every Linear's input
  statistics and (optionally) Hessian ``Σ x_t x_tᵀ``;
- the projector (LLaVA's ``multi_modal_projector``, Qwen's ``merger``): its Linears' input statistics and
  Hessians, on the full-precision tower's output (no LUQ tensor: it is not a transformer block).

Every token of a vision tower is an image token, so the statistics are filed under ``image`` and ``all``
(``text`` is absent) and every token weighs the same in the Hessians. The projector's Linears see a
different number of tokens than the blocks (LLaVA drops the class token, Qwen merges 2x2 patches), which a
first pass over the images measures.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from quantlab.calib.collector import BlockStats, StatsCollector
from quantlab.calib.executor import CalibSample, capture_vision_inputs, run_block
from quantlab.calib.options import CollectOptions
from quantlab.calib.stats import TensorStats
from quantlab.core.device import placed, resolve_device
from quantlab.models.adapter import Component
from quantlab.models.inputs import encode_images
from quantlab.models.load import LoadedModel


@dataclass
class VisionStats:
    """What the vision pass yielded (merged into :class:`~quantlab.calib.artifact.CalibrationStats`)."""

    blocks: dict[int, dict[str, TensorStats]] = field(default_factory=dict)  # vision block -> modality -> stats
    linears: dict[str, dict[str, TensorStats]] = field(default_factory=dict)  # full name -> modality -> stats
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)
    hessian_weight: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)  # {"blocks": n, "projector": n}
    images: int = 0

    def add(self, b: BlockStats) -> None:
        self.linears.update(b.linears)
        self.hessians.update(b.hessians)
        self.hessian_weight.update(b.hessian_weight)


def _token_rows(n: int) -> CalibSample:
    """A stand-in sample for the collector: ``n`` token rows, all of them image tokens, none padding."""
    return CalibSample(id="", inputs={}, image_mask=torch.ones(n, dtype=torch.bool))


def _rows(x: torch.Tensor) -> int:
    return x.reshape(-1, x.shape[-1]).shape[0]


@torch.no_grad()
def calibrate_vision(loaded: LoadedModel, samples: Sequence[CalibSample], options: CollectOptions, *,
                     device: str | torch.device | None = None) -> VisionStats:
    """Statistics (and Hessians when ``options.hessians``) of every vision-block and projector Linear over the
    image samples among ``samples`` (module doc). Returns an empty :class:`VisionStats` when none has an image."""
    images = [s for s in samples if s.has_image]
    if not images:
        return VisionStats()
    model, adapter = loaded.model, loaded.adapter
    device = resolve_device(device)
    # every token counts the same inside the tower: image/text weights are the decoder's business
    opts = dataclasses.replace(options, modality_weights=(1.0, 1.0))
    projector = adapter.get(model, adapter.projector)
    first = next(m for m in projector.modules() if isinstance(m, nn.Linear))
    lengths: list[int] = []
    probe = first.register_forward_pre_hook(lambda _m, args: lengths.append(_rows(args[0])))
    try:  # one plain pass per image: the projector's token counts
        for s in images:
            encode_images(model, s.inputs)
    finally:
        probe.remove()

    blocks = adapter.blocks(model, Component.VISION)
    calls = capture_vision_inputs(loaded, images)
    hidden = [c[0].hidden for c in calls]
    collector = StatsCollector([_token_rows(_rows(h)) for h in hidden], opts, prefix=adapter.vision_blocks,
                               norm_name=adapter.vision_norm)
    out = VisionStats(images=len(images), tokens={"blocks": sum(_rows(h) for h in hidden)})
    for i, block in enumerate(blocks):
        with placed([block], device):
            hidden = collector(i, block, lambda block=block, i=i, hidden=hidden: run_block(block, calls, i, hidden,
                                                                                           device))
        stats = collector.blocks.pop(i)
        out.blocks[i] = stats.luq
        out.add(stats)

    # the projector on the full-precision tower's output; no LUQ tensor (entropy off, nothing returned)
    proj = StatsCollector([_token_rows(n) for n in lengths], dataclasses.replace(opts, entropy=False),
                          norm_name=None)

    def run_projector() -> list[torch.Tensor]:
        for s in images:
            encode_images(model, s.inputs)
        return []

    proj(0, projector, run_projector)
    stats = proj.blocks.pop(0)
    prefix = adapter.projector + "."
    out.add(BlockStats(0, {}, {prefix + n: v for n, v in stats.linears.items()},
                       {prefix + n: v for n, v in stats.hessians.items()},
                       {prefix + n: v for n, v in stats.hessian_weight.items()}))
    out.tokens["projector"] = sum(lengths)
    return out
