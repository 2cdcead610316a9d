"""Paired statistics of two evaluations: bootstrap interval, sign test / McNemar, item matching.

Known values: the bootstrap distribution of the mean of n 0/1 values with k ones is Binomial(n, k/n)/n, so
its percentile interval is the binomial quantiles; the exact McNemar p-values are computed by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from quantlab.eval.paired import bootstrap_ci, paired_difference, sign_test_p


def test_bootstrap_of_0_1_values_is_the_binomial_interval():
    # 30 ones in 100: resampled means ~ Binomial(100, 0.3) / 100, whose 2.5% / 97.5% quantiles are 21 / 39
    low, high = bootstrap_ci([1.0] * 30 + [0.0] * 70)
    assert stats.binom.ppf([0.025, 0.975], 100, 0.3).tolist() == [21, 39]
    assert low == pytest.approx(0.21, abs=0.0101) and high == pytest.approx(0.39, abs=0.0101)


def test_bootstrap_of_paired_differences_matches_the_binomial_too():
    # differences -1/0/+1 with 20 worse, 70 same, 10 better (n = 100): the mean is (B - W) / 100 with
    # (B, W, same) ~ Multinomial(100; 0.1, 0.2, 0.7); check against that distribution's exact quantiles
    d = [-1.0] * 20 + [0.0] * 70 + [1.0] * 10
    low, high = bootstrap_ci(d)
    probs = {}
    for b in range(101):
        for w in range(101 - b):
            p = stats.multinomial.pmf([b, w, 100 - b - w], 100, [0.1, 0.2, 0.7])
            probs[(b - w) / 100] = probs.get((b - w) / 100, 0.0) + p
    xs = sorted(probs)
    cdf = np.cumsum([probs[x] for x in xs])
    exact = (xs[int(np.searchsorted(cdf, 0.025))], xs[int(np.searchsorted(cdf, 0.975))])
    assert exact == pytest.approx((-0.21, 0.01))  # by hand: -0.1 +- 1.96 * sqrt((0.3 - 0.01) / 100) = -0.1 +- 0.106
    assert (low, high) == pytest.approx(exact, abs=0.0101)


def test_bootstrap_of_continuous_values_matches_scipy_percentile_bootstrap():
    x = np.random.default_rng(1).normal(0.1, 1.0, 400)  # 400 distinct values: the item-index path
    low, high = bootstrap_ci(x)
    ref = stats.bootstrap((x,), np.mean, method="percentile", n_resamples=10_000, random_state=0).confidence_interval
    se = x.std(ddof=1) / math.sqrt(x.size)  # the interval is about mean +- 1.96 se (0.1 wide)
    assert low == pytest.approx(ref.low, abs=0.1 * se) and high == pytest.approx(ref.high, abs=0.1 * se)
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.05)


def test_bootstrap_trivial_cases_and_determinism():
    assert bootstrap_ci([0.25] * 7) == pytest.approx((0.25, 0.25))
    assert bootstrap_ci([1.0]) == pytest.approx((1.0, 1.0))
    d = [1.0, 0.0, 0.0, -1.0, 1.0, 1.0, 0.0, 0.5]
    assert bootstrap_ci(d, seed=3) == bootstrap_ci(d, seed=3)
    assert bootstrap_ci(d, seed=3, n_resamples=50) != bootstrap_ci(d, seed=4, n_resamples=50)
    narrow, wide = bootstrap_ci(d, level=0.5), bootstrap_ci(d, level=0.99)
    assert wide[0] < narrow[0] < narrow[1] < wide[1]
    for bad in ({"n_resamples": 0}, {"level": 1.0}):
        with pytest.raises(ValueError):
            bootstrap_ci(d, **bad)
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_ci([])


def test_sign_test_hand_computed():
    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(0, 5) == pytest.approx(2 / 32)  # 2 * P[Binom(5, 1/2) = 0]
    assert sign_test_p(1, 9) == pytest.approx(2 * (1 + 10) / 1024)  # 2 * P[Binom(10, 1/2) <= 1] = 22/1024
    assert sign_test_p(9, 1) == sign_test_p(1, 9)
    assert sign_test_p(3, 3) == 1.0
    assert sign_test_p(2, 6) == pytest.approx(2 * (1 + 8 + 28) / 256)  # 0.2890625
    assert sign_test_p(400, 500) == pytest.approx(stats.binomtest(400, 900).pvalue, rel=1e-9)


def test_paired_difference_pairs_items_both_answered():
    base = {"a": 1.0, "b": 1.0, "c": 0.0, "d": 1.0, "e": 0.0, "only-base": 1.0}
    quant = {"a": 1.0, "b": 0.0, "c": 1.0, "d": 0.0, "e": 0.0, "only-quant": 0.0}
    p = paired_difference(base, quant)
    assert (p.n, p.only_baseline, p.only_quantized) == (5, 1, 1)
    assert (p.baseline, p.quantized, p.diff) == pytest.approx((0.6, 0.4, -0.2))
    assert (p.n_better, p.n_worse, p.test) == (1, 2, "mcnemar-exact")
    assert p.p_value == pytest.approx(1.0)  # 2 * P[Binom(3, 1/2) <= 1] = 2 * 4/8
    assert p.ci_low <= p.diff <= p.ci_high and (p.level, p.n_resamples, p.seed) == (0.95, 10_000, 0)
    assert paired_difference(base, quant) == p  # deterministic
    assert paired_difference({"x": 1.0}, {"y": 1.0}) is None


def test_paired_difference_of_graded_scores_is_a_sign_test():
    base = {str(i): s for i, s in enumerate([1.0, 0.3, 0.6, 0.0])}
    quant = {str(i): s for i, s in enumerate([1.0, 0.6, 0.3, 0.3])}
    p = paired_difference(base, quant)
    assert p.test == "sign-test" and (p.n_better, p.n_worse) == (2, 1)
    assert p.diff == pytest.approx(0.075)
