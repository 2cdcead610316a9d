"""The Hessians a measuring planner quantizes its candidates with, token-weighted as each candidate asks.

Calibration keeps one Hessian per decoder Linear, every token counted the same (``stats.hessians``). A
candidate with ``image_weight`` (a number) or ``token_weight: gradient`` is solved by the quantize stage
against ``Σ_t w_t x_t x_tᵀ / Σ_t w_t`` instead (docs/method.md#token-weighted-hessians); measuring it with the
plain Hessian would score another objective than the one it is quantized with. :func:`hessian_source`
gathers the weighted Hessians the candidates need in one pass over the full-precision decoder (the inputs
the sensitivity measurement uses too) and answers ``(module, scheme) -> Hessian``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from quantlab.calib.executor import CalibSample, stream_decoder
from quantlab.models.load import LoadedModel
from quantlab.quant.apply import HessianHook, block_importance, token_weights, weighting
from quantlab.quant.registry import MEASURED, get_backend
from quantlab.quant.scheme import QuantScheme

HessianSource = Callable[[str, QuantScheme], torch.Tensor | None]
PLAIN = (1.0, False)


def _key(scheme: QuantScheme) -> tuple[float, bool]:
    if scheme.args.get("image_weight") == MEASURED:
        raise ValueError(f"{scheme.label()}: image_weight {MEASURED!r} is resolved per block by the plan stage; a "
                         "measuring planner's candidates take a number")
    return weighting(scheme)


def weighted(scheme: QuantScheme) -> bool:
    """``scheme``'s Hessian weighs tokens unevenly (so calibration's plain one is not the one it is solved with)."""
    return _key(scheme) != PLAIN


def plain_source(hessians: Mapping[str, torch.Tensor]) -> HessianSource:
    """Every scheme gets calibration's (unweighted) Hessian."""
    return lambda name, _scheme: hessians.get(name)


@torch.no_grad()
def hessian_source(loaded: LoadedModel, samples: Sequence[CalibSample], candidates: Sequence[QuantScheme],
                   names: Sequence[str], hessians: Mapping[str, torch.Tensor],
                   token_importance: Mapping[int, Mapping[str, torch.Tensor]] | None = None) -> HessianSource:
    """``(module, scheme) -> Hessian``: calibration's for unweighted schemes, and for each weighting the
    ``candidates`` ask for, ``Σ w_t x_t x_tᵀ / Σ w_t`` of every Linear in ``names`` over ``samples`` (one pass
    through the full-precision decoder; ``token_importance`` from calibration for ``token_weight``)."""
    keys = sorted({_key(c) for c in candidates if get_backend(c.backend).needs_hessian and weighted(c)})
    if not keys:
        return plain_source(hessians)
    if any(by_grad for _w, by_grad in keys) and not token_importance:
        raise ValueError("token_weight 'gradient' candidates need calibration's token importance: calibrate with "
                         "token_importance (the quantize command does when a recipe scheme asks for it)")
    adapter = loaded.adapter
    wanted = set(names)
    gathered: dict[tuple[str, tuple[float, bool]], torch.Tensor] = {}

    def stage(index: int, block: nn.Module, run) -> list[torch.Tensor]:
        prefix = f"{adapter.decoder_blocks}.{index}."
        linears = {prefix + n: m for n, m in block.named_modules() if isinstance(m, nn.Linear) and prefix + n in wanted}
        hooks = {(n, k): HessianHook([m], token_weights(samples, k[0], block_importance(token_importance, index, k[1])))
                 for n, m in linears.items() for k in keys}
        try:
            outs = run()
        finally:
            for hook in hooks.values():
                hook.remove()
        gathered.update({nk: hook.h.cpu() for nk, hook in hooks.items()})
        return outs

    stream_decoder(loaded, samples, stage)

    def source(name: str, scheme: QuantScheme) -> torch.Tensor | None:
        key = _key(scheme)
        return hessians.get(name) if key == PLAIN else gathered.get((name, key))

    return source
