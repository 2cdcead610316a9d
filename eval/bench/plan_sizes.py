"""Stored size of the three target VLMs under a few plans, from meta-device skeletons (no weights).

Usage: ``.venv/bin/python eval/bench/plan_sizes.py [--configs DIR]``

Plans (decoder Linears only; vision tower, projector, embeddings, norms and lm_head stay in the model dtype):
  fp16         nothing quantized
  W4 g128      every decoder Linear 4-bit, group 128, symmetric, compressed-tensors pack-quantized
  W2 g64       every decoder Linear 2-bit, group 64, symmetric, compressed-tensors pack-quantized
  LUQ half     half the decoder blocks BiLLM (quantlab native layout, see cost.billm_layout), rest W4 g128;
               which half does not change the bytes (all blocks have the same shapes)

Columns: GB = 1e9 bytes, GiB = 2^30 bytes; "bits" = exact stored bits per decoder Linear weight (scales,
zero points, bitmaps included, bias excluded); "nominal" = LUQ's sum(bits·numel)/numel with BiLLM = 1.08.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from quantlab.models import load_model
from quantlab.models.adapter import Component
from quantlab.plan.context import activation_bytes, image_tokens, kv_cache_bytes
from quantlab.plan.cost import model_size
from quantlab.quant.scheme import QuantScheme

CONFIGS = Path(__file__).resolve().parents[2].parent / "shared" / "configs"
MODELS = ("llava-1.5-7b-hf", "qwen2.5-vl-7b-instruct", "qwen2.5-vl-3b-instruct")
W4 = QuantScheme(backend="gptq", bits=4, group_size=128)
W2 = QuantScheme(backend="gptq", bits=2, group_size=64)
BILLM = QuantScheme(backend="billm", bits=1, group_size=128)


def plans(lm) -> dict[str, tuple[dict, str]]:
    """Plan name -> (mapping, format) for one skeleton."""
    names = [n for n, _ in lm.adapter.iter_linears(lm.model, Component.DECODER)]
    half = len(lm.adapter.blocks(lm.model)) // 2
    return {
        "fp16": ({}, "compressed-tensors"),
        "W4 g128": ({n: W4 for n in names}, "compressed-tensors"),
        "W2 g64": ({n: W2 for n in names}, "compressed-tensors"),
        "LUQ half BiLLM": ({n: BILLM if lm.adapter.block_index(n) < half else W4 for n in names}, "native"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", type=Path, default=CONFIGS)
    args = ap.parse_args()
    print(f"{'model':<24} {'plan':<16} {'format':<19} {'GB':>7} {'GiB':>7} {'bits':>6} {'nominal':>7} "
          f"{'decoder GB':>10}")
    ctx = []
    for name in MODELS:
        lm = load_model(args.configs / f"{name}.json", weights=False)
        for plan, (mapping, fmt) in plans(lm).items():
            r = model_size(lm.model, lm.adapter, mapping, fmt)
            print(f"{name:<24} {plan:<16} {fmt:<19} {r.total_bytes / 1e9:>7.3f} {r.gib:>7.3f} {r.avg_bits:>6.3f} "
                  f"{r.nominal_bits:>7.3f} {r.decoder_block_bytes / 1e9:>10.3f}")
        cfg = lm.model.config
        for k in (1, 8):
            kv = kv_cache_bytes(cfg, images=k, text_tokens=1024)
            act = activation_bytes(cfg, images=k, text_tokens=1024)
            ctx.append(f"{name:<24} {k:>6} {k * image_tokens(cfg):>10} {kv / 1e9:>7.3f} {act / 1e9:>8.3f}")
    print("\ncontext beside the weights: K images + 1024 text tokens, batch 1, fp16 KV "
          "(Qwen images 448x448; activations are a rough SDPA prefill estimate)")
    print(f"{'model':<24} {'images':>6} {'img tokens':>10} {'KV GB':>7} {'act GB':>8}")
    print("\n".join(ctx))


if __name__ == "__main__":
    main()
