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
from quantlab.quant import awq, quantize_weight
from quantlab.quant.registry import GRADIENT, HESSIAN_OPTIONS, MEASURED, outside_decoder_problem
from quantlab.quant.results_io import BlockResults
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


def _quantize_module(name: str, module: nn.Linear, scheme: QuantScheme, hessian: torch.Tensor | None):

    check_shape(name, module, scheme)
    # The Hessian is this step's own accumulator: the solver may factor it in place instead of copying it
    result = as_stored(quantize_weight(module.weight.data, scheme, hessian=hessian, consume_hessian=True))
    shaped = {k: scheme.args[k] for k in HESSIAN_OPTIONS if k in scheme.args}
    if shaped:  # the solver never saw them; the result records how its Hessian was weighted
        result = dataclasses.replace(result, args={**result.args, **shaped})
    module.weight.data.copy_(result.dequantized)
    return result.to("cpu")  # results are exported from host memory, whatever device solved them


def _planned_linears(model: nn.Module, plan: Mapping[str, QuantScheme | None]):
    modules = dict(model.named_modules())
    planned = {n: s for n, s in plan.items() if s is not None}
    unknown = [n for n in planned if not isinstance(modules.get(n), nn.Linear)]
    if unknown:
        raise KeyError(f"plan names modules that are not Linear layers of this model: {unknown[:5]}")
    return modules, planned


def _outside_decoder(loaded: LoadedModel, modules: Mapping[str, nn.Module], planned: Mapping[str, QuantScheme]
                     ) -> dict[str, object]:
    """Results of the planned Linears outside the decoder (data-free backends only)."""
    results = {}
    for name, scheme in planned.items():
        if loaded.adapter.component_of(name) == Component.DECODER:
            continue
        problem = outside_decoder_problem(scheme)
        if problem is not None:
            raise ValueError(f"{name}: {problem}")
        results[name] = _quantize_module(name, modules[name], scheme, None)
    return results


@torch.no_grad()
def saved_results(loaded: LoadedModel, plan: Mapping[str, QuantScheme | None],
                  reread_block: Callable[[int], Mapping[str, object]],
                  reread_scales: Callable[[int], Mapping[str, torch.Tensor]] | None = None) -> BlockResults:
    """A streamed model's results when every decoder block's are saved: read from disk when asked
    (``reread_block``), with no pass through the decoder (which :func:`quantize` would make to carry the
    activations from block to block). For an export that resumes after quantization finished."""
    modules, planned = _planned_linears(loaded.model, plan)
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

    Decoder Linears are calibrated block by block on the outputs of the already-quantized blocks.
    Planned Linears outside the decoder (vision tower, projector, head) accept data-free backends only.

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
                result = _quantize_module(n, modules[n], planned[n], hessian)
                if n in scaled:
                    alpha, s = scaled[n]
                    result = dataclasses.replace(result, input_scales=s.clone(),  # own copy: files refuse shared ones
                                                 args={**result.args, "awq": True, "awq_alpha": alpha})
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
