"""A mixed GGUF K-quant plan at ~3 bits per weight, served by llama.cpp, against quantlab's own evaluation.

    python eval/gguf_kquant.py --model toy-llava-hard --out eval/results/gguf-kquant-toy-llava-hard.json

Issue 14's target: for a mixed K-quant plan at about 3 bits per weight, llama.cpp's accuracy within 2 points of
quantlab's evaluation of the same quantized weights (transformers, fake-quant). The budget planner chooses per
decoder unit among Q2_K, Q3_K, Q4_K and Q6_K (GPTQ solved on each K grid, docs/formats.md#gguf) at
``--bits`` average stored bits; the export is the gguf format (model.gguf + mmproj.gguf); llama.cpp runs in
the ``llama-cpp`` engine's environment (``quantlab engines --install llama-cpp``). K-quants need rows that are
multiples of 256: the hard toys have them, the first toys do not. Both evaluations answer the same seeded
test items; the gap carries a paired 95% bootstrap interval and an exact McNemar p.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from quantlab.calib.collect import calibrate
from quantlab.core.files import write_dir_atomic
from quantlab.eval.engines import open_engine
from quantlab.eval.paired import paired_difference
from quantlab.eval.runner import evaluate
from quantlab.export.formats import get_format
from quantlab.plan.make import make_plan
from quantlab.quant.apply import quantize
from quantlab.quant.scheme import QuantScheme
from quantlab.recipe import PlanSpec, RuleSpec

CANDIDATES = [QuantScheme(backend="gptq", bits=2, group_size=16, sym=False, args={"grid": "q2_k"}),
              QuantScheme(backend="gptq", bits=3, group_size=16, sym=True, args={"grid": "q3_k"}),
              QuantScheme(backend="gptq", bits=4, group_size=32, sym=False, args={"grid": "q4_k"}),
              QuantScheme(backend="gptq", bits=6, group_size=16, sym=True, args={"grid": "q6_k"})]
KEEP = [RuleSpec(match="component:vision", scheme=None), RuleSpec(match="component:projector", scheme=None),
        RuleSpec(match="component:head", scheme=None)]


def main() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from luq_table import seeded_setup, task_of

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="toy-llava-hard")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--bits", type=float, default=3.0, help="average stored bits per decoder weight")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    t0 = time.time()
    task = task_of(a.model)[0]
    loaded, calib = seeded_setup(a.model, a.samples, a.seed)
    stats = calibrate(loaded, calib, hessians=True, progress=False)
    spec = PlanSpec(planner="budget", candidates=CANDIDATES, target_avg_bits=a.bits, rules=KEEP)
    plan = make_plan(loaded, stats, spec, export_format="gguf", samples=calib.samples, progress=False)
    results = quantize(loaded, plan.layers, calib.samples, progress=False)
    gguf_dir = a.out.with_suffix("") if a.out.suffix else a.out.parent / (a.out.name + "-gguf")
    write_dir_atomic(gguf_dir, lambda d: get_format("gguf").write(loaded, results, d), overwrite=gguf_dir.exists())
    ours = evaluate(loaded, [task], data_dir=None, limit=a.limit).tasks[task]
    theirs = evaluate(open_engine("llama-cpp", gguf_dir), [task], data_dir=None, limit=a.limit).tasks[task]
    d = paired_difference(ours.item_scores, theirs.item_scores)
    mix: dict[str, int] = {}
    for s in plan.layers.values():
        if s is not None:
            mix[s.label()] = mix.get(s.label(), 0) + 1
    out = {"model": a.model, "task": task, "n": d.n, "target_avg_bits": a.bits, "plan_avg_bits": plan.avg_bits,
           "mix": mix, "quantlab_accuracy": ours.score, "llama_cpp_accuracy": theirs.score,
           "llama_cpp_minus_quantlab": d.diff, "ci": [d.ci_low, d.ci_high], "p": d.p_value,
           "per_type": {t: {"quantlab": ours.per_type[t].score, "llama_cpp": theirs.per_type[t].score}
                        for t in ours.per_type},
           "within_2_points": abs(d.diff) <= 0.02, "seconds": round(time.time() - t0, 1),
           "command": "python eval/gguf_kquant.py " + " ".join(sys.argv[1:]), "torch": torch.__version__}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "per_type"}, indent=1))


if __name__ == "__main__":
    main()
