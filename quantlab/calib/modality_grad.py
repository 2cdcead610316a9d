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
from collections.abc import Sequence

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


def block_gradient_ratios(loaded: LoadedModel, samples: Sequence[CalibSample]) -> list[float]:
    """Per decoder block, ``mean|∂L/∂h_image| / mean|∂L/∂h_text|`` of the block's output ``h``, averaged per
    sample as MBQ does (samples without both image and text tokens are skipped). Only activations get
    gradients (no weight's ``.grad`` is allocated); the model is left as it was."""
    model, adapter = loaded.model, loaded.adapter
    blocks = adapter.blocks(model, Component.DECODER)
    sums = torch.zeros(len(blocks), 2, dtype=torch.float64)
    counted = 0
    grads: dict[int, torch.Tensor] = {}

    def start_graph(module, args, kwargs):
        # weights do not require grad here, so the graph starts at the first block's input
        if args:
            return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach().requires_grad_(True)}

    def keep(i: int):
        def hook(module, args, out):
            h = out[0] if isinstance(out, (tuple, list)) else out
            h.register_hook(lambda g: grads.__setitem__(i, g.detach()))
        return hook

    flags = {p: p.requires_grad for p in model.parameters()}
    handles = [blocks[0].register_forward_pre_hook(start_graph, with_kwargs=True)]
    handles += [b.register_forward_hook(keep(i)) for i, b in enumerate(blocks)]
    was_training = model.training
    model.eval()
    try:
        for p in flags:
            p.requires_grad_(False)
        for s in samples:
            image = s.image_mask.reshape(-1).bool()
            if not bool(image.any()) or bool(image.all()):
                continue
            if hasattr(getattr(model, "model", None), "rope_deltas"):
                model.model.rope_deltas = None  # Qwen caches mrope offsets between calls
            with torch.enable_grad():
                logits = model(**s.inputs, use_cache=False).logits
                text_loss(logits, s).backward()
            missing = [i for i in range(len(blocks)) if i not in grads]
            if missing:
                raise RuntimeError(f"decoder blocks {missing} received no gradient")
            for i in range(len(blocks)):
                g = grads.pop(i)
                g = g.reshape(-1, g.shape[-1]).abs().float()
                sums[i, 0] += float(g[image].mean())
                sums[i, 1] += float(g[~image].mean())
            counted += 1
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    if not counted:
        raise ValueError("modality sensitivity needs calibration samples with image and text tokens; none given")
    return [float(a / b) if b > 0 else 1.0 for a, b in sums.tolist()]


def median_floor(ratios: Sequence[float]) -> list[float]:
    """MBQ's rule: each block's ratio, floored at the median over blocks (no block's image tokens are
    weighted below the typical block's)."""
    m = statistics.median(ratios)
    return [max(r, m) for r in ratios]
