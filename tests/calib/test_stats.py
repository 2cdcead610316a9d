"""Activation statistics against numpy/scipy, exact merging, the token reservoir and k-means vs sklearn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from quantlab.calib.kmeans import kmeans, kmeans_entropy, occupancy_entropy, subsample
from quantlab.calib.stats import (
    Moments,
    TokenReservoir,
    absmax,
    gptq_hessian,
    hessian_update,
    hist_entropy,
    kurtosis,
    mean_square,
    outlier_share,
    summarize,
    token_keys,
    variance,
)


def _heavy(n: int = 37, c: int = 13, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g) * torch.linspace(0.1, 3.0, c)
    x[3, 5] = 40.0  # a massive activation
    return x


def test_pure_stats_match_numpy_scipy():
    x = _heavy()
    a = x.double().numpy()
    assert variance(x) == pytest.approx(np.var(a), rel=1e-12)
    assert kurtosis(x) == pytest.approx(scipy.stats.kurtosis(a, axis=None), rel=1e-10)
    assert absmax(x) == pytest.approx(np.abs(a).max())
    np.testing.assert_allclose(mean_square(x).numpy(), (a ** 2).mean(0), rtol=1e-12)
    np.testing.assert_allclose(x.abs().amax(0).numpy(), np.abs(a).max(0).astype(np.float32))
    counts, _ = np.histogram(a, bins=64)
    p = counts[counts > 0] / counts.sum()
    assert hist_entropy(x, 64) == pytest.approx(-(p * np.log2(p)).sum(), rel=1e-12)
    assert hist_entropy(torch.full((4, 3), 2.0)) == 0.0
    assert math.isnan(kurtosis(torch.ones(3, 3)))


def test_outlier_share_counts_massive_channels():
    chan = torch.tensor([1.0, 1.2, 0.9, 30.0, 1.1, 25.0, 1.0])  # median 1.1
    assert outlier_share(chan, ratio=20) == pytest.approx(2 / 7)
    assert outlier_share(chan, ratio=26) == pytest.approx(1 / 7)


def test_hessian_update_weighted():
    x = _heavy(11, 6)
    w = torch.rand(11, generator=torch.Generator().manual_seed(3))
    ref = (x.double().T * w.double()) @ x.double()
    torch.testing.assert_close(hessian_update(x, w).double(), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gptq_hessian(hessian_update(x), 11), 2 / 11 * x.T @ x, rtol=1e-5, atol=1e-4)


def test_moments_merged_over_chunks_equal_one_shot():
    x = _heavy(50, 9)
    is_img = torch.zeros(50, dtype=torch.bool)
    is_img[10:30] = True
    one = Moments.of(x, is_img)
    merged = Moments.zeros(9)
    for lo, hi in ((0, 7), (7, 25), (25, 26), (26, 50)):
        merged = merged.merge(Moments.of(x[lo:hi], is_img[lo:hi]))
    assert torch.equal(merged.count, one.count) and torch.equal(merged.chan_max, one.chan_max)
    for f in ("power", "chan_sq", "chan_abs"):  # float32 chunk sums, float64 merge
        torch.testing.assert_close(getattr(merged, f), getattr(one, f), rtol=1e-6, atol=1e-6)
    # the summaries from moments equal the pure functions on the selected tokens
    for mod, sel in (("image", is_img), ("text", ~is_img), ("all", torch.ones(50, dtype=torch.bool))):
        st = summarize(merged, mod, x[sel], bins=32, outlier_ratio=5.0)
        assert st.tokens == int(sel.sum())
        assert st.variance == pytest.approx(variance(x[sel]), rel=1e-6)
        assert st.kurtosis == pytest.approx(kurtosis(x[sel]), rel=1e-5)
        assert st.absmax == absmax(x[sel])
        assert st.outlier_share == outlier_share(x[sel].abs().amax(0), 5.0)
        assert st.hist_entropy == hist_entropy(x[sel], 32)
        torch.testing.assert_close(st.mean_sq, mean_square(x[sel]).float(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(st.mean_abs, x[sel].abs().mean(0))
    assert summarize(Moments.of(x, torch.ones(50, dtype=torch.bool)), "text", None) is None


def test_token_reservoir_is_order_free_and_bounded():
    masks = [torch.tensor([0, 1, 1, 1, 0, 0], dtype=torch.bool), torch.zeros(5, dtype=torch.bool),
             torch.tensor([1, 1, 0, 0, 1, 1, 1, 0], dtype=torch.bool)]
    res = TokenReservoir(masks, size=4, seed=7)
    ident = [torch.stack([torch.full((len(m),), s), torch.arange(len(m))], 1).float() for s, m in enumerate(masks)]
    rows = [ident[s][res.positions(s)] for s in range(3)]
    keys = {(s, p): int(token_keys(7, s, len(m))[p]) for s, m in enumerate(masks) for p in range(len(m))}
    for mod in ("image", "text", "all"):
        got = res.assemble(rows, mod)
        cand = [(s, p) for s, m in enumerate(masks) for p in range(len(m))
                if mod == "all" or bool(m[p]) == (mod == "image")]
        want = sorted(cand, key=keys.get)[:4]  # the 4 smallest keys of the modality, in key order
        assert [tuple(int(v) for v in r) for r in got] == want
    assert torch.equal(token_keys(7, 2, 8), token_keys(7, 2, 8))
    assert not torch.equal(token_keys(7, 2, 8), token_keys(8, 2, 8))


# --- k-means -----------------------------------------------------------------------------------------

def _layer(tight: float, n: int = 1500, d: int = 8, seed: int = 0) -> torch.Tensor:
    """A synthetic layer: a ``tight`` share of tokens in one very tight blob, the rest widely spread."""
    g = torch.Generator().manual_seed(seed)
    nt = int(tight * n)
    return torch.cat([torch.randn(nt, d, generator=g) * 0.01, torch.randn(n - nt, d, generator=g) * 3 + 5])


def test_kmeans_deterministic_and_sane():
    x = _layer(0.3, n=600)
    a, b = kmeans(x, 20, seed=5), kmeans(x, 20, seed=5)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.centers, b.centers)
    assert not torch.equal(kmeans(x, 20, seed=6).labels, a.labels)
    # centres are the means of their clusters (Lloyd fixed point) and inertia matches the labels
    for j in range(20):
        torch.testing.assert_close(a.centers[j], x[a.labels == j].mean(0), rtol=1e-4, atol=1e-4)
    assert a.inertia == pytest.approx(float(((x - a.centers[a.labels]) ** 2).sum()), rel=1e-4)
    assert kmeans(x[:5], 100).centers.shape[0] == 5  # k lowered to n
    assert kmeans_entropy(torch.zeros(50, 4), 10) == 0.0  # all duplicates: one occupied cluster
    assert occupancy_entropy(torch.arange(8)) == pytest.approx(3.0)
    assert subsample(x, 100, 1).shape == (100, 8) and torch.equal(subsample(x, 100, 1), subsample(x, 100, 1))


def test_kmeans_entropy_ranking_agrees_with_sklearn():
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    layers = {name: _layer(t, seed=i) for i, (name, t) in enumerate({"a": 0.6, "b": 0.0, "c": 0.9, "d": 0.3}.items())}
    ours, ref = {}, {}
    for name, x in layers.items():
        ours[name] = kmeans_entropy(x, 100, seed=42)
        km = sklearn_cluster.KMeans(n_clusters=100, random_state=42, n_init=10).fit(x.numpy())
        ref[name] = occupancy_entropy(torch.from_numpy(km.labels_).long(), 100)
    assert sorted(ours, key=ours.get) == sorted(ref, key=ref.get) == ["c", "a", "d", "b"]
    for name in layers:
        assert abs(ours[name] - ref[name]) < 0.05, (name, ours[name], ref[name])
