"""The LUQ main table, in miniature, on the toy VLMs.

    python eval/luq_table.py --model toy-llava --out eval/results/toy-llava.json
    python eval/luq_table.py --model toy-llava-hard --out eval/results/toy-llava-hard.json
    python eval/luq_table.py --model DIR --out X.json --rows "RTN W3 g128" "RTN W2 g64"   # the test bed's targets
    python eval/luq_table.py --model DIR --out X.json --rows "tower RTN W8 g128" "tower GPTQ W4 g128"  # opt-in
    python eval/luq_table.py --model DIR --out X.json --rows "GPTQ W3 g128, AWQ" "RTN W3 g128, AWQ, image weight measured"

The task and the calibration source follow the model (shapes-VQA-hard for the hard toys,
docs/hard-testbed.md); every accuracy row carries a paired test against the fp row (McNemar, exact).

Rows: fp32; RTN and GPTQ at 4/3/2 bits uniform; BiLLM on every decoder block; LUQ (the paper's rule:
lowest-entropy blocks to BiLLM until the nominal average reaches 2.54 bits, the rest GPTQ W4 g128);
LUQ with GPTQ W2 g64 as the ultra-low scheme (exportable to compressed-tensors); and quantlab's budget
planner (measured KL sensitivity + exact MILP) given the same bytes as each LUQ row.
Columns: shapes-VQA exact match per question type and overall, POPE-style F1 on the yes/no (exist)
questions, predicted bytes of the decoder Linears and of the whole model, exact stored bits per decoder
weight, nominal bits (LUQ's convention) and the decoder-Linear memory saving vs uniform GPTQ W4 g128.

Opt-in rows (``--rows``): the vision tower quantized, and issue 17's modality-aware methods (MBQ's measured
image/text weights and VLMQ-style gradient token weights in GPTQ's Hessian, AWQ before GPTQ or RTN, AWQ
with MBQ's balanced loss), each also compared with its plain row (same scheme, same bytes) on the same items.

Every row starts from the same full-precision weights and the same calibration set (seeded).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from quantlab.calib.collect import calibrate
from quantlab.calib.data import CalibDataOptions, CalibSource, build_calibration_set
from quantlab.data.synthetic import set_of_model
from quantlab.eval.paired import paired_difference
from quantlab.eval.runner import evaluate
from quantlab.models import load_model
from quantlab.models.load import resolve
from quantlab.plan.cost import model_size
from quantlab.plan.make import make_plan
from quantlab.plan.sensitivity import _log_probs, kl_damage
from quantlab.quant.apply import quantize
from quantlab.quant.scheme import QuantScheme
from quantlab.recipe import PlanSpec, RuleSpec

W4 = QuantScheme(backend="gptq", bits=4, group_size=128)
KEEP = [RuleSpec(match=f"component:{c}", scheme=None) for c in ("vision", "projector", "head")]


def uniform(backend: str, bits: int, group: int) -> PlanSpec:
    return PlanSpec(planner="uniform", scheme=QuantScheme(backend=backend, bits=bits, group_size=group), rules=KEEP)


def rows() -> dict[str, PlanSpec]:
    out = {}
    for bits, group in ((4, 128), (3, 128), (2, 64)):
        out[f"RTN W{bits} g{group}"] = uniform("rtn", bits, group)
        out[f"GPTQ W{bits} g{group}"] = uniform("gptq", bits, group)
    out["BiLLM all blocks"] = uniform("billm", 1, 128)
    out["LUQ (BiLLM + W4), 2.54 nominal bits"] = PlanSpec(
        planner="luq", low=QuantScheme(backend="billm", bits=1, group_size=128), high=W4, target_avg_bits=2.54,
        rules=KEEP)
    out["LUQ (W2g64 + W4), 2.54 nominal bits"] = PlanSpec(
        planner="luq", low=QuantScheme(backend="gptq", bits=2, group_size=64), high=W4, target_avg_bits=2.54,
        rules=KEEP)
    return out


def tower_rows() -> dict[str, PlanSpec]:
    """Opt-in rows (``--rows``) that quantize the vision tower and projector (issue 17's vision targets) or every
    Linear but the head; the decoder convention above leaves the tower in full precision."""
    head = [RuleSpec(match="component:head", scheme=None)]
    out = {}
    for backend, bits in (("rtn", 8), ("gptq", 8), ("rtn", 4), ("gptq", 4)):
        out[f"tower {backend.upper()} W{bits} g128"] = PlanSpec(
            planner="uniform", scheme=QuantScheme(backend=backend, bits=bits, group_size=128),
            components=["vision", "projector"], rules=head)
    for backend, bits, group in (("rtn", 3, 128), ("rtn", 2, 64)):
        out[f"{backend.upper()} W{bits} g{group}, every Linear"] = PlanSpec(
            planner="uniform", scheme=QuantScheme(backend=backend, bits=bits, group_size=group),
            components=["decoder", "vision", "projector"], rules=head)
    return out


def modality_rows() -> dict[str, PlanSpec]:
    """Opt-in rows (``--rows``) of issue 17's modality-aware methods, each paired with its plain row (same scheme,
    same stored bytes): GPTQ with MBQ's measured image/text weights or VLMQ-style gradient token weights in the
    Hessian, AWQ's scale search before GPTQ or RTN, and the same search with MBQ's balanced loss."""
    variants = {"image weight measured": {"image_weight": "measured"}, "token weight gradient": {"token_weight": "gradient"},
                "AWQ": {"awq": True}, "AWQ, image weight measured": {"awq": True, "image_weight": "measured"}}
    out = {}
    for bits, group in ((3, 128), (2, 64)):
        for label, args in variants.items():
            out[f"GPTQ W{bits} g{group}, {label}"] = PlanSpec(
                planner="uniform", scheme=QuantScheme(backend="gptq", bits=bits, group_size=group, args=args), rules=KEEP)
        for label in ("AWQ", "AWQ, image weight measured"):
            out[f"RTN W{bits} g{group}, {label}"] = PlanSpec(
                planner="uniform", scheme=QuantScheme(backend="rtn", bits=bits, group_size=group, args=variants[label]),
                rules=KEEP)
    return out


def plain_row(name: str) -> str:
    """The plain row a modality-aware row is compared with: ``GPTQ W3 g128, AWQ`` -> ``GPTQ W3 g128``."""
    return name.split(",")[0]


BUDGET_CANDIDATES = [QuantScheme(backend="gptq", bits=b, group_size=g) for b, g in ((2, 64), (3, 128), (4, 128), (8, 128))]


def modality_candidates(image_weight: float) -> list[QuantScheme]:
    """``--modality-budget``'s candidates: the plain ones plus AWQ then GPTQ, unweighted and with MBQ's balanced
    loss at ``image_weight`` (the budget planner measures each candidate with its own weights, so it takes one
    number, the median of calibration's measured image/text gradient ratios, not the per-block ``measured``)."""
    return BUDGET_CANDIDATES + [
        QuantScheme(backend="gptq", bits=b, group_size=g, args=args) for b, g in ((2, 64), (3, 128), (4, 128))
        for args in ({"awq": True}, {"awq": True, "image_weight": image_weight})]


def task_of(model: str) -> tuple[str, str]:
    """(eval task, calibration source kind) of a toy: its training set's."""
    member = set_of_model(resolve(model))
    return member.name, member.calib_kind


def calib_options(model: str, samples: int, seed: int, alpha: float = 0.5) -> CalibDataOptions:
    src = [CalibSource(kind=task_of(model)[1])]
    return CalibDataOptions(num_samples=samples, alpha=alpha, seed=seed, image_sources=src, text_sources=src)


def seeded_setup(model: str, samples: int, seed: int):
    """The model and the calibration set every row starts from (64 samples, alpha = 0.5, seeded)."""
    torch.manual_seed(seed)
    base = load_model(model)
    return base, build_calibration_set(base, calib_options(model, samples, seed))


def held_out(base, model: str, seed: int):
    """64 held-out image+text samples (seed + 1) and the fp model's log-probs on them (the KL column)."""
    held_set = build_calibration_set(base, calib_options(model, 64, seed + 1, alpha=1.0))
    return held_set.samples, _log_probs(base, held_set.samples)


def versus(fp_scores: dict, scores: dict) -> dict:
    """Paired difference to the fp row over the same items (exact McNemar p, 95% bootstrap interval)."""
    d = paired_difference(fp_scores, scores)
    return {"diff_vs_fp": d.diff, "ci_vs_fp": [d.ci_low, d.ci_high], "p_vs_fp": d.p_value,
            "better_worse_vs_fp": [d.n_better, d.n_worse]}


def evaluate_row(name: str, base, samples, stats, spec: PlanSpec, *, limit: int, budget_bytes: int | None = None,
                 held=None, task: str = "shapes-vqa") -> dict:
    loaded = copy.deepcopy(base)
    t0 = time.time()
    fmt = "native" if spec.planner != "budget" and any(
        s is not None and s.backend == "billm" for s in (spec.scheme, spec.low)) else "compressed-tensors"
    plan = make_plan(loaded, stats, spec, export_format=fmt, samples=samples, budget_bytes=budget_bytes,
                     progress=False)
    quantize(loaded, plan.layers, samples, progress=False,
             token_importance=getattr(stats, "token_importance", None) or None)
    seconds = time.time() - t0
    report = evaluate(loaded, [task], data_dir=None, limit=limit, batch_size=64)
    r = report.tasks[task]
    kl = kl_damage(held[1], _log_probs(loaded, held[0])) if held is not None else None
    return {"row": name, "plan": plan, "format": fmt, "accuracy": r.score, "kl_to_fp": kl,
            "per_type": {t: s.score for t, s in r.per_type.items()},
            "exist_f1": r.aggregates.get("exist", {}).get("f1"), "quantize_seconds": round(seconds, 1),
            "item_scores": r.item_scores}


def sizes(base, plan, fmt: str) -> dict:
    rep = model_size(base.model, base.adapter, plan.layers, fmt, dtype_bytes=2)
    return {"model_bytes": rep.total_bytes, "decoder_linear_bytes": rep.decoder_linear_bytes,
            "avg_bits": rep.avg_bits, "nominal_bits": rep.nominal_bits}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="toy-llava")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", nargs="*", default=None,
                    help="only these rows (names as printed, e.g. 'RTN W3 g128'; GPTQ W4 g128 always runs: the "
                         "saving column needs it); the fp row always runs")
    ap.add_argument("--modality-budget", action="store_true",
                    help="beside each LUQ row's budget row, one whose candidates add AWQ then GPTQ, with and without "
                         "MBQ's balanced loss (issue 17's operating point), paired against the plain budget row")
    a = ap.parse_args()
    task = task_of(a.model)[0]
    every = rows() | tower_rows() | modality_rows()
    unknown = set(a.rows or ()) - set(every)
    if unknown:
        raise SystemExit(f"--rows: unknown {sorted(unknown)}; valid: {sorted(every)}")
    modal = [n for n in a.rows or () if n in modality_rows()]
    wanted = {*(a.rows or ()), "GPTQ W4 g128", *map(plain_row, modal)}
    chosen = rows() if a.rows is None else {n: s for n, s in every.items() if n in wanted}
    base, calib = seeded_setup(a.model, a.samples, a.seed)
    # MBQ's gradient ratios and the per-token saliency need one backward pass per sample: only when a row asks
    stats = calibrate(base, calib, hessians=True, progress=False, modality_gradients=bool(modal) or a.modality_budget,
                      token_importance=bool(modal))
    # held-out image+text samples (other seed) for the logit-KL column: a continuous damage measure
    held = held_out(base, a.model, a.seed)
    table = []
    fp = evaluate(base, [task], data_dir=None, limit=a.limit, batch_size=64).tasks[task]
    fp_plan = {n: None for n, _ in base.adapter.iter_linears(base.model)}
    rep = model_size(base.model, base.adapter, fp_plan, "compressed-tensors", dtype_bytes=2)
    table.append({"row": "fp32 (stored fp16)", "accuracy": fp.score, "item_scores": fp.item_scores, "per_type": {t: s.score for t, s in fp.per_type.items()},
                  "exist_f1": fp.aggregates.get("exist", {}).get("f1"), "kl_to_fp": 0.0, "model_bytes": rep.total_bytes,
                  "decoder_linear_bytes": rep.decoder_linear_bytes, "avg_bits": 16.0, "nominal_bits": 16.0})
    print(json.dumps({k: v for k, v in table[-1].items() if k != "item_scores"}), flush=True)
    for name, spec in chosen.items():
        row = evaluate_row(name, base, calib.samples, stats, spec, limit=a.limit, held=held, task=task)
        row.update(versus(fp.item_scores, row["item_scores"]))
        if name in modal:
            fallbacks = row["plan"].info.get("fallbacks")
            if fallbacks:  # a method that silently ran nowhere proves nothing
                first = next(iter(fallbacks.items()))
                raise SystemExit(f"{name}: the plan kept {len(fallbacks)} Linears in full precision, "
                                 f"e.g. {first[0]}: {first[1]}")
            # the method minus its plain row, same scheme and bytes, same items
            row["vs_plain"] = versus(next(r for r in table if r["row"] == plain_row(name))["item_scores"],
                                     row["item_scores"])
            row["plain_row"] = plain_row(name)
        plan = row.pop("plan")
        row.update(sizes(base, plan, row["format"]))
        if name.startswith("LUQ"):
            row["luq_k"] = plan.info["luq"]["k"]
            row["luq_order"] = plan.info["luq"]["order"]
        table.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "item_scores"}), flush=True)
        if name.startswith("LUQ"):
            budgets = {"": BUDGET_CANDIDATES}
            if a.modality_budget:
                ratio = statistics.median(stats.meta["modality_gradient_ratio"])  # one per decoder block
                budgets[", modality-aware candidates"] = modality_candidates(round(ratio, 4))
            for suffix, candidates in budgets.items():
                bud = evaluate_row(f"quantlab budget{suffix} @ {name.split(',')[0]} bytes", base, calib.samples, stats,
                                   PlanSpec(planner="budget", candidates=candidates, rules=KEEP),
                                   limit=a.limit, budget_bytes=plan.predicted_bytes if row["format"] == "compressed-tensors"
                                   else row["model_bytes"], held=held, task=task)
                bud.update(versus(fp.item_scores, bud["item_scores"]))
                bud["vs_luq"] = versus(row["item_scores"], bud["item_scores"])  # budget - LUQ, same items
                if suffix:  # the same planner and bytes with plain GPTQ candidates only, same items
                    bud["vs_plain"] = versus(table[-1]["item_scores"], bud["item_scores"])
                    bud["plain_row"] = table[-1]["row"]
                bplan = bud.pop("plan")
                bud.update(sizes(base, bplan, bud["format"]))
                bud["choice"] = {k: v["choice"] for k, v in bplan.info.items() if isinstance(v, dict) and "choice" in v}
                table.append(bud)
                print(json.dumps({k: v for k, v in bud.items() if k not in ("choice", "item_scores")}), flush=True)
    w4 = next(r for r in table if r["row"] == "GPTQ W4 g128")
    for r in table:
        r["saving_vs_w4_decoder"] = 1 - r["decoder_linear_bytes"] / w4["decoder_linear_bytes"]
        r["rel_acc_drop_vs_w4"] = (w4["accuracy"] - r["accuracy"]) / w4["accuracy"]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"model": a.model, "samples": a.samples, "limit": a.limit, "seed": a.seed,
                                 "rows": table}, indent=2) + "\n")
    a.out.with_suffix(".md").write_text(markdown(a.model, table))
    print(markdown(a.model, table))
    print(f"wrote {a.out} and {a.out.with_suffix('.md')}")


def markdown(model: str, table: list[dict]) -> str:
    """The table as markdown (accuracy per question type, POPE F1, bytes, bits, saving vs W4)."""
    types = sorted(table[0]["per_type"])
    head = ["row", *types, "overall", "Δ vs fp [95% CI], McNemar p", "exist F1", "logit KL to fp",
            "decoder Linear bytes", "model bytes", "bits/weight (stored)", "nominal bits", "saving vs W4 (decoder)",
            "rel. drop vs W4"]
    lines = [f"### {model}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        f1 = r.get("exist_f1")
        cells = [r["row"], *(f"{r['per_type'][t]:.3f}" for t in types), f"**{r['accuracy']:.3f}**",
                 paired_cell(r), "-" if f1 is None else f"{f1:.3f}", f"{r.get('kl_to_fp', float('nan')):.5f}",
                 f"{r['decoder_linear_bytes']:,}", f"{r['model_bytes']:,}",
                 f"{r['avg_bits']:.3f}", f"{r['nominal_bits']:.2f}", f"{100 * r['saving_vs_w4_decoder']:.1f}%",
                 f"{100 * r['rel_acc_drop_vs_w4']:.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    budget = [r for r in table if "vs_luq" in r]
    if budget:
        lines += ["", "Budget planner minus LUQ at the same bytes, same items:", ""]
        lines += [f"- {r['row']}: {paired_cell(r['vs_luq'], 'diff_vs_fp', 'ci_vs_fp', 'p_vs_fp')} "
                  f"(better on {r['vs_luq']['better_worse_vs_fp'][0]} items, worse on {r['vs_luq']['better_worse_vs_fp'][1]})"
                  for r in budget]
    modal = [r for r in table if "vs_plain" in r]
    if modal:
        lines += ["", "Modality-aware method minus its plain row (same scheme and stored bytes), same items:", ""]
        lines += [f"- {r['row']} vs {r['plain_row']}: {paired_cell(r['vs_plain'])} "
                  f"(KL {r['kl_to_fp']:.5f} vs {next(p for p in table if p['row'] == r['plain_row'])['kl_to_fp']:.5f})"
                  for r in modal]
    return "\n".join(lines) + "\n"


def paired_cell(r: dict, diff: str = "diff_vs_fp", ci: str = "ci_vs_fp", p: str = "p_vs_fp") -> str:
    """``-0.124 [-0.156, -0.092], p=1e-12`` (points of accuracy, as fractions), or ``-`` for the fp row."""
    if diff not in r:
        return "-"
    return f"{r[diff]:+.3f} [{r[ci][0]:+.3f}, {r[ci][1]:+.3f}], p={r[p]:.2g}"


if __name__ == "__main__":
    main()
