"""AWQ's per-input-channel scales (Lin et al., "AWQ: Activation-aware Weight Quantization", arXiv 2306.00978):
the pure parts. The quantize stage's block search and export come on top (issue 17).

A Linear ``y = W x`` computes the same with ``W' = W diag(s)`` on ``x' = x / s``. AWQ picks ``s = m^α`` from
each input channel's mean ``|x|`` ``m`` (channels that carry large activations get their weights scaled up,
so rounding them costs relatively less), with ``α`` searched on a grid in [0, 1) by the quantized block's
output error; ``x / s`` is never computed: ``1 / s`` folds into whatever produces ``x`` (an RMSNorm's
weight, or the rows of the previous Linear), so the model stays an ordinary checkpoint of the same
architecture. Reference: ``mit-han-lab/llm-awq``, ``awq/quantize/auto_scale.py`` (``auto_scale_block``,
``scale_ln_fcs``, ``scale_fc_fc``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

GRID = 20  # AWQ's n_grid: α in {0, 1/20, ..., 19/20}


def awq_scales(act_absmean: Tensor, alpha: float) -> Tensor:
    """``s = m^α``, normalised so ``max(s) · min(s) = 1`` (as llm-awq does, keeping weights' range centred)."""
    s = act_absmean.float().clamp(min=1e-4).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def fold_scales(producer: nn.Module, consumers: Sequence[nn.Linear], s: Tensor) -> None:
    """In place: ``producer``'s output channels divided by ``s``, every consumer's input columns multiplied by it.

    ``producer``: a norm with a per-channel ``weight`` (and optional ``bias``), or a Linear whose output rows
    feed the consumers directly (v_proj -> o_proj, up_proj -> down_proj). The composed function is unchanged.
    """
    s = s.to(torch.float32)
    with torch.no_grad():
        w = producer.weight
        if isinstance(producer, nn.Linear):
            if w.shape[0] != s.shape[0]:
                raise ValueError(f"fold: producer has {w.shape[0]} output rows, scales {s.shape[0]}")
            w.copy_((w.float() / s[:, None]).to(w.dtype))
        else:
            if w.shape != s.shape:
                raise ValueError(f"fold: norm weight {tuple(w.shape)} vs scales {tuple(s.shape)}")
            w.copy_((w.float() / s).to(w.dtype))
        bias = getattr(producer, "bias", None)
        if bias is not None:
            bias.copy_((bias.float() / s).to(bias.dtype))
        for lin in consumers:
            if lin.in_features != s.shape[0]:
                raise ValueError(f"fold: consumer has {lin.in_features} inputs, scales {s.shape[0]}")
            lin.weight.copy_((lin.weight.float() * s[None, :]).to(lin.weight.dtype))


def search_alpha(act_absmean: Tensor, loss: Callable[[Tensor], float], grid: int = GRID
                 ) -> tuple[float, Tensor, list[float]]:
    """AWQ's grid search: the ``α`` in ``{0, 1/grid, ..., (grid-1)/grid}`` whose scales minimise ``loss(s)``
    (the caller's quantized output error with scales ``s``). Returns ``(α, s, losses)``; ties keep the
    smaller α, and α = 0 (``s = 1``, plain quantization) is always a candidate, so AWQ never does worse
    than the quantizer alone on the loss it is searched on."""
    losses, best = [], None
    for k in range(grid):
        alpha = k / grid
        s = awq_scales(act_absmean, alpha)
        value = float(loss(s))
        losses.append(value)
        if best is None or value < best[0]:
            best = (value, alpha, s)
    assert best is not None
    return best[1], best[2], losses
