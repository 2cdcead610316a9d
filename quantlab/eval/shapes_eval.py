"""Minimal shapes-VQA evaluator: exact match per question type, straight from the generator."""

from __future__ import annotations

from collections import defaultdict

from quantlab.data import shapes
from quantlab.eval.generate import generate_answers
from quantlab.models.load import LoadedModel


def evaluate_shapes(loaded: LoadedModel, *, n: int = 500, split: str = "test", batch_size: int = 64) -> dict:
    """Greedy exact-match accuracy on ``n`` shapes-VQA samples, overall and per question type."""
    samples = list(shapes.iter_samples(split, n))
    preds = generate_answers(loaded, [s.question for s in samples], [s.render() for s in samples],
                             batch_size=batch_size, max_new_tokens=4)
    hits: dict[str, list[bool]] = defaultdict(list)
    for s, p in zip(samples, preds):
        hits[s.question_type].append(p.strip().lower() == s.answer)
    per_type = {t: sum(v) / len(v) for t, v in sorted(hits.items())}
    overall = sum(sum(v) for v in hits.values()) / n
    return {"task": "shapes-vqa", "split": split, "n": n, "accuracy": overall, "per_type": per_type,
            "examples": [{"q": s.question, "answer": s.answer, "pred": p} for s, p in list(zip(samples, preds))[:5]]}
