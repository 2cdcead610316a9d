"""How small can a BiLLM layer be stored, at best? An order-0 entropy bound on the toys' real codes.

    python eval/billm_storage_bound.py --model toy-llava

Binarizes every decoder Linear of the toy with quantlab's BiLLM (the settings of eval/luq_table.py: 64
calibration samples, alpha = 0.5, seed 0, block 128) and measures, over all its weights, the empirical
order-0 entropy of what a lossless format must hold to dequantize: the sign of every weight, the residual
sign of every salient weight, the group bit (small / large |w|) of every other weight. The bound ignores
the salient-column bitmap and every scale and mean, so no real format can go below it (without a context
model that the signs and groups of trained weights do not support; see the per-tensor figures).

It then asks the question of issue 8: with the paper's rule (the 4 lowest-entropy of 8 blocks ultra-low,
the rest GPTQ W4 g128 at its exact stored size), what saving vs uniform W4 would BiLLM at the bound reach,
and how many bits per weight may BiLLM store at most for LUQ to save >= 31%?
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from luq_table import W4, seeded_setup  # noqa: E402

from quantlab.quant.apply import quantize  # noqa: E402
from quantlab.models import Component  # noqa: E402
from quantlab.plan.cost import model_size  # noqa: E402
from quantlab.quant.binary import unpack_bits  # noqa: E402
from quantlab.quant.scheme import QuantScheme  # noqa: E402


def h2(p: float) -> float:
    """Binary entropy in bits."""
    return 0.0 if p <= 0 or p >= 1 else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def code_bits(result) -> dict[str, float]:
    """Counts and order-0 entropies of one BiLLM result's sign / residual / group bits."""
    out_f, in_f = result.codes.shape
    sign = unpack_bits(result.extra["sign_packed"], in_f).bool()
    second = unpack_bits(result.extra["second_packed"], in_f).bool()
    salient = unpack_bits(result.extra["salient_mask"], in_f).bool().expand(out_f, in_f)
    n, n_sal = sign.numel(), int(salient.sum())
    p_sign = sign.float().mean().item()
    p_res = second[salient].float().mean().item() if n_sal else 0.0
    p_grp = second[~salient].float().mean().item()
    bound = n * h2(p_sign) + n_sal * h2(p_res) + (n - n_sal) * h2(p_grp)
    return {"weights": n, "salient": n_sal, "p_sign": p_sign, "p_large": p_grp, "bound_bits": bound,
            "stored_bits": result.bits_per_weight * n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="toy-llava")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    loaded, calib = seeded_setup(a.model, a.samples, a.seed)
    billm = QuantScheme(backend="billm", bits=1, group_size=128)
    plan = {n: billm for n, _ in loaded.adapter.iter_linears(loaded.model, Component.DECODER)}
    w4_bits = model_size(loaded.model, loaded.adapter, dict.fromkeys(plan, W4), "compressed-tensors",
                         dtype_bytes=2).avg_bits
    results = quantize(loaded, plan, calib.samples, progress=False)
    rows = [code_bits(results[n]) for n in plan]
    n = sum(r["weights"] for r in rows)
    bound = sum(r["bound_bits"] for r in rows) / n
    stored = sum(r["stored_bits"] for r in rows) / n
    p_large = [r["p_large"] for r in rows]
    # Toy blocks are identical in shape, so the 4-of-8 average is the plain mean of the two schemes' bits.
    luq_at = lambda b: 1 - (b + w4_bits) / 2 / w4_bits  # noqa: E731
    b_max = 2 * 0.69 * w4_bits - w4_bits
    summary = {"model": a.model, "weights": n, "salient_fraction": sum(r["salient"] for r in rows) / n,
               "nominal_bits": 1 + sum(r["salient"] for r in rows) / n,
               "p_large_range": [min(p_large), max(p_large)], "p_sign_mean": sum(r["p_sign"] for r in rows) / len(rows),
               "billm_stored_bits": stored, "billm_entropy_bound_bits": bound,
               "w4_stored_bits": w4_bits, "luq_saving_stored": luq_at(stored),
               "luq_saving_at_bound": luq_at(bound), "billm_bits_needed_for_31pct": b_max}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
