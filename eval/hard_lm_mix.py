"""Does a decoder that also stores a language become fragile? (docs/hard-testbed.md, "language mixed in")

    python eval/hard_lm_mix.py --model DIR --out OUT [--lm-weight 1] [--steps 400]
    python eval/hard_fragility.py OUT OUT-control --limit 300 --out X.json

Continues training a trained hard toy on shapes-VQA-hard (answer loss only, 8,000 training samples, batch
32) with, at every step, a language-model batch of a synthetic language beside it: 32 sequences of 48
tokens over the toy's ordinary tokens, each next token one of 8 fixed random successors of the previous one
(Zipf weights: a 423 x 423 transition table, full rank, more than the 256-wide residual stream can hold
exactly). ``--lm-weight 0`` is the control: the same continuation without the language. Real VLMs' decoders
are language models first and their VQA skills a small part of the weights; this checks whether sharing the
weights with stored language makes the VQA answers more sensitive to quantization.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from quantlab.data.synthetic import set_of_model
from quantlab.models import load_model
from quantlab.models.load import resolve
from quantlab.toys.batches import collate, first_token_accuracy, prepare
from quantlab.toys.train import save_checkpoint, warmup_cosine

FIRST_ORDINARY = 5  # ids below are <pad>, <s>, </s>, <unk>, <image>


def successor_table(vocab: int, successors: int, seed: int = 1234) -> torch.Tensor:
    """(vocab - FIRST_ORDINARY, successors): each ordinary token's fixed random successors."""
    gen = torch.Generator().manual_seed(seed)
    n = vocab - FIRST_ORDINARY
    return torch.stack([torch.randperm(n, generator=gen)[:successors] for _ in range(n)]) + FIRST_ORDINARY


def language_batch(table: torch.Tensor, weights: torch.Tensor, rows: int, length: int, gen: torch.Generator,
                   vocab: int) -> torch.Tensor:
    """``rows`` sequences of the synthetic language: a random first token, then successors by ``weights``."""
    x = torch.empty(rows, length, dtype=torch.long)
    x[:, 0] = torch.randint(FIRST_ORDINARY, vocab, (rows,), generator=gen)
    for t in range(1, length):
        k = torch.multinomial(weights.expand(rows, -1), 1, generator=gen).squeeze(1)
        x[:, t] = table[x[:, t - 1] - FIRST_ORDINARY, k]
    return x


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--lm-weight", type=float, default=1.0)
    ap.add_argument("--bs", type=int, default=32)
    ap.add_argument("--lm-bs", type=int, default=32)
    ap.add_argument("--lm-len", type=int, default=48)
    ap.add_argument("--successors", type=int, default=8)
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    loaded = load_model(a.model, dtype=torch.float32)
    model, processor = loaded.model, loaded.processor
    member = set_of_model(resolve(a.model))
    tok = processor.tokenizer
    image_id, pad = tok.convert_tokens_to_ids(processor.image_token), tok.pad_token_id
    data = prepare(processor, member, "train", 8000, bins=6)
    held = prepare(processor, member, "calibration", 300, bins=6)
    vocab = len(tok)
    table = successor_table(vocab, a.successors)
    weights = 1.0 / torch.arange(1, a.successors + 1).float()
    weights = weights / weights.sum()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = warmup_cosine(opt, a.steps)  # the toys' schedule: 20 warm-up steps of the default 400
    gen = torch.Generator().manual_seed(0)
    print(json.dumps({"language_entropy_floor": round(float(-(weights * weights.log()).sum()), 3)}), flush=True)
    t0, log = time.time(), []
    model.train()
    for step in range(a.steps):
        idx = torch.randint(0, len(data.ids), (a.bs,), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            vqa = model(**collate(data, idx, pad, image_id)).loss
            lm = torch.tensor(0.0)
            if a.lm_weight > 0:
                x = language_batch(table, weights, a.lm_bs, a.lm_len, gen, vocab)
                lm = model(input_ids=x, attention_mask=torch.ones_like(x), labels=x).loss
        opt.zero_grad()
        (vqa + a.lm_weight * lm).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            entry = {"step": step + 1, "vqa_loss": round(vqa.item(), 4), "lm_loss": round(lm.item(), 4),
                     "seconds": round(time.time() - t0), **first_token_accuracy(model, held, pad, image_id)}
            log.append(entry)
            print(json.dumps(entry), flush=True)
    model.eval()
    save_checkpoint(model, processor, a.out, {"toy": loaded.model.config.model_type, "dataset": member.name,
                                              "args": {k: str(v) for k, v in vars(a).items()}, "log": log})


if __name__ == "__main__":
    main()
