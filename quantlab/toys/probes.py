"""Held-out probes of the decoder's lookup, for reading a training run's log (not used by the losses).

The hard toys' slow part is the decoder finding the object a question names among the image tokens. Two
numbers locate where that stalls: whether the binding heads can read the named object's other attribute
from the middle layer at the question word (``bind_acc``), and how much attention the best head of each
early layer puts from that word on the object's image token (``lookup_attn``; 1/number-of-tokens at chance).
"""

from __future__ import annotations

import torch
from torch import nn

from quantlab.models.inputs import encode_images
from quantlab.toys.aux_losses import cell_terms, object_tokens
from quantlab.toys.batches import Batchable, collate


@torch.no_grad()
def lookup_probes(model: nn.Module, data: Batchable, heads: nn.ModuleDict, bind_layer: int, pad_id: int,
                  image_token_id: int, grid: int, layers: int = 4, bs: int = 128) -> dict:
    """``bind_acc``: held-out accuracy of the binding head at ``bind_layer``; ``lookup_attn``: per decoder layer
    ``< layers``, the best head's mean attention from a colour/shape word to its object's image token."""
    was_training = model.training
    model.eval()
    impl = model.config.text_config._attn_implementation
    model.set_attn_implementation({"text_config": "eager"})  # sdpa returns no attention probabilities
    hits = total = 0
    mass = torch.zeros(layers, model.config.text_config.num_attention_heads)
    for lo in range(0, len(data.ids), bs):
        idx = torch.arange(lo, min(lo + bs, len(data.ids)))
        batch = collate(data, idx, pad_id, image_token_id)
        batch.pop("labels")
        out = model(**batch, output_hidden_states=True, output_attentions=True)
        for r, i in enumerate(idx.tolist()):
            t = data.word_targets[i]
            t = t[t[:, 1] > 0]
            if not len(t):
                continue
            h = out.hidden_states[bind_layer][r, t[:, 0]]
            hits += int((heads["bind_other"](h).argmax(-1) == t[:, 1]).sum())
            total += len(t)
            if grid == int(data.cell_color.shape[1] ** 0.5):
                key = object_tokens(batch["input_ids"][r], t, image_token_id, grid)
                for layer in range(layers):
                    mass[layer] += out.attentions[layer][r, :, t[:, 0], key].sum(-1)
    model.set_attn_implementation({"text_config": impl})
    model.train(was_training)
    best = (mass / max(1, total)).max(-1).values
    return {"bind_acc": round(hits / max(1, total), 3), "lookup_attn": [round(float(v), 3) for v in best]}


@torch.no_grad()
def cell_accuracy(model: nn.Module, data: Batchable, word_aux: nn.Module, heads: nn.ModuleDict,
                  captured: dict[str, torch.Tensor], pad_id: int, image_token_id: int, n: int = 256) -> dict:
    """Accuracy of the cell heads on the occupied cells of ``n`` held-out boards (colour, shape, characters):
    what the image tokens say about the objects, before the decoder reads them."""
    was_training = model.training
    model.eval()
    idx = torch.arange(min(n, len(data.ids)))
    encode_images(model, collate(data, idx, pad_id, image_token_id))
    width = captured["features"].shape[-1]
    terms = cell_terms(captured["features"].reshape(len(idx), -1, width).float(), data, idx, word_aux, heads)
    model.train(was_training)
    return {k: round(float((lg.argmax(-1)[y > 0] == y[y > 0]).float().mean()), 3)
            for k, (lg, y) in terms.items() if k in ("color", "shape", "chars")}
