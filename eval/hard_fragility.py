"""How much uniform RTN costs a model, for several checkpoints at once (the hard test bed's fragility curve).

    python eval/hard_fragility.py DIR/step-600 DIR/step-1200 DIR --out eval/results/X.json

For each model: fp accuracy on the task's test split (500 items by default), then every decoder Linear at RTN
W3 g128 and at RTN W2 g64 (the test bed's degradation targets, docs/hard-testbed.md; vision tower, projector
and head kept, as in eval/luq_table.py), each with its paired difference to fp over the same items (exact
McNemar p, 95% bootstrap interval) and the logit KL to fp on 64 held-out samples. RTN needs no calibration
statistics, so a checkpoint costs a few evaluations, not a LUQ table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from luq_table import evaluate_row, held_out, seeded_setup, task_of, uniform, versus

from quantlab.eval.runner import evaluate

ROWS = {"RTN W3 g128": ("rtn", 3, 128), "RTN W2 g64": ("rtn", 2, 64)}


def fragility(model: str, limit: int, seed: int) -> dict:
    """fp accuracy and each RTN row's accuracy, paired difference and KL for one model."""
    task = task_of(model)[0]
    base, calib = seeded_setup(model, 8, seed)  # RTN reads no statistics: a few samples satisfy the planner
    held = held_out(base, model, seed)
    fp = evaluate(base, [task], data_dir=None, limit=limit, batch_size=64).tasks[task]
    out = {"model": model, "fp": fp.score, "fp_per_type": {t: s.score for t, s in fp.per_type.items()}}
    for name, (backend, bits, group) in ROWS.items():
        row = evaluate_row(name, base, calib.samples, None, uniform(backend, bits, group), limit=limit, held=held,
                           task=task)
        row.update(versus(fp.item_scores, row["item_scores"]))
        out[name] = {k: row[k] for k in ("accuracy", "kl_to_fp", "per_type", "diff_vs_fp", "ci_vs_fp", "p_vs_fp")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    results = []
    for model in a.models:
        results.append(fragility(model, a.limit, a.seed))
        r = results[-1]
        print(json.dumps({"model": model, "fp": r["fp"], **{
            n: {"diff": round(r[n]["diff_vs_fp"], 4), "ci": [round(c, 4) for c in r[n]["ci_vs_fp"]],
                "p": r[n]["p_vs_fp"], "kl": round(r[n]["kl_to_fp"], 5)} for n in ROWS}}), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"limit": a.limit, "seed": a.seed, "results": results}, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
