"""Does RTN cost the hard toys' decoder more the longer it trains? (docs/hard-testbed.md, "undertrained")

    python eval/hard_qid_tokens.py --steps 2000 --eval-at 62 125 250 500 1000 2000 --out X.json

The decoder of ``toy-llava-hard`` (its Llama config: 8 blocks, width 256, MLP 768, 6.8M decoder-Linear
weights) trained from scratch as a language model on the Python standard library's top-level source files
(read in name order, the toy's own tokenizer; the last 200,000 tokens held out), AdamW at a constant
learning rate after 50 warm-up steps so checkpoints are comparable. At each ``--eval-at`` step: the
held-out loss at full precision and its increase with every decoder Linear at RTN W4 g128, W3 g128 and
W2 g64 (asymmetric min-max grids; the quantization-induced degradation, QiD, of Ouyang et al., arXiv 2411.17691, who find it grows
with training tokens per parameter), and the tokens seen so far. Seeded; the source text is this machine's
Python (3.11.7 here).
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hard_margins import rtn_copy

from quantlab.toys.build import build_toy

SCHEMES = ((4, 128), (3, 128), (2, 64))
HELD_TOKENS = 200_000


def source_tokens(tokenizer, chars: int = 12_000_000) -> torch.Tensor:
    """The standard library's top-level ``*.py`` files, concatenated in name order, tokenized."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    text = "".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    return torch.tensor(tokenizer(text[:chars], add_special_tokens=False)["input_ids"], dtype=torch.long)


@torch.no_grad()
def mean_loss(model: torch.nn.Module, seqs: torch.Tensor, bs: int = 32) -> float:
    model.eval()
    total = sum(model(input_ids=seqs[lo:lo + bs], labels=seqs[lo:lo + bs]).loss.item() * len(seqs[lo:lo + bs])
                for lo in range(0, len(seqs), bs))
    model.train()
    return total / len(seqs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--bs", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-at", type=int, nargs="+", default=[62, 125, 250, 500, 1000, 2000])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    vlm, processor = build_toy("toy-llava-hard", seed=0)
    model = LlamaForCausalLM(vlm.config.text_config)
    ids = source_tokens(processor.tokenizer)
    train_ids, held_ids = ids[:-HELD_TOKENS], ids[-HELD_TOKENS:]
    held = held_ids[: (len(held_ids) // a.seq) * a.seq].reshape(-1, a.seq)[:128]
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    gen = torch.Generator().manual_seed(0)
    t0, log = time.time(), []
    params = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n)
    for step in range(1, a.steps + 1):
        starts = torch.randint(0, len(train_ids) - a.seq - 1, (a.bs,), generator=gen)
        x = torch.stack([train_ids[s:s + a.seq] for s in starts.tolist()])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step in a.eval_at:
            fp = mean_loss(model, held)
            entry = {"step": step, "tokens": step * a.bs * a.seq, "tokens_per_param": round(step * a.bs * a.seq / params, 3),
                     "seconds": round(time.time() - t0), "fp_loss": round(fp, 4)}
            for bits, group in SCHEMES:
                quant = rtn_copy(model, list(model.model.layers), bits, group, sym=False)
                entry[f"qid_w{bits}g{group}"] = round(mean_loss(quant, held) - fp, 4)
            log.append(entry)
            print(json.dumps(entry), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "decoder_linear_params": params,
                                 "tokens_available": len(train_ids), "log": log}, indent=2) + "\n")


if __name__ == "__main__":
    main()
