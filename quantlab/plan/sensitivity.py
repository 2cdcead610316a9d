"""Measured sensitivity: how much the model's output moves when one unit alone is quantized.

A *unit* is a set of Linears that must share a scheme (vLLM fuses q/k/v and gate/up) or a single Linear.
For every (unit, candidate scheme) the unit's weights are quantized with the candidate (GPTQ/BiLLM use the
full-precision Hessians from calibration), the calibration samples are run through the whole model, and
the damage is the mean token-level KL divergence ``KL(p_fp || p_quant)`` of the next-token distributions.
Damages are assumed additive across units, which is what the budget planner's integer program optimises.

Cost: one forward of the calibration subset per (unit, candidate). The weights of the unit are restored
after each measurement, so the model is left as it was.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from quantlab.calib.executor import CalibSample
from quantlab.models.load import LoadedModel
from quantlab.progress import block_progress
from quantlab.quant import quantize_weight
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
def _log_probs(loaded: LoadedModel, samples: Sequence[CalibSample]) -> list[torch.Tensor]:
    model = loaded.model
    out = []
    for s in samples:
        if hasattr(getattr(model, "model", None), "rope_deltas"):
            model.model.rope_deltas = None
        logits = model(**s.inputs, use_cache=False).logits.float()
        out.append(F.log_softmax(logits, dim=-1))
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
        h = h / max(float(h.diagonal().mean()), 1e-12)  # scale-free; GPTQ damps relative to the mean diagonal
    linear.weight.data.copy_(quantize_weight(weight, scheme, hessian=h).dequantized)


@torch.no_grad()
def quantized_kl(loaded: LoadedModel, samples: Sequence[CalibSample], mapping: Mapping[str, QuantScheme],
                 hessians: Mapping[str, torch.Tensor]) -> float:
    """KL of the model with every Linear of ``mapping`` quantized (full-precision Hessians) to the fp model.

    A fast proxy (no sequential re-calibration); the weights are restored afterwards.
    """
    modules = dict(loaded.model.named_modules())
    ref = _log_probs(loaded, samples)
    originals = {n: modules[n].weight.data.clone() for n in mapping}
    try:
        for n, scheme in mapping.items():
            _fake_quantize(modules[n], originals[n], scheme, hessians.get(n))
        return kl_damage(ref, _log_probs(loaded, samples))
    finally:
        for n, w in originals.items():
            modules[n].weight.data.copy_(w)


@torch.no_grad()
def measure_damage(
    loaded: LoadedModel,
    samples: Sequence[CalibSample],
    units: Sequence[Unit],
    candidates: Sequence[QuantScheme],
    hessians: Mapping[str, torch.Tensor],
    *,
    progress: bool = True,
) -> dict[tuple[Unit, str], float]:
    """``{(unit, scheme label): KL damage}`` with only ``unit`` quantized by the scheme."""
    modules = dict(loaded.model.named_modules())
    ref = _log_probs(loaded, samples)
    damage: dict[tuple[Unit, str], float] = {}
    with block_progress("sensitivity: units x candidates", len(units) * len(candidates), progress) as advance:
        for unit in units:
            originals = {n: modules[n].weight.data.clone() for n in unit}
            for scheme in candidates:
                for n in unit:
                    _fake_quantize(modules[n], originals[n], scheme, hessians.get(n))
                damage[unit, scheme.label()] = kl_damage(ref, _log_probs(loaded, samples))
                for n in unit:
                    modules[n].weight.data.copy_(originals[n])
                advance(0)
    return damage
