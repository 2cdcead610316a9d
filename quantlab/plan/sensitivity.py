"""Measured sensitivity: how much the model's output moves when one unit alone is quantized.

A *unit* is a set of Linears that must share a scheme (vLLM fuses q/k/v and gate/up) or a single Linear.
For every (unit, candidate scheme) the unit's weights are quantized with the candidate (GPTQ/BiLLM use the
full-precision Hessians from calibration), the calibration samples are run through the whole model, and
the damage is the mean token-level KL divergence ``KL(p_fp || p_quant)`` of the next-token distributions.
Damages are assumed additive across units, which is what the budget planner's integer program optimises.

Cost: per (unit, candidate), one pass of the calibration subset through the unit's block and the blocks
after it (streamed from cached full-precision block inputs). The weights of the unit are restored after
each measurement, so the model is left as it was.

Units of the vision tower and projector (:func:`measure_outside_decoder`) change the image embeddings every
decoder block reads, so each of their measurements is one pass of the whole model over the subset; the
damage is the same KL over the same tokens, so it adds up with the decoder units' in one integer program.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device
from torch import nn

from quantlab.calib.executor import (
    CalibSample,
    capture_decoder_inputs,
    capture_vision_inputs,
    decoder_logits,
    every_token,
    run_block,
)
from quantlab.core.device import placed, resolve_device
from quantlab.core.progress import block_progress
from quantlab.models import Component
from quantlab.models.load import LoadedModel
from quantlab.plan.hessians import HessianSource, plain_source
from quantlab.quant import awq, quantize_weight
from quantlab.quant.apply import token_weights, weighting
from quantlab.quant.scheme import QuantScheme

Unit = tuple[str, ...]


def units_of(block_linears: Mapping[int, Sequence[str]], fused: Sequence[Sequence[str]]) -> list[Unit]:
    """Decoder Linears grouped into units: fused groups together, the rest one per Linear (module order)."""
    group_of = {n: tuple(g) for g in fused for n in g}
    seen: set[str] = set()
    units: list[Unit] = []
    for b in sorted(block_linears):
        for n in block_linears[b]:
            if n in seen:
                continue
            unit = group_of.get(n, (n,))
            seen.update(unit)
            units.append(unit)
    return units


@torch.no_grad()
def _log_probs(loaded: LoadedModel, samples: Sequence[CalibSample],
               device: torch.device | None = None) -> list[torch.Tensor]:
    """The whole model's next-token log-probabilities per sample (on the CPU when ``device`` is given)."""
    model = loaded.model
    out = []
    for s in samples:
        if hasattr(getattr(model, "model", None), "rope_deltas"):
            model.model.rope_deltas = None
        inputs = s.inputs if device is None else send_to_device(s.inputs, device)
        logits = model(**inputs, use_cache=False).logits.float()
        out.append(F.log_softmax(logits, dim=-1) if device is None else F.log_softmax(logits, dim=-1).cpu())
    return out


def kl_damage(ref: Sequence[torch.Tensor], new: Sequence[torch.Tensor]) -> float:
    """Mean over all tokens of ``KL(ref || new)`` (natural log), from log-probabilities."""
    total, count = 0.0, 0
    for p, q in zip(ref, new):
        kl = (p.exp() * (p - q)).sum(-1)
        total += float(kl.sum())
        count += kl.numel()
    return total / max(count, 1)


def _fake_quantize(linear: nn.Linear, weight: torch.Tensor, scheme: QuantScheme, h: torch.Tensor | None) -> None:
    if h is not None:
        h = h.to(weight.device)
        h = h / max(float(h.diagonal().mean()), 1e-12)  # scale-free; GPTQ damps relative to the mean diagonal
    linear.weight.data.copy_(quantize_weight(weight, scheme, hessian=h).dequantized)


def _source(hessians: Mapping[str, torch.Tensor] | HessianSource) -> HessianSource:
    return hessians if callable(hessians) else plain_source(hessians)


@torch.no_grad()
def quantized_kl(loaded: LoadedModel, samples: Sequence[CalibSample], mapping: Mapping[str, QuantScheme],
                 hessians: Mapping[str, torch.Tensor] | HessianSource) -> float:
    """KL of the model with every Linear of ``mapping`` quantized (full-precision Hessians: calibration's, or
    a :func:`quantlab.plan.hessians.hessian_source` answering per scheme) to the fp model.

    A fast proxy (no sequential re-calibration); the weights are restored afterwards.
    """
    hessian_of = _source(hessians)
    modules = dict(loaded.model.named_modules())
    ref = _log_probs(loaded, samples)
    originals = {n: modules[n].weight.data.clone() for n in mapping}
    try:
        for n, scheme in mapping.items():
            _fake_quantize(modules[n], originals[n], scheme, hessian_of(n, scheme))
        return kl_damage(ref, _log_probs(loaded, samples))
    finally:
        for n, w in originals.items():
            modules[n].weight.data.copy_(w)


def _suffix_log_probs(loaded: LoadedModel, calls, hidden: Sequence[torch.Tensor], start: int,
                      device: torch.device | None = None) -> list[torch.Tensor]:
    """Log-probabilities (on the CPU) from decoder blocks ``start..`` onward, given their inputs ``hidden``."""
    blocks = loaded.adapter.blocks(loaded.model, Component.DECODER)
    for i in range(start, len(blocks)):
        hidden = run_block(blocks[i], calls, i, hidden, device)
    out = []
    for h in hidden:  # one sample's logits on the device at a time
        (logits,) = decoder_logits(loaded, [h if device is None else h.to(device)])
        out.append(F.log_softmax(logits.float(), dim=-1).cpu())
    return out


def _decoder_and_head(loaded: LoadedModel) -> list[nn.Module]:
    """What a measurement runs (a suffix of the decoder, the final norm, the head): all of it on the device."""
    a = loaded.adapter
    return [*a.blocks(loaded.model, Component.DECODER), a.get(loaded.model, a.final_norm),
            a.get(loaded.model, a.lm_head)]


@contextlib.contextmanager
def _awq_scaled(block: nn.Module, prefix: str, pairs, used: Mapping[str, QuantScheme | None], run,
                valid: Callable[[], tuple[list[torch.Tensor], list[torch.Tensor] | None]]
                ) -> Iterator[dict[str, torch.Tensor]]:
    """With AWQ candidates: the unit's pairs searched and folded into ``block`` (the quantize stage's search,
    :func:`quantlab.quant.awq.search_block_scales`, on the fp block), yielding consumer -> scales; the producers
    and consumers are restored on exit. Without: nothing changes and the mapping is empty. ``valid()``: each
    sample's non-padding tokens and their weights in the loss (None: every valid token once)."""
    found = awq.block_pairs(pairs, block, prefix, used)
    if not found:
        yield {}
        return
    touched = {name for producer, consumers in found for name in (producer, *consumers)}
    saved = {n: {k: t.detach().clone() for k, t in block.get_submodule(n.removeprefix(prefix)).named_parameters()}
             for n in touched}
    try:
        masks, weights = valid()
        scaled = awq.search_block_scales(block, prefix, found, used, run, masks, weights)
        yield {n: s for n, (_alpha, s) in scaled.items()}
    finally:
        for n, params in saved.items():
            module = block.get_submodule(n.removeprefix(prefix))
            for k, t in params.items():
                module.get_parameter(k).data.copy_(t)


def _decoder_tokens(samples: Sequence[CalibSample], scheme: QuantScheme | None):
    """``valid()`` of :func:`_awq_scaled` for a decoder block: padding masks, tokens weighted as ``scheme`` asks."""
    def valid() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        w, by_grad = weighting(scheme)
        if by_grad:
            raise ValueError("awq with token_weight 'gradient' is not measured by the budget planner yet")
        return [s.valid_mask for s in samples], token_weights(samples, w)
    return valid


def _scaled_hessian(h: torch.Tensor | None, s: torch.Tensor | None) -> torch.Tensor | None:
    """The Hessian a solve on ``x / s`` sees: ``diag(1/s) H diag(1/s)``."""
    if h is None or s is None:
        return h
    inv = 1.0 / s.to(h.device, h.dtype)
    return h * inv[:, None] * inv[None, :]


@torch.no_grad()
def measure_damage(
    loaded: LoadedModel,
    samples: Sequence[CalibSample],
    units: Sequence[Unit],
    candidates: Sequence[QuantScheme],
    hessians: Mapping[str, torch.Tensor] | HessianSource,
    *,
    progress: bool = True,
    device: str | torch.device | None = None,
    fit: Callable[[str, QuantScheme], QuantScheme | None] | None = None,
) -> dict[tuple[Unit, str], float]:
    """``{(unit, scheme label): KL damage}`` with only ``unit`` quantized by the scheme.

    Streams like calibration: the full-precision decoder input of block ``b`` is computed once, and a unit
    of block ``b`` is measured by running blocks ``b..`` only (the vision tower, the embeddings and the
    earlier blocks are unchanged by it), which holds one set of hidden states at a time.

    ``device`` (e.g. ``"cuda"``): the decoder, final norm and head are moved there for the measurement
    (the whole decoder must fit on it), hidden states and log-probabilities stay on the CPU.
    ``fit(name, scheme)``: the scheme a module really gets (the plan's shape fallback; None keeps it).
    ``hessians``: calibration's per Linear, or a :func:`quantlab.plan.hessians.hessian_source` (token-weighted
    candidates get the Hessian they are quantized with).
    """
    hessian_of = _source(hessians)
    device = resolve_device(device)
    modules = dict(loaded.model.named_modules())
    adapter = loaded.adapter
    blocks = adapter.blocks(loaded.model, Component.DECODER)
    calls = capture_decoder_inputs(loaded, samples)
    by_block: dict[int, list[Unit]] = {}
    for unit in units:
        b = adapter.block_index(unit[0])
        if b is None or any(adapter.block_index(n) != b for n in unit):
            raise ValueError(f"sensitivity: unit {unit} is not inside one decoder block")
        by_block.setdefault(b, []).append(unit)
    hidden = [c[0].hidden for c in calls]
    last = max(by_block, default=-1)  # no need to advance the fp hidden states past the last measured block
    damage: dict[tuple[Unit, str], float] = {}
    with placed(_decoder_and_head(loaded), device), \
            block_progress("sensitivity: units x candidates", len(units) * len(candidates), progress) as advance:
        ref = _suffix_log_probs(loaded, calls, hidden, 0, device)
        for b, block in enumerate(blocks):
            for unit in by_block.get(b, []):
                originals = {n: modules[n].weight.data.clone() for n in unit}
                for scheme in candidates:
                    used = {n: scheme if fit is None else fit(n, scheme) for n in unit}
                    with _awq_scaled(block, f"{adapter.decoder_blocks}.{b}.", adapter.scale_pairs, used,
                                     lambda until=(), b=b, block=block, hidden=hidden: run_block(
                                         block, calls, b, hidden, device, until),
                                     _decoder_tokens(samples, next((u for u in used.values() if u), None))) as scales:
                        for n in unit:
                            if used[n] is not None:
                                h = _scaled_hessian(hessian_of(n, used[n]), scales.get(n))
                                _fake_quantize(modules[n], modules[n].weight.data.clone(), used[n], h)
                        damage[unit, scheme.label()] = kl_damage(ref, _suffix_log_probs(loaded, calls, hidden, b,
                                                                                         device))
                    for n in unit:
                        modules[n].weight.data.copy_(originals[n])
                    advance(0)
            if b < last:
                hidden = run_block(block, calls, b, hidden, device)
    return damage


class _VisionInputs:
    """The full-precision inputs of each vision block over the image samples, computed in block order as the
    measurement reaches them (one block's inputs held at a time), for AWQ's block-wise search."""

    def __init__(self, loaded: LoadedModel, samples: Sequence[CalibSample], device: torch.device | None):
        self.blocks = loaded.adapter.blocks(loaded.model, Component.VISION)
        self.calls = capture_vision_inputs(loaded, [s for s in samples if s.has_image])
        self.device, self.index = device, 0
        self.hidden = [c[0].hidden for c in self.calls]

    def at(self, b: int) -> tuple[Callable[..., list[torch.Tensor]], list[torch.Tensor]]:
        """``(run, valid)`` of vision block ``b`` (``b`` never decreases between calls)."""
        while self.index < b:
            self.hidden = run_block(self.blocks[self.index], self.calls, self.index, self.hidden, self.device)
            self.index += 1
        block, hidden = self.blocks[b], self.hidden

        def run(until=()) -> list[torch.Tensor]:
            return run_block(block, self.calls, b, hidden, self.device, until)

        return run, every_token(hidden)


@torch.no_grad()
def measure_outside_decoder(
    loaded: LoadedModel,
    samples: Sequence[CalibSample],
    candidates: Mapping[Unit, Sequence[QuantScheme]],
    hessians: Mapping[str, torch.Tensor] | HessianSource,
    *,
    progress: bool = True,
    device: str | torch.device | None = None,
    fit: Callable[[str, QuantScheme], QuantScheme | None] | None = None,
) -> dict[tuple[Unit, str], float]:
    """``{(unit, scheme label): KL damage}`` for vision-tower and projector units (module doc), each unit with
    its own candidates (those that can run and be exported there), in module order.

    An AWQ candidate of a vision-block unit is measured as the quantize stage runs it: the unit's scale pairs
    searched on the full-precision block's output error and folded in (restored afterwards), the solve on
    ``x / s``. ``device``: the whole model is moved there for the measurement. Hessians are calibration's
    (every image token weighs the same inside the tower: :mod:`quantlab.calib.vision`).
    """
    hessian_of = _source(hessians)
    device = resolve_device(device)
    adapter = loaded.adapter
    modules = dict(loaded.model.named_modules())
    damage: dict[tuple[Unit, str], float] = {}
    total = sum(len(c) for c in candidates.values())
    order = sorted(candidates, key=lambda u: (adapter.vision_block_index(u[0]) is None,
                                              adapter.vision_block_index(u[0]) or 0))
    with placed([loaded.model], device), \
            block_progress("sensitivity: vision/projector units x candidates", total, progress) as advance:
        ref = _log_probs(loaded, samples, device)
        # without image samples no vision unit moves the output (every damage 0), so there is nothing to search on
        inputs = _VisionInputs(loaded, samples, device) if any(s.has_image for s in samples) and any(
            awq.wants_awq(c) for u in order for c in candidates[u] if adapter.vision_block_index(u[0]) is not None
        ) else None
        for unit in order:
            b = adapter.vision_block_index(unit[0])
            originals = {n: modules[n].weight.data.clone() for n in unit}
            for scheme in candidates[unit]:
                used = {n: scheme if fit is None else fit(n, scheme) for n in unit}
                context = contextlib.nullcontext({})
                if b is not None and inputs is not None and awq.wants_awq(scheme):
                    run, valid = inputs.at(b)
                    context = _awq_scaled(inputs.blocks[b], f"{adapter.vision_blocks}.{b}.", adapter.vision_scale_pairs,
                                          used, run, lambda valid=valid: (valid, None))
                try:
                    with context as scales:
                        for n in unit:
                            if used[n] is not None:
                                h = _scaled_hessian(hessian_of(n, used[n]), scales.get(n))
                                _fake_quantize(modules[n], modules[n].weight.data.clone(), used[n], h)
                        damage[unit, scheme.label()] = kl_damage(ref, _log_probs(loaded, samples, device))
                finally:
                    for n in unit:
                        modules[n].weight.data.copy_(originals[n])
                advance(0)
    return damage
