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
from torch import nn

from quantlab.data.synthetic import SETS
from quantlab.models.adapter import ADAPTERS
from quantlab.models.inputs import encode_images
from quantlab.toys.aux_losses import (
    WordAlignedHead,
    cell_loss,
    cell_terms,
    vision_params,
)
from quantlab.toys.batches import Batchable, collate, prepare
from quantlab.toys.build import TOYS, build_toy

PROBED = ("color", "shape", "chars")  # the cell terms trained and reported (row/column are not)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="toy-llava-hard", choices=[n for n in TOYS if n.endswith("-hard")])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--balanced", action="store_true", help="occupied and empty cells weigh the same in the losses")
    ap.add_argument("--all-terms", action="store_true", help="train the row/column terms too, as training does")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model, proc = build_toy(a.model)
    member = SETS.get(TOYS[a.model].size.dataset)
    data = prepare(proc, member, "train", 8000, bins=member.grid)
    held = prepare(proc, member, "calibration", 256, bins=member.grid)
    adapter = ADAPTERS[TOYS[a.model].model_type]
    image_token, pad = adapter.image_token_id(model.config), proc.tokenizer.pad_token_id
    width = model.config.text_config.hidden_size
    captured: dict[str, torch.Tensor] = {}
    adapter.capture_image_features(model, captured, "f")
    heads = nn.ModuleDict({"row": nn.Linear(width, member.grid), "col": nn.Linear(width, member.grid)}
                          if TOYS[a.model].tower_positions else {})
    heads["chars"] = nn.Linear(width, 2 * (1 + len(member.alphabet)))
    words = WordAlignedHead(model, proc.tokenizer, width, member)
    params = vision_params(model, heads, words)
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(0)

    def probed_terms(d: Batchable, idx: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        encode_images(model, collate(d, idx, pad, image_token))
        terms = cell_terms(captured["f"].reshape(len(idx), -1, width), d, idx, words, heads)
        return terms if a.all_terms else {k: terms[k] for k in PROBED}

    t0 = time.time()
    for step in range(a.steps):
        idx = torch.randint(0, len(data.ids), (a.batch_size,), generator=gen)
        loss = cell_loss(probed_terms(data, idx), balanced=a.balanced)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % 100 == 0:
            with torch.no_grad():
                terms = probed_terms(held, torch.arange(256))
            # the probed terms on the occupied cells; row/column (all cells hold a position) on every cell
            acc = {k: round(float((lg.argmax(-1)[y > 0] == y[y > 0]).float().mean()), 3)
                   for k, (lg, y) in terms.items() if k in PROBED}
            acc |= {k: round(float((lg.argmax(-1) == y).float().mean()), 3)
                    for k, (lg, y) in terms.items() if k not in PROBED}
            print(json.dumps({"step": step + 1, "loss": round(loss.item(), 3), "accuracy_on_occupied_cells": acc,
                              "seconds": round(time.time() - t0)}), flush=True)

if __name__ == "__main__":
    main()
