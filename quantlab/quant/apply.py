"""Apply a plan: quantize every planned Linear, block by block, on the outputs of the quantized prefix.

For each decoder block the streaming executor hands over, Linears are processed in *true sequential*
order: Linears that read the same input (q/k/v, gate/up: the adapter's fused groups) form one step;
each step's Hessian ``H = mean(xᵀx)`` is gathered once, from a forward pass through the block whose earlier
sublayers are already quantized, stopped where the step's input is reached (the rest of the block does
not change it). The dequantized (fake-quant) weight replaces the original in place, so
the in-memory model evaluates as the quantized one; the packed :class:`QuantResult` is kept for export.
The quantized block's outputs feed the next block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from quantlab.calib.executor import CalibSample, stream_decoder
from quantlab.calib.weights import WeightSource
from quantlab.core.host_memory import heap_trimmer
from quantlab.core.progress import block_progress
from quantlab.models.adapter import Component
from quantlab.models.load import LoadedModel
from quantlab.quant import awq
from quantlab.quant.registry import (
    CALIBRATED,
    GRADIENT,
    MEASURED,
    component_problem,
    get_backend,
)
from quantlab.quant.results_io import BlockResults
from quantlab.quant.scheme import QuantScheme
from quantlab.quant.steps import HessianHook, quantize_module, sequential_steps
from quantlab.quant.vision import quantize_vision


def token_weights(samples: Sequence[CalibSample], image_weight: float,
                  importance: Mapping[str, torch.Tensor] | None = None) -> list[torch.Tensor] | None:
    """Per sample, each token's weight in the Hessian: ``image_weight`` on image tokens, 1 on text tokens, 0 on
    padding, times the token's gradient saliency when ``importance`` (sample id -> ``(seq,)``) is given; None
    when every token counts the same (the plain Hessian)."""
    if image_weight == 1.0 and importance is None:
        return None
    out = []
    for s in samples:
        w = torch.where(s.image_mask.reshape(-1).bool(), float(image_weight), 1.0) * s.valid_mask.float()
        if importance is not None:
            if s.id not in importance:
                raise ValueError(f"token_weight {GRADIENT!r}: no measured saliency for calibration sample {s.id!r}; "
                                 "calibrate on the same samples with token_importance")
            w = w * importance[s.id].reshape(-1).to(w.device, torch.float32)
        out.append(w)
    return out


def block_importance(token_importance: Mapping[int, Mapping[str, torch.Tensor]] | None, index: int,
                     by_gradient: bool) -> Mapping[str, torch.Tensor] | None:
    """Block ``index``'s token saliencies when a weighting asks for them (None otherwise)."""
    if not by_gradient:
        return None
    if not token_importance or index not in token_importance:
        raise ValueError(f"token_weight {GRADIENT!r}: no measured token saliency for decoder block {index}; "
                         "calibrate with token_importance on the same model and samples")
    return token_importance[index]


def weighting(scheme: QuantScheme) -> tuple[float, bool]:
    """How ``scheme``'s Hessian weighs tokens: ``(image_weight, by measured gradient saliency)``."""
    return image_weight(scheme), scheme.args.get("token_weight") == GRADIENT


def image_weight(scheme: QuantScheme) -> float:
    """The weight of image tokens in the Hessian ``scheme``'s backend is solved against (1.0: unweighted)."""
    w = scheme.args.get("image_weight", 1.0)
    if w == MEASURED:
        raise ValueError(f"{scheme.label()}: image_weight {MEASURED!r} is resolved to a number per block by the plan "
                         "stage (from calibration's gradient ratios); quantize with a plan made by make_plan")
    return float(w)


def _refold(block: nn.Module, prefix: str, pairs, saved: Mapping[str, object],
            planned: Mapping[str, QuantScheme]) -> None:
    """A resumed block: divide each AWQ producer by the scales its consumers' saved results record (of a
    quantized producer the bias only: its saved weight holds the fold already)."""
    for producer, consumers in pairs:
        s = next((saved[prefix + c].input_scales for c in consumers
                  if prefix + c in saved and saved[prefix + c].input_scales is not None), None)
        if s is not None:
            awq.divide_producer(block.get_submodule(producer), s, weight=prefix + producer not in planned)


def _light(result):
    """The result without its dense weight (exports need codes and scales only; ``dequantize()`` rebuilds it)."""
    return dataclasses.replace(result, dequantized=result.dequantized.new_empty(0))


def _planned_linears(model: nn.Module, plan: Mapping[str, QuantScheme | None]):
    modules = dict(model.named_modules())
    planned = {n: s for n, s in plan.items() if s is not None}
    unknown = [n for n in planned if not isinstance(modules.get(n), nn.Linear)]
    if unknown:
        raise KeyError(f"plan names modules that are not Linear layers of this model: {unknown[:5]}")
    return modules, planned


def _outside_decoder(loaded: LoadedModel, modules: Mapping[str, nn.Module], planned: Mapping[str, QuantScheme]
                     ) -> dict[str, object]:
    """Results of the planned data-free Linears outside the decoder (the calibrated vision/projector ones are
    :func:`_calibrated_vision`'s)."""
    results = {}
    for name, scheme in planned.items():
        component = loaded.adapter.component_of(name)
        if component == Component.DECODER or name in _calibrated_vision(loaded, planned):
            continue
        problem = component_problem(scheme, component)
        if problem is not None:
            raise ValueError(f"{name}: {problem}")
        results[name] = quantize_module(name, modules[name], scheme, None)
    return results


def _calibrated_vision(loaded: LoadedModel, planned: Mapping[str, QuantScheme]) -> dict[str, QuantScheme]:
    """The planned vision/projector Linears that need calibration data (quantlab.quant.vision): a backend that
    needs a Hessian, or AWQ's scale search."""
    out = {}
    for name, scheme in planned.items():
        component = loaded.adapter.component_of(name)
        if component in CALIBRATED and component != Component.DECODER and (
                get_backend(scheme.backend).needs_hessian or awq.wants_awq(scheme)):
            problem = component_problem(scheme, component)
            if problem is not None:
                raise ValueError(f"{name}: {problem}")
            out[name] = scheme
    return out


@torch.no_grad()
def saved_results(loaded: LoadedModel, plan: Mapping[str, QuantScheme | None],
                  reread_block: Callable[[int], Mapping[str, object]],
                  reread_scales: Callable[[int], Mapping[str, torch.Tensor]] | None = None) -> BlockResults:
    """A streamed model's results when every decoder block's are saved: read from disk when asked
    (``reread_block``), with no pass through the decoder (which :func:`quantize` would make to carry the
    activations from block to block). For an export that resumes after quantization finished."""
    modules, planned = _planned_linears(loaded.model, plan)
    if _calibrated_vision(loaded, planned):
        raise ValueError("saved_results: the plan quantizes vision/projector Linears with a calibrated backend, "
                         "whose results are not saved; quantize again (quantize())")
    resident = _outside_decoder(loaded, modules, planned)
    on_disk = {n: loaded.adapter.block_index(n) for n in planned if n not in resident}
    return BlockResults(resident, on_disk, reread_block, reread_scales)


@torch.no_grad()
def quantize(
    loaded: LoadedModel,
    plan: Mapping[str, QuantScheme | None],
    samples: Sequence[CalibSample],
    *,
    weights: WeightSource | None = None,
    progress: bool = True,
    load_block: Callable[[int], Mapping[str, object] | None] | None = None,
    save_block: Callable[[int, Mapping[str, object]], None] | None = None,
    reread_block: Callable[[int], Mapping[str, object]] | None = None,
    reread_scales: Callable[[int], Mapping[str, torch.Tensor]] | None = None,
    device: str | torch.device | None = None,
    token_importance: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
) -> Mapping[str, object]:
    """Quantize ``loaded.model`` in place by ``plan`` (module name -> scheme, None = keep).

    Decoder Linears are calibrated block by block on the outputs of the already-quantized blocks; before them,
    calibrated vision-tower and projector Linears on the image samples (:mod:`quantlab.quant.vision`); the
    head and embeddings accept data-free backends only.

    ``load_block(i)`` may return the saved results of block ``i`` (resume): they are written into the
    block instead of quantizing it again; ``save_block(i, results)`` is called after each block.
    ``device`` (e.g. ``"cuda"``): each decoder block, its Hessians and its solves are computed there.
    ``token_importance`` (block -> sample id -> ``(seq,)``, calibration's ``token_importance``): the token
    weights of schemes with ``token_weight: gradient``.

    With ``weights`` (a streamed model), each result drops its dense ``dequantized``
    copy once the block holds it (left as an empty tensor of its dtype; ``dequantize()`` rebuilds it): the results then hold codes
    and scales, not a second full-precision decoder. With ``reread_block`` as well (it reads block ``i``'s
    saved results back, without dense weights), a saved block keeps nothing in memory: the returned
    mapping is a :class:`~quantlab.quant.results_io.BlockResults` that reads each block when asked
    (``reread_scales(i)``, optional: block ``i``'s AWQ scales alone, for the export's folds).

    Returns:
        module name -> QuantResult (codes, scales, zeros, g_idx, bits per weight, relative output error).
    """
    adapter, model = loaded.adapter, loaded.model
    streamed = weights is not None
    modules, planned = _planned_linears(model, plan)
    if token_importance is None and any(s.args.get("token_weight") == GRADIENT for s in planned.values()):
        raise ValueError(f"token_weight {GRADIENT!r} weighs each token by its measured gradient saliency: pass "
                         "token_importance (calibrate with token_importance=True)")
    on_disk: dict[str, int] = {}  # module -> block, for blocks whose results were saved and dropped
    drop_saved = streamed and save_block is not None and reread_block is not None
    results: dict[str, object] = _outside_decoder(loaded, modules, planned)
    # the vision tower first: the decoder is then calibrated on the image embeddings it will see
    results.update(quantize_vision(loaded, _calibrated_vision(loaded, planned), samples, device=device))

    def stage(index: int, block: nn.Module, run) -> list[torch.Tensor]:
        prefix = f"{adapter.decoder_blocks}.{index}."
        names = [prefix + n for n, m in block.named_modules() if isinstance(m, nn.Linear) and prefix + n in planned]
        saved = load_block(index) if load_block is not None else None
        if saved is not None:
            _refold(block, prefix, adapter.scale_pairs, saved, planned)
            for n in names:
                modules[n].weight.data.copy_(saved[n].dequantized)
                if drop_saved:
                    on_disk[n] = index
                else:
                    results[n] = _light(saved[n]) if streamed else saved[n]
            return run()
        pairs = awq.block_pairs(adapter.scale_pairs, block, prefix, planned)
        scaled = {}
        if pairs:  # AWQ first, on the block still in full precision: its scales are folded in before any solve
            w, by_grad = weighting(planned[pairs[0][1][0]])
            valid = [smp.valid_mask for smp in samples]
            scaled = awq.search_block_scales(block, prefix, pairs, planned, run, valid,
                                             token_weights(samples, w, block_importance(token_importance, index,
                                                                                        by_grad)))
        for step in sequential_steps(names, adapter.fused_groups):
            linears = [modules[n] for n in step]
            # one Hessian per token weighting the step's schemes ask for (usually one: q/k/v share a scheme)
            weight_of = {n: weighting(planned[n]) for n in step}
            hooks = {(w, g): HessianHook(linears, token_weights(samples, w, block_importance(token_importance, index, g)))
                     for w, g in dict.fromkeys(weight_of.values())}
            try:
                run(until=linears)
            finally:
                for hook in hooks.values():
                    hook.remove()
            last_user = {w: n for n, w in weight_of.items()}  # dicts keep order: the last Linear of each weighting
            for n in step:
                w = weight_of[n]
                # each solve factors its Hessian in place: all but the last user of each get a copy
                hessian = hooks[w].h if last_user[w] == n else hooks[w].h.clone()
                result = quantize_module(n, modules[n], planned[n], hessian)
                if n in scaled:
                    alpha, s = scaled[n]
                    result = awq.with_scales(result, alpha, s)
                results[n] = _light(result) if streamed else result  # the block holds the dense weight
            del hooks, hessian, result
            trim()  # the solves' freed workspace goes back to the OS instead of staying in glibc's heap
        if save_block is not None:
            save_block(index, {n: results[n] for n in names})
        if drop_saved:
            for n in names:
                del results[n]
                on_disk[n] = index
        return run()

    trim = heap_trimmer()
    n_blocks = len(adapter.blocks(model))
    with block_progress("quantize: decoder blocks", n_blocks, progress) as advance:
        stream_decoder(loaded, samples, stage, weights=weights, on_block_done=advance, device=device)
    return BlockResults(results, on_disk, reread_block, reread_scales) if drop_saved else results
