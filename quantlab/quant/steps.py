"""One Linear's solve inside a pass over calibration data, shared by the decoder's pass
(:mod:`quantlab.quant.apply`) and the vision tower's (:mod:`quantlab.quant.vision`): which Linears share an
input (a step), their Hessian accumulated from forward pre-hooks, and the solve that writes the fake-quant
weight back and keeps the packed result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from quantlab.quant import quantize_weight
from quantlab.quant.registry import HESSIAN_OPTIONS
from quantlab.quant.scheme import QuantScheme


def check_shape(name: str, module: nn.Linear, scheme: QuantScheme) -> None:
    """Refuse shapes a scheme cannot take, naming the module and the reason."""
    cols = module.in_features
    if scheme.group_size != -1 and cols % scheme.group_size:
        raise ValueError(f"{name}: in_features={cols} is not divisible by group_size={scheme.group_size} "
                         f"({scheme.label()}); keep this module or choose a group size that divides it")


def sequential_steps(names: Sequence[str], fused_groups: Sequence[Sequence[str]]) -> list[list[str]]:
    """Group Linear names (in module order) into steps; names sharing an input go together."""
    steps: list[list[str]] = []
    placed: set[str] = set()
    for name in names:
        if name in placed:
            continue
        step = [name]
        for group in fused_groups:
            if any(name.endswith("." + g) for g in group):
                prefix = name.rsplit(".", len(group[0].split(".")))[0]
                step = [n for n in names if n.startswith(prefix + ".") and any(n.endswith("." + g) for g in group)]
                break
        steps.append(step)
        placed.update(step)
    return steps


class HessianHook:
    """Accumulates ``mean(xᵀx)`` over all tokens of all samples of the one input ``modules`` read (a step:
    q/k/v read the same tensor); a pass is expected to stop at the first of them (``run(until=...)``).

    With ``weights`` (one ``(seq,)`` tensor per sample, in the order the executor runs them), token ``t``
    counts ``w_t`` times: ``ΣXᵀDX / ΣD`` (:func:`quantlab.quant.hessian.weighted_hessian_from_inputs`).
    """

    def __init__(self, modules: Sequence[nn.Linear], weights: Sequence[torch.Tensor] | None = None):
        first = modules[0]
        self.h = torch.zeros(first.in_features, first.in_features, dtype=torch.float32, device=first.weight.device)
        self.n = 0.0
        self.weights = weights
        self.calls = 0
        self.handles = [m.register_forward_pre_hook(self) for m in modules]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        if self.weights is None:
            k, xw = float(x.shape[0]), x
        else:
            w = self.weights[self.calls].reshape(-1).to(x.device, torch.float32)
            k, xw = float(w.sum()), x * w[:, None]
        self.calls += 1
        if k == 0:
            return
        # in place: ``x.T @ x`` as a separate matrix would double the peak at 11008 inputs (0.5 GB each)
        self.h.addmm_(xw.T, x, beta=self.n / (self.n + k), alpha=1.0 / (self.n + k))
        self.n += k


def as_stored(result, dtype: torch.dtype = torch.float16):
    """The result with its scales (and BiLLM means) rounded to the dtype checkpoints store them in.

    The fake-quant weight is recomputed from the rounded values, so the in-memory model equals what a
    loader rebuilds from the exported checkpoint. GGUF K-grid results (``args['grid']``) are returned as
    they are: their d/dmin are fp16 and their sub-block scales integers already.
    """
    if result.args.get("grid") is not None:
        return result
    changes = {"scales": result.scales.to(dtype).to(result.scales.dtype)}
    if "means" in result.extra:
        means = result.extra["means"]
        changes["extra"] = {**result.extra, "means": means.to(dtype).to(means.dtype)}
    rounded = dataclasses.replace(result, **changes)
    return dataclasses.replace(rounded, dequantized=rounded.dequantize())


def quantize_module(name: str, module: nn.Linear, scheme: QuantScheme, hessian: torch.Tensor | None):

    check_shape(name, module, scheme)
    # The Hessian is this step's own accumulator: the solver may factor it in place instead of copying it
    result = as_stored(quantize_weight(module.weight.data, scheme, hessian=hessian, consume_hessian=True))
    shaped = {k: scheme.args[k] for k in HESSIAN_OPTIONS if k in scheme.args}
    if shaped:  # the solver never saw them; the result records how its Hessian was weighted
        result = dataclasses.replace(result, args={**result.args, **shaped})
    module.weight.data.copy_(result.dequantized)
    return result.to("cpu")  # results are exported from host memory, whatever device solved them
