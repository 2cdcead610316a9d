"""The calibration pass: the decoder streamed block by block through a
:class:`~quantlab.calib.collector.StatsCollector` (the module doc there says what is collected), the vision
tower and projector when asked (:mod:`quantlab.calib.vision`), optional gradient measurements, gathered into
one :class:`~quantlab.calib.artifact.CalibrationStats`."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from quantlab.calib.artifact import CalibrationStats
from quantlab.calib.collector import BlockStats, StatsCollector  # noqa: F401 (re-exported)
from quantlab.calib.executor import CalibSample, stream_decoder
from quantlab.calib.modality_grad import block_gradient_ratios, token_importance
from quantlab.calib.options import ENTROPY_ON, CollectOptions, EntropyOn  # noqa: F401 (re-exported)
from quantlab.calib.vision import calibrate_vision
from quantlab.calib.weights import WeightSource
from quantlab.core.host_memory import heap_trimmer
from quantlab.core.progress import block_progress
from quantlab.models.load import LoadedModel

log = logging.getLogger(__name__)


def calibrate(loaded: LoadedModel, samples: Sequence[CalibSample] | Any, *, options: CollectOptions | None = None,
              weights: WeightSource | None = None, progress: bool = True,
              skipped: Mapping[str, int] | None = None, device: str | torch.device | None = None,
              **overrides: Any) -> CalibrationStats:
    """Stream the decoder over ``samples`` and collect per-block statistics (one forward per block).

    Args:
        loaded: the model (in memory, or a meta skeleton from ``load_streaming`` with ``weights``).
        samples: calibration samples, or a calibration set with ``.samples`` and ``.skipped``.
        options: what to collect; keyword ``overrides`` replace single fields (e.g. ``hessians=True``).
        weights: where block weights come from (``load_streaming``'s second value) or None (in memory).
        progress: show a rich progress bar with ETA, one step per decoder block.
        skipped: samples the data stage skipped, by reason (taken from ``samples.skipped`` if present).
        device: where each block and its statistics are computed (e.g. ``"cuda"``; one block and one
            sample's activations at a time); None computes where the weights are. Results are on the CPU.

    After every block, freed heap memory is returned to the OS (glibc ``malloc_trim``), so peak RSS does
    not ratchet up with depth.

    Returns:
        :class:`~quantlab.calib.artifact.CalibrationStats`.
    """
    if hasattr(samples, "samples"):
        skipped = dict(skipped or getattr(samples, "skipped", {}) or {})
        samples = samples.samples
    samples = list(samples)
    opts = options or CollectOptions()
    if overrides:
        known = {f.name for f in dataclasses.fields(CollectOptions)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"calibrate: unknown options {sorted(unknown)}; valid: {sorted(known)}")
        opts = dataclasses.replace(opts, **overrides)
    adapter = loaded.adapter
    if (opts.modality_gradients or opts.token_importance) and weights is not None:
        raise ValueError("modality_gradients / token_importance need a backward pass through the whole model, which "
                         "a streamed model does not hold; calibrate in memory (or give image_weight as a number)")
    if opts.vision and weights is not None:
        raise ValueError("vision statistics stream the image samples through the vision tower, which a streamed "
                         "model does not hold; calibrate in memory")
    collector = StatsCollector(samples, opts, prefix=adapter.decoder_blocks)
    n_blocks = len(adapter.blocks(loaded.model))
    trim = heap_trimmer()

    with block_progress("calibrate: decoder blocks", n_blocks, progress) as advance:
        def block_done(i: int) -> None:
            trim()
            advance(i)

        stream_decoder(loaded, samples, collector, weights=weights, on_block_done=block_done, device=device)
    n_image = sum(s.has_image for s in samples)
    meta = {
        "source": loaded.source,
        "model_type": getattr(loaded.config, "model_type", None),
        "decoder_blocks": adapter.decoder_blocks,
        "num_blocks": n_blocks,
        "luq_tensor": opts.entropy_on,
        "samples": {"total": len(samples), "image": n_image, "text": len(samples) - n_image,
                    "skipped": int(sum((skipped or {}).values())), "skipped_by_reason": dict(skipped or {})},
        "tokens": collector.token_counts,
        "options": opts.to_dict(),
    }
    if opts.modality_gradients:
        meta["modality_gradient_ratio"] = block_gradient_ratios(loaded, samples)
    log.info("calibrated %d decoder blocks on %d samples (tokens %s)", n_blocks, len(samples),
             collector.token_counts)
    stats = CalibrationStats.from_blocks(collector.blocks, meta)
    if opts.vision:
        seen = calibrate_vision(loaded, samples, opts, device=device)
        stats.meta.update(vision_blocks=adapter.vision_blocks, projector=adapter.projector,
                          vision_tokens={**seen.tokens, "images": seen.images})
        stats.vision_blocks = seen.blocks
        stats.linears.update(seen.linears)
        stats.hessians.update(seen.hessians)
        stats.hessian_weight.update(seen.hessian_weight)
    if opts.token_importance:
        stats.token_importance = token_importance(loaded, samples)
    return stats
