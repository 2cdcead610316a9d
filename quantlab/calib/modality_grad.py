"""MBQ's modality sensitivity: how strongly the language-model loss reacts to each block's image vs text tokens.

MBQ (Li et al., arXiv 2412.19509, §3; code ``thu-nics/MBQ``, ``qmllm/methods/mbq/quantize/pre_quant.py``)
backpropagates the model's language-model loss over calibration samples, averages the absolute gradient of
each layer's output over the vision tokens and over the text tokens, and uses the ratio (vision / text) as
the weight of the vision tokens' reconstruction error when it quantizes that layer; it floors each ratio at
the median over layers. Language tokens come out far more sensitive (ratios well below 1 on LLaVA and
Qwen2-VL), which is why an objective that counts every token the same over-serves the image tokens.

quantlab measures the ratio on each decoder block's output hidden state (one number per block, used by
every Linear of the block as its Hessians' ``image_weight``); the loss is next-token cross-entropy on every
text token of the calibration samples (image positions are not predicted). This needs one backward pass
per sample through the whole model: in-memory models only.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from quantlab.calib.executor import CalibSample
from quantlab.models.adapter import Component
from quantlab.models.load import LoadedModel


def text_loss(logits: torch.Tensor, sample: CalibSample) -> torch.Tensor:
    """Mean next-token cross-entropy of ``logits`` ``(1, seq, vocab)`` on the sample's text tokens."""
    ids = sample.inputs["input_ids"].reshape(-1)
    keep = ~sample.image_mask.reshape(-1).bool() & sample.valid_mask
    target = keep[1:]  # position p predicts token p + 1
    if not bool(target.any()):
        return logits.sum() * 0
    return F.cross_entropy(logits[0, :-1][target].float(), ids[1:][target])


def _backward_per_sample(loaded: LoadedModel, samples: Sequence[CalibSample],
                         visit: Callable[[CalibSample, list[torch.Tensor]], None]) -> None:
    """One forward and backward of the text tokens' loss per sample; ``visit(sample, grads)`` gets ``∂L/∂h`` at
    the first block's input (``grads[0]``) and at each block's output (``grads[i + 1]``), ``(seq, hidden)``.
    Only activations get gradients (no weight's ``.grad`` is allocated); the model is left as it was."""
    model, adapter = loaded.model, loaded.adapter
    blocks = adapter.blocks(model, Component.DECODER)
    grads: dict[int, torch.Tensor] = {}

    def keep(i: int, h: torch.Tensor) -> None:
        h.register_hook(lambda g: grads.__setitem__(i, g.detach()))

    def start_graph(module, args, kwargs):
        # weights do not require grad here, so the graph starts at the first block's input
        if args:
            h = args[0].detach().requires_grad_(True)
            keep(0, h)
            return (h, *args[1:]), kwargs
        h = kwargs["hidden_states"].detach().requires_grad_(True)
        keep(0, h)
        return args, {**kwargs, "hidden_states": h}

    def output(i: int):
        def hook(module, args, out):
            keep(i + 1, out[0] if isinstance(out, (tuple, list)) else out)
        return hook

    flags = {p: p.requires_grad for p in model.parameters()}
    handles = [blocks[0].register_forward_pre_hook(start_graph, with_kwargs=True)]
    handles += [b.register_forward_hook(output(i)) for i, b in enumerate(blocks)]
    was_training = model.training
    model.eval()
    try:
        for p in flags:
            p.requires_grad_(False)
        for s in samples:
            if hasattr(getattr(model, "model", None), "rope_deltas"):
                model.model.rope_deltas = None  # Qwen caches mrope offsets between calls
            with torch.enable_grad():
                logits = model(**s.inputs, use_cache=False).logits
                loss = text_loss(logits, s)
                if not loss.requires_grad:  # no text token to predict: nothing flows back
                    continue
                loss.backward()
            missing = [i for i in range(len(blocks) + 1) if i not in grads]
            if missing:
                raise RuntimeError(f"decoder block inputs/outputs {missing} received no gradient")
            visit(s, [grads.pop(i) for i in range(len(blocks) + 1)])
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)


def block_gradient_ratios(loaded: LoadedModel, samples: Sequence[CalibSample]) -> list[float]:
    """Per decoder block, ``mean|∂L/∂h_image| / mean|∂L/∂h_text|`` of the block's output ``h``, averaged per
    sample as MBQ does (samples without both image and text tokens are skipped)."""
    n_blocks = len(loaded.adapter.blocks(loaded.model, Component.DECODER))
    sums = torch.zeros(n_blocks, 2, dtype=torch.float64)
    counted = [0]

    def visit(s: CalibSample, grads: list[torch.Tensor]) -> None:
        image = s.image_mask.reshape(-1).bool()
        for i in range(n_blocks):
            g = grads[i + 1].reshape(-1, grads[i + 1].shape[-1]).abs().float()
            sums[i, 0] += float(g[image].mean())
            sums[i, 1] += float(g[~image].mean())
        counted[0] += 1

    both = [s for s in samples if bool(s.image_mask.any()) and not bool(s.image_mask.all())]
    _backward_per_sample(loaded, both, visit)
    if not counted[0]:
        raise ValueError("modality sensitivity needs calibration samples with image and text tokens; none given")
    return [float(a / b) if b > 0 else 1.0 for a, b in sums.tolist()]


def token_importance(loaded: LoadedModel, samples: Sequence[CalibSample]) -> dict[int, dict[str, torch.Tensor]]:
    """Per decoder block and sample, each token's gradient saliency at the block's **input** (what its Linears
    read): ``mean_c |∂L/∂x_{t,c}|``, 0 on padding, divided by its mean over the sample's valid tokens (so a
    sample's tokens average 1, as in the plain Hessian). Samples with no text token to predict get 1 on every
    valid token. The VLMQ-style token weights of the Hessians (``token_weight: gradient``, docs/method.md).

    Returns ``{block: {sample id: (seq,) float32}}``.
    """
    n_blocks = len(loaded.adapter.blocks(loaded.model, Component.DECODER))
    out: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(n_blocks)}

    def visit(s: CalibSample, grads: list[torch.Tensor]) -> None:
        valid = s.valid_mask.reshape(-1).float()
        for i in range(n_blocks):  # block i reads the first block's input (i = 0) or block i-1's output
            g = grads[i].reshape(-1, grads[i].shape[-1]).abs().float().mean(-1) * valid
            mean = g.sum() / valid.sum().clamp(min=1)
            out[i][s.id] = (g / mean if mean > 0 else valid).cpu()

    _backward_per_sample(loaded, samples, visit)
    for s in samples:  # nothing to predict: the plain weighting
        for i in range(n_blocks):
            out[i].setdefault(s.id, s.valid_mask.reshape(-1).float().cpu())
    return out


def median_floor(ratios: Sequence[float]) -> list[float]:
    """MBQ's rule: each block's ratio, floored at the median over blocks (no block's image tokens are
    weighted below the typical block's)."""
    m = statistics.median(ratios)
    return [max(r, m) for r in ratios]
