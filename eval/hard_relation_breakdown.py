"""Where a hard toy's relation answers go wrong (docs/hard-testbed.md).

    python eval/hard_relation_breakdown.py --model DIR [--n 1500]

Greedy answers to the relation questions among the first N items of shapes-VQA-hard's test split, grouped by
what is asked (colour or shape), the direction, the anchor-target distance in cells and the number of objects;
per group: accuracy, the share of wrong answers that name the anchor's own attribute (the answer to the
one-hop question about the named object), and the share that name some third object's.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from quantlab.data import shapes_hard as H
from quantlab.data.synthetic import SETS
from quantlab.eval.runner import load_items, predict
from quantlab.eval.tasks import get_task
from quantlab.models import load_model

TASK = "shapes-vqa-hard"


def groups_of(sample) -> tuple[list[tuple], str, str, list[str]]:
    """The groups one relation sample belongs to, what it asks, its anchor's attribute and third objects'."""
    q = sample.question
    direction = next(d for d in H.DIRECTIONS if f" {d} the " in q)
    named = q.rsplit(" the ", 1)[1].rstrip("?").removesuffix(" object")
    anchor = next(o for o in sample.objects if named in (o.color, o.shape))
    target = H.relation_target(sample)
    ask = "color" if q.startswith("What color") else "shape"
    dist = abs(target.row - anchor.row) + abs(target.col - anchor.col)
    keys = [("all",), ("ask", ask), ("direction", direction), ("distance", min(dist, 3)),
            ("objects", len(sample.objects))]
    others = [getattr(o, ask) for o in sample.objects if o is not anchor and o is not target]
    return keys, ask, getattr(anchor, ask), others


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=1500, help="test items to draw the relation questions from")
    a = ap.parse_args(argv)
    samples = {s.id: s for s in SETS.get(TASK).samples("test", a.n) if s.question_type == "relation"}
    items, _source = load_items(TASK, None, limit=a.n)
    items = [it for it in items if it.id in samples]
    preds, _failed = predict(load_model(a.model, dtype=torch.float32), get_task(TASK), items, batch_size=64,
                             max_new_tokens=8)
    table: dict[tuple, list[tuple[bool, bool, bool]]] = defaultdict(list)
    for it, pred in zip(items, preds):
        s = samples[it.id]
        p = (pred or "").strip().lower().rstrip(".")
        keys, _ask, anchor_attr, others = groups_of(s)
        ok = p == s.answer.lower()
        row = (ok, not ok and p == anchor_attr, not ok and p in others)
        for k in keys:
            table[k].append(row)
    print(f"{'group':<26}{'n':>5}{'accuracy':>10}{'anchor':>9}{'third':>8}")
    for k in sorted(table, key=str):
        v = table[k]
        share = [sum(r[j] for r in v) / len(v) for j in range(3)]
        print(f"{' '.join(map(str, k)):<26}{len(v):>5}{share[0]:>10.3f}{share[1]:>9.3f}{share[2]:>8.3f}")


if __name__ == "__main__":
    main()
