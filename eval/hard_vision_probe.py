"""How fast a hard toy's vision tower + projector learn each cell's content alone (docs/hard-testbed.md "Status").

    python eval/hard_vision_probe.py --model toy-llava-hard --steps 500 --lr 1e-3 --batch-size 64

Trains the vision side only, on the per-cell colour, shape and label-character losses the training script
uses (no decoder pass), and prints every 100 steps the accuracy on the occupied cells of 256 held-out
calibration boards. Seeded; 8,000 training boards.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from quantlab.data.synthetic import SETS
from quantlab.models.adapter import ADAPTERS
from quantlab.toys import train as T
from quantlab.toys.build import TOYS, build_toy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="toy-llava-hard", choices=[n for n in TOYS if n.endswith("-hard")])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model, proc = build_toy(a.model)
    member = SETS.get(TOYS[a.model].size.dataset)
    data = T.prepare(proc, member, "train", 8000, bins=member.grid)
    held = T.prepare(proc, member, "calibration", 256, bins=member.grid)
    adapter = ADAPTERS[TOYS[a.model].model_type]
    image_token, pad = adapter.image_token_id(model.config), proc.tokenizer.pad_token_id
    width = model.config.text_config.hidden_size
    captured: dict[str, torch.Tensor] = {}
    adapter.get(model, adapter.projector).register_forward_hook(lambda m, i, o: captured.__setitem__("f", o))
    n_chars = 1 + len(member.alphabet)
    chars_head = nn.Linear(width, 2 * n_chars)
    words = T.WordAlignedHead(model, proc.tokenizer, width, member)
    params = [p for n, p in model.named_parameters() if not n.startswith(("model.language_model", "lm_head"))]
    params += list(chars_head.parameters()) + [words.empty, words.scale, model.get_input_embeddings().weight]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(0)

    def logits_and_targets(d: T.Batchable, idx: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        batch = T.collate(d, idx, pad, image_token)
        model.get_image_features(**{k: batch[k] for k in ("pixel_values", "image_grid_thw") if k in batch})
        feats = captured["f"].reshape(len(idx), -1, width)
        color, shape = words(feats)
        chars = chars_head(feats).reshape(len(idx), -1, 2, n_chars)
        return {"color": (color, d.cell_color[idx]), "shape": (shape, d.cell_shape[idx]),
                "chars": (chars, d.cell_chars[idx])}

    t0 = time.time()
    for step in range(a.steps):
        idx = torch.randint(0, len(data.ids), (a.batch_size,), generator=gen)
        loss = sum(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), y.flatten())
                   for lg, y in logits_and_targets(data, idx).values())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % 100 == 0:
            with torch.no_grad():
                acc = {k: round(float((lg.argmax(-1)[y > 0] == y[y > 0]).float().mean()), 3)
                       for k, (lg, y) in logits_and_targets(held, torch.arange(256)).items()}
            print(json.dumps({"step": step + 1, "loss": round(loss.item(), 3), "accuracy_on_occupied_cells": acc,
                              "seconds": round(time.time() - t0)}), flush=True)


if __name__ == "__main__":
    main()
