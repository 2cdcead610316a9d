"""Does LUQ's order matter? Equal memory, different choices of which blocks go ultra-low.

    python eval/luq_orders.py --model toy-llava --out eval/results/orders-toy-llava.json
    python eval/luq_orders.py --model toy-llava-hard --low w2g64 --out eval/results/orders-toy-llava-hard.json

At the size of LUQ's plan with half the decoder blocks ultra-low (k = n_blocks / 2; BiLLM by default,
``--low w2g64`` for GPTQ W2 g64), the rest GPTQ W4 g128, compare which blocks are ultra-low:
LUQ's rule (lowest k-means entropy first), the reverse (highest first), three seeded random orders,
and quantlab's budget planner (measured KL sensitivity + MILP over GPTQ 2/3/4/8-bit) given the same
whole-model bytes. Every row: accuracy on the model's task (500 test items, greedy exact match), POPE F1
on the exist questions, the logit KL to the fp model on 64 held-out image+text samples, and a paired test
against LUQ's row over the same items. All blocks of a toy have the same shapes, so every order costs
exactly the same bytes.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from luq_table import (  # noqa: E402
    BUDGET_CANDIDATES,
    KEEP,
    W4,
    evaluate_row,
    held_out,
    paired_cell,
    seeded_setup,
    sizes,
    task_of,
    versus,
)

from quantlab.calib.collect import calibrate  # noqa: E402
from quantlab.eval.runner import evaluate  # noqa: E402
from quantlab.models import Component  # noqa: E402
from quantlab.plan import planners  # noqa: E402
from quantlab.plan.plan import Plan  # noqa: E402
from quantlab.plan.sensitivity import _log_probs, kl_damage  # noqa: E402
from quantlab.quant.apply import quantize  # noqa: E402
from quantlab.quant.scheme import QuantScheme  # noqa: E402
from quantlab.recipe import PlanSpec  # noqa: E402

LOWS = {"billm": (QuantScheme(backend="billm", bits=1, group_size=128), "native"),
        "w2g64": (QuantScheme(backend="gptq", bits=2, group_size=64), "compressed-tensors")}


def order_row(name: str, base, samples, order: list[int], k: int, low: QuantScheme, fmt: str, *, limit: int,
              held, task: str) -> dict:
    """Quantize a copy of ``base`` with blocks ``order[:k]`` at ``low`` and the rest at W4; evaluate it."""
    loaded = copy.deepcopy(base)
    adapter = loaded.adapter
    lows = set(order[:k])
    mapping = {n: (low if adapter.block_index(n) in lows else W4)
               for n, _ in adapter.iter_linears(loaded.model, Component.DECODER)}
    quantize(loaded, mapping, samples, progress=False)
    r = evaluate(loaded, [task], data_dir=None, limit=limit, batch_size=64).tasks[task]
    plan = Plan(model=base.source, format=fmt, planner="hand", layers=mapping, predicted_bytes=0)
    return {"row": name, "low_blocks": sorted(lows), "accuracy": r.score,
            "per_type": {t: s.score for t, s in r.per_type.items()},
            "exist_f1": r.aggregates.get("exist", {}).get("f1"), "item_scores": r.item_scores,
            "kl_to_fp": kl_damage(held[1], _log_probs(loaded, held[0])), **sizes(base, plan, fmt)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="toy-llava")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--low", choices=sorted(LOWS), default="billm")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    low, fmt = LOWS[a.low]
    task = task_of(a.model)[0]
    base, calib = seeded_setup(a.model, a.samples, a.seed)
    stats = calibrate(base, calib, hessians=True, progress=False)
    held = held_out(base, a.model, a.seed)
    entropy = stats.block_entropy("all")
    luq = planners.luq_order(entropy)
    k = len(luq) // 2
    orders = {"LUQ: lowest entropy first": luq, "reversed: highest entropy first": luq[::-1]}
    for s in (1, 2, 3):
        orders[f"random order (seed {s})"] = random.Random(s).sample(luq, len(luq))
    table = []
    for name, order in orders.items():
        table.append(order_row(name, base, calib.samples, order, k, low, fmt, limit=a.limit, held=held, task=task))
    bud = evaluate_row("quantlab budget @ same bytes", base, calib.samples, stats,
                       PlanSpec(planner="budget", candidates=BUDGET_CANDIDATES, rules=KEEP), limit=a.limit,
                       budget_bytes=table[0]["model_bytes"], held=held, task=task)
    bplan = bud.pop("plan")
    bud.update(sizes(base, bplan, bud["format"]))
    table.append(bud)
    for r in table[1:]:
        r["vs_luq"] = versus(table[0]["item_scores"], r["item_scores"])  # this row - LUQ's, same items
    for r in table:
        print(json.dumps({k: v for k, v in r.items() if k != "item_scores"}), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"model": a.model, "low": a.low, "k": k, "entropy_all": entropy, "luq_order": luq,
                                 "samples": a.samples, "limit": a.limit, "seed": a.seed, "rows": table}, indent=2) + "\n")
    a.out.with_suffix(".md").write_text(markdown(a.model, a.low, k, len(luq), entropy, table))
    print(markdown(a.model, a.low, k, len(luq), entropy, table))


def markdown(model: str, low: str, k: int, n: int, entropy: dict, table: list[dict]) -> str:
    ent = ", ".join(f"{b}: {entropy[b]:.3f}" for b in sorted(entropy))
    lines = [f"### {model}: {k} of {n} blocks at {low}, the rest GPTQ W4 g128", "",
             f"k-means entropy (all tokens) per block: {ent}", "",
             "| row | ultra-low blocks | accuracy | Δ vs LUQ [95% CI], McNemar p | exist F1 | logit KL to fp | model bytes |",
             "|---|---|---|---|---|---|---|"]
    for r in table:
        blocks = ", ".join(map(str, r.get("low_blocks", []))) or "(mixed GPTQ 2/3/4/8)"
        f1 = r.get("exist_f1")
        vs = paired_cell(r["vs_luq"]) if "vs_luq" in r else "-"
        lines.append(f"| {r['row']} | {blocks} | {r['accuracy']:.3f} | {vs} | {'-' if f1 is None else f'{f1:.3f}'} | "
                     f"{r['kl_to_fp']:.5f} | {r['model_bytes']:,} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
