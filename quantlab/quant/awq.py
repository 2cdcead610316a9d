"""AWQ's per-input-channel scales (Lin et al., "AWQ: Activation-aware Weight Quantization", arXiv 2306.00978):
the pure parts. The quantize stage's block search and export come on top (issue 17).

A Linear ``y = W x`` computes the same with ``W' = W diag(s)`` on ``x' = x / s``. AWQ picks ``s = m^α`` from
each input channel's mean ``|x|`` ``m`` (channels that carry large activations get their weights scaled up,
so rounding them costs relatively less), with ``α`` searched on a grid in [0, 1) by the quantized block's
output error; ``x / s`` is never computed: ``1 / s`` folds into whatever produces ``x`` (an RMSNorm's
weight, or the rows of the previous Linear), so the model stays an ordinary checkpoint of the same
architecture. Reference: ``mit-han-lab/llm-awq``, ``awq/quantize/auto_scale.py`` (``auto_scale_block``,
``scale_ln_fcs``, ``scale_fc_fc``).

In quantlab a scheme asks for AWQ with ``args: {awq: true}`` on a uniform-grid backend (rtn: AWQ then RTN;
gptq: AWQ then GPTQ). The quantize stage then, per decoder block and before quantizing it, searches each of
the adapter's scale pairs (``Adapter.scale_pairs``: a norm or Linear and the Linears that read its output)
and folds the chosen scales in (:func:`search_block_scales`); the consumers' results record theirs
(``QuantResult.input_scales``) so a resumed run folds the producer again. The loss is the whole block's
output error, each token weighted as the consumers' scheme weights it (``image_weight``: MBQ's modality
balance, docs/method.md), and the quantizer searched with is RTN at the consumer's scheme (as AutoAWQ does
before GPTQ too).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from quantlab.quant.api import quantize_weight
from quantlab.quant.scheme import QuantScheme

GRID = 20  # AWQ's n_grid: α in {0, 1/20, ..., 19/20}
OPTION = "awq"  # the scheme option (``args: {awq: true}``)


def wants_awq(scheme: QuantScheme | None) -> bool:
    """Whether ``scheme`` asks for AWQ's scales."""
    return scheme is not None and bool(scheme.args.get(OPTION, False))


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
    scale_consumers(consumers, s)


def scale_consumers(consumers: Sequence[nn.Linear], s: Tensor) -> None:
    """In place: the consumer half of :func:`fold_scales`, every consumer's input columns multiplied by ``s``."""
    s = s.to(torch.float32)
    with torch.no_grad():
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


def divide_producer(producer: nn.Module, s: Tensor, *, weight: bool = True) -> None:
    """In place: the producer half of :func:`fold_scales`, rounded to fp16 as checkpoints store it
    (:func:`fold_tensor`), so the model in memory computes what a loader rebuilds from the export (a folded
    norm is no longer an fp16 number). The quantize stage's fold, a resume's and a streamed export's are this
    one computation. ``weight=False``: the bias only (a quantized producer's weight comes from its codes,
    which hold the fold)."""
    for leaf in ("weight", "bias") if weight else ("bias",):
        t = getattr(producer, leaf, None)
        if t is not None:
            with torch.no_grad():
                t.copy_(fold_tensor(leaf, t, s))


def block_pairs(pairs: Sequence[tuple[str, Sequence[str]]], block: nn.Module, prefix: str,
                planned: Mapping[str, QuantScheme | None]) -> list[tuple[str, list[str]]]:
    """The scale pairs of one block where AWQ applies: ``(producer, consumers)`` as full module names, for the
    pairs whose consumers' schemes ask for it and whose shapes fold (v -> o only without grouped heads).
    A pair with a consumer kept in full precision is skipped: a kept Linear is exported from the checkpoint
    as it is, so its columns cannot carry the scales."""
    out = []
    for producer, consumers in pairs:
        names = [prefix + c for c in consumers]
        if not any(wants_awq(planned.get(n)) for n in names) or any(planned.get(n) is None for n in names):
            continue
        try:
            prod = block.get_submodule(producer)
            lins = [block.get_submodule(c) for c in consumers]
        except AttributeError:
            continue
        width = prod.out_features if isinstance(prod, nn.Linear) else prod.weight.shape[0]
        if all(isinstance(m, nn.Linear) and m.in_features == width for m in lins):
            out.append((prefix + producer, names))
    return out


def proxy_quantize(weight: Tensor, scheme: QuantScheme) -> Tensor:
    """What AWQ's search quantizes with: RTN at ``scheme``'s bits, group and symmetry (for either backend)."""
    rtn = QuantScheme(backend="rtn", bits=scheme.bits, group_size=scheme.group_size, sym=scheme.sym)
    return quantize_weight(weight, rtn).dequantized


def weighted_error(out: Sequence[Tensor], ref: Sequence[Tensor], token_weights: Sequence[Tensor]) -> float:
    """``Σ_t w_t ||out_t − ref_t||² / Σ_t w_t`` over every sample's tokens (w: 0 on padding)."""
    num, den = 0.0, 0.0
    for o, r, w in zip(out, ref, token_weights, strict=True):
        d = (o.float() - r.float()).reshape(-1, o.shape[-1]).pow(2).sum(-1)
        w = w.reshape(-1).to(d.device, torch.float32)
        num += float((d * w).sum())
        den += float(w.sum())
    return num / max(den, 1e-12)


def _input_absmean(linear: nn.Linear, run: Callable[..., list[Tensor]], valid: Sequence[Tensor]) -> Tensor:
    """Mean ``|x|`` per input channel of ``linear`` over every sample's non-padding tokens."""
    total = torch.zeros(linear.in_features, dtype=torch.float64)
    count = [0]
    calls = [0]

    def hook(_m: nn.Module, args: tuple) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1])
        keep = valid[calls[0]].reshape(-1).to(x.device)
        calls[0] += 1
        total.add_(x[keep].abs().sum(0).double().cpu())
        count[0] += int(keep.sum())

    handle = linear.register_forward_pre_hook(hook)
    try:
        run(until=[linear])
    finally:
        handle.remove()
    return (total / max(count[0], 1)).float()


def search_block_scales(block: nn.Module, prefix: str, pairs: Sequence[tuple[str, Sequence[str]]],
                        planned: Mapping[str, QuantScheme | None], run: Callable[..., list[Tensor]],
                        valid: Sequence[Tensor], token_weights: Sequence[Tensor] | None = None, grid: int = GRID
                        ) -> dict[str, tuple[float, Tensor]]:
    """AWQ on one decoder block, in place: for each pair (in order), the scales that minimise the block's
    weighted output error with the pair's consumers quantized (:func:`proxy_quantize`), folded into the
    producer and the consumers before the next pair is searched (as llm-awq's ``auto_scale_block``).

    ``pairs`` from :func:`block_pairs`; ``run``: the executor's block runner; ``valid`` / ``token_weights``:
    per sample, non-padding tokens and each token's weight in the loss (None: every valid token once).
    Returns consumer -> (α, scales).
    """
    def sub(name: str) -> nn.Module:
        return block.get_submodule(name.removeprefix(prefix))

    if token_weights is None:
        token_weights = [v.float() for v in valid]
    reference = run()
    found: dict[str, tuple[float, Tensor]] = {}
    for producer, consumers in pairs:
        lins = [sub(c) for c in consumers]
        originals = [lin.weight.data.clone() for lin in lins]
        absmean = _input_absmean(lins[0], run, valid)

        def loss(s: Tensor, lins=lins, originals=originals, consumers=consumers) -> float:
            try:
                for name, lin, w in zip(consumers, lins, originals, strict=True):
                    sd = s.to(w.device)
                    q = proxy_quantize((w.float() * sd).to(w.dtype), planned[name]).float()
                    lin.weight.data.copy_((q / sd).to(w.dtype))
                return weighted_error(run(), reference, token_weights)
            finally:
                for lin, w in zip(lins, originals, strict=True):
                    lin.weight.data.copy_(w)

        alpha, s, _ = search_alpha(absmean, loss, grid)
        scale_consumers(lins, s.to(originals[0].device))
        divide_producer(sub(producer), s)
        for c in consumers:
            found[c] = (alpha, s.cpu())
    return found


def with_scales(result, alpha: float, s: Tensor):
    """``result`` recording the AWQ scales its Linear was quantized under (its own copy: files refuse shared
    tensors), so an export or a resumed run can fold the producer again."""
    return dataclasses.replace(result, input_scales=s.clone(), args={**result.args, "awq": True, "awq_alpha": alpha})


def producer_folds(pairs: Sequence[tuple[str, Sequence[str]]], blocks_prefix: str,
                   input_scales: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Module -> the scales its checkpoint tensors must be divided by: every AWQ producer, from its consumers'
    recorded ``input_scales`` (module -> scales, of the results that have them). Of a quantized producer only
    the bias is read from the checkpoint (its codes hold the fold)."""
    consumer_of = {c: producer for producer, consumers in pairs for c in consumers}
    out: dict[str, Tensor] = {}
    for name, s in input_scales.items():
        head, _, leaf = name.removeprefix(blocks_prefix + ".").partition(".")
        producer = consumer_of.get(leaf)
        if producer is not None:
            out.setdefault(f"{blocks_prefix}.{head}.{producer}", s)
    return out


def fold_tensor(leaf: str, t: Tensor, s: Tensor) -> Tensor:
    """A producer's tensor divided by its scales (``leaf``: ``weight`` or ``bias``; a Linear's weight by rows),
    in float32, rounded to fp16 as checkpoints store it, back in its dtype: :func:`divide_producer` in memory
    and the streamed export on what it reads from the checkpoint."""
    s = s.to(t.device, torch.float32)
    div = s[:, None] if leaf == "weight" and t.dim() == 2 else s
    return (t.float() / div).to(torch.float16).to(t.dtype)
