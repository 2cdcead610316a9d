"""Paired comparison of two evaluations of the same items: the mean difference, a percentile-bootstrap
interval for it, and an exact sign test (McNemar's exact test when every score is 0 or 1).

Pure functions over ``{item id: score}`` mappings (:attr:`quantlab.eval.runner.TaskResult.item_scores`);
only the items both runs answered are paired.

| quantity     | definition                                                                                  |
|--------------|---------------------------------------------------------------------------------------------|
| ``diff``     | mean over paired items of ``quantized - baseline``                                          |
| interval     | percentile bootstrap: resample the paired items with replacement ``n_resamples`` times       |
|              | (``numpy.random.default_rng(seed)``), take the ``(1-level)/2`` and ``(1+level)/2`` quantiles |
|              | (``numpy.quantile``, linear) of the resampled means                                         |
| ``p_value``  | two-sided exact binomial test of ``n_better`` vs ``n_worse`` (ties dropped) at 1/2:          |
|              | ``min(1, 2 * P[Binom(n_better + n_worse, 1/2) <= min(n_better, n_worse)])``                  |

Resampling items is the same as drawing how often each distinct difference value is picked from a
multinomial (``n`` draws, probabilities = the values' shares); :func:`bootstrap_ci` does that when there
are few distinct values (0/1 and VQA-style scores: any number of items costs the same), and draws item
indices otherwise. Both are deterministic for a given seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

N_RESAMPLES = 10_000
LEVEL = 0.95
SEED = 0
_MULTINOMIAL_MAX_VALUES = 256  # distinct difference values up to which the multinomial shortcut is used
_CHUNK_ELEMENTS = 1 << 22  # item indices drawn at a time on the index path


@dataclass(frozen=True)
class PairedDiff:
    """Quantized minus baseline over the items both answered."""

    n: int  # paired items
    baseline: float  # mean score of the paired items
    quantized: float
    diff: float  # quantized - baseline
    ci_low: float
    ci_high: float
    level: float
    n_resamples: int
    seed: int
    n_better: int  # items scored higher by the quantized model
    n_worse: int  # items scored lower
    p_value: float  # exact two-sided sign test of n_better vs n_worse
    test: str  # "mcnemar-exact" (every score 0 or 1) or "sign-test"
    only_baseline: int = 0  # items only the baseline answered (left out)
    only_quantized: int = 0


def bootstrap_ci(diffs: Sequence[float] | np.ndarray, *, n_resamples: int = N_RESAMPLES, seed: int = SEED,
                 level: float = LEVEL) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``diffs`` (resampling items with replacement).

    Raises:
        ValueError: no values, ``n_resamples < 1`` or ``level`` outside (0, 1).
    """
    d = np.asarray(diffs, dtype=np.float64).ravel()
    n = d.size
    if n == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    values, counts = np.unique(d, return_counts=True)
    if values.size <= _MULTINOMIAL_MAX_VALUES:
        picks = rng.multinomial(n, counts / n, size=n_resamples)  # (n_resamples, distinct values)
        means = picks @ values / n
    else:
        means = np.empty(n_resamples)
        step = max(1, _CHUNK_ELEMENTS // n)
        for lo in range(0, n_resamples, step):
            hi = min(n_resamples, lo + step)
            means[lo:hi] = d[rng.integers(0, n, size=(hi - lo, n))].mean(axis=1)
    alpha = (1.0 - level) / 2
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def sign_test_p(n_better: int, n_worse: int) -> float:
    """Exact two-sided sign test (binomial at 1/2) of ``n_better`` vs ``n_worse``; 1.0 when both are 0.

    With 0/1 scores this is McNemar's exact test (``n_better``, ``n_worse`` are the discordant pairs).
    """
    from scipy.stats import binom

    m = n_better + n_worse
    if m == 0:
        return 1.0
    return float(min(1.0, 2.0 * binom.cdf(min(n_better, n_worse), m, 0.5)))


def paired_difference(baseline: Mapping[str, float], quantized: Mapping[str, float], *,
                      n_resamples: int = N_RESAMPLES, seed: int = SEED, level: float = LEVEL) -> PairedDiff | None:
    """Compare per-item scores over the ids both mappings hold (``None`` when they share none)."""
    ids = sorted(set(baseline) & set(quantized))
    if not ids:
        return None
    b = np.array([baseline[i] for i in ids], dtype=np.float64)
    q = np.array([quantized[i] for i in ids], dtype=np.float64)
    d = q - b
    low, high = bootstrap_ci(d, n_resamples=n_resamples, seed=seed, level=level)
    better, worse = int((d > 0).sum()), int((d < 0).sum())
    binary = bool(np.isin(b, (0.0, 1.0)).all() and np.isin(q, (0.0, 1.0)).all())
    return PairedDiff(n=len(ids), baseline=float(b.mean()), quantized=float(q.mean()), diff=float(d.mean()),
                      ci_low=low, ci_high=high, level=level, n_resamples=n_resamples, seed=seed,
                      n_better=better, n_worse=worse, p_value=sign_test_p(better, worse),
                      test="mcnemar-exact" if binary else "sign-test",
                      only_baseline=len(set(baseline) - set(quantized)),
                      only_quantized=len(set(quantized) - set(baseline)))
