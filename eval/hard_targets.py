"""Check a hard toy against the test bed's targets (docs/hard-testbed.md), from its LUQ-table results.

    python eval/luq_table.py --model toy-llava-hard --out eval/results/toy-llava-hard.json
    python eval/hard_targets.py eval/results/toy-llava-hard.json

Targets (500+ test items): fp accuracy >= 0.85 overall and >= 0.60 on every question type; uniform RTN W3
g128 at least 5 points below fp; uniform RTN W2 g64 at least 20 points below fp; uniform GPTQ W4 g128 within
2 points of fp; the model's build (training.json ``total_seconds``) within 45 minutes. Each accuracy gap is
printed with its paired 95% interval and exact McNemar p-value over the same items. Exit code 1 when a
target is missed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from quantlab.models.load import resolve

FP, RTN3, RTN2, GPTQ4 = "fp32 (stored fp16)", "RTN W3 g128", "RTN W2 g64", "GPTQ W4 g128"
MIN_ITEMS = 500
BUILD_LIMIT_S = 45 * 60


def check(results: dict, training: dict) -> list[tuple[str, bool, str]]:
    """(target, met, evidence) for every target."""
    rows = {r["row"]: r for r in results["rows"]}
    fp = rows[FP]
    n = len(fp["item_scores"])
    out = [(f"test items >= {MIN_ITEMS}", n >= MIN_ITEMS, f"{n} items"),
           ("fp overall >= 0.85", fp["accuracy"] >= 0.85, f"{fp['accuracy']:.3f}")]
    worst = min(fp["per_type"].items(), key=lambda kv: kv[1])
    out.append(("fp every question type >= 0.60", worst[1] >= 0.60,
                ", ".join(f"{t} {s:.3f}" for t, s in sorted(fp["per_type"].items()))))

    def gap(row: str) -> tuple[float, str]:
        r = rows[row]
        d = fp["accuracy"] - r["accuracy"]
        lo, hi = r["ci_vs_fp"]
        return d, (f"{r['accuracy']:.3f}, {100 * d:.1f} points below fp (paired 95% CI of the drop "
                   f"[{-100 * hi:.1f}, {-100 * lo:.1f}], McNemar p={r['p_vs_fp']:.2g})")

    for row, test, text in ((RTN3, lambda d: d >= 0.05, ">= 5 points below fp"),
                            (RTN2, lambda d: d >= 0.20, ">= 20 points below fp"),
                            (GPTQ4, lambda d: d <= 0.02, "within 2 points of fp")):
        d, evidence = gap(row)
        out.append((f"uniform {row} {text}", test(d), evidence))
    seconds = training.get("total_seconds")
    out.append((f"build <= {BUILD_LIMIT_S // 60} min", seconds is not None and seconds <= BUILD_LIMIT_S,
                "not recorded" if seconds is None else
                f"{seconds / 60:.1f} min ({training.get('threads')} threads; {training.get('command')})"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="eval/luq_table.py's JSON for a hard toy")
    a = ap.parse_args(argv)
    results = json.loads(a.results.read_text())
    training = json.loads((Path(resolve(results["model"])) / "training.json").read_text())
    ok = True
    print(f"{results['model']} ({a.results})")
    for target, met, evidence in check(results, training):
        ok &= met
        print(f"  [{'met' if met else 'MISSED'}] {target}: {evidence}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
