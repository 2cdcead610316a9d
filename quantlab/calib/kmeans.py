"""Deterministic k-means in torch and LUQ's k-means entropy (docs/method.md#k-means-entropy).

LUQ ranks decoder layers by the entropy of the *cluster-occupancy distribution* of their token vectors:
cluster the (tokens, hidden) activations into K = 100 clusters, ``p_k = n_k / n``, ``H = -Σ p_k log2 p_k``
(bits, so ``0 <= H <= log2 K``). The reference code uses ``sklearn.KMeans(n_clusters=100,
random_state=42, n_init=10)``; this module reproduces that algorithm in torch so it runs on the tensors
the calibration pass already holds:

| step        | here                                                                         | sklearn              |
|-------------|------------------------------------------------------------------------------|----------------------|
| subsample   | at most ``max_tokens`` (default 4096) rows, seeded ``randperm``              | (all tokens)         |
| centring    | rows minus their mean (distances are unchanged, cancellation is smaller)     | same                 |
| init        | greedy k-means++: ``2 + floor(ln k)`` D²-sampled candidates per centre, the  | same                 |
|             | one lowering the potential most wins; a seeded ``torch.Generator``           |                      |
| iterations  | Lloyd, at most ``max_iter`` (300); stop when labels repeat or the squared     | same                 |
|             | centre shift ``<= tol · mean per-feature variance`` (tol 1e-4)               |                      |
| empty       | an empty cluster moves to the point farthest from its centre                 | same idea            |
| restarts    | ``n_init`` runs from one generator, the lowest inertia wins (default 1)      | ``n_init=10`` in ref |
| k > n       | ``k`` is lowered to the number of rows                                       | raises               |

Distances use ``‖x‖² − 2 x·c + ‖c‖²`` (one matmul per iteration) in float32. Same inputs and seed give
identical labels (CPU). The entropy of a real model's layer ranking is sensitive to the sample, not to
the restarts: ``tests/calib/test_stats.py`` checks ranking agreement with scikit-learn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEFAULT_MAX_TOKENS = 4096


@dataclass(frozen=True)
class KMeansResult:
    """Centres (in the input's coordinates), labels, inertia (sum of squared distances) and iterations."""

    centers: torch.Tensor  # (k, d) float32
    labels: torch.Tensor  # (n,) int64
    inertia: float
    n_iter: int


def subsample(x: torch.Tensor, max_tokens: int, seed: int) -> torch.Tensor:
    """At most ``max_tokens`` rows of ``x``, chosen by a seeded permutation (kept in input order)."""
    n = x.shape[0]
    if n <= max_tokens:
        return x
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=g, device="cpu")[:max_tokens].sort().values
    return x[idx.to(x.device)]


def _sqdist(a: torch.Tensor, a_sq: torch.Tensor, bt: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """Squared euclidean distances ``(len(a), len(b))`` given ``bt = b.T`` contiguous, clamped at 0."""
    return torch.addmm(b_sq[None, :], a, bt, alpha=-2.0).add_(a_sq[:, None]).clamp_(min=0.0)


def _kmeans_pp(x: torch.Tensor, x_sq: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ initial centres ``(k, d)`` (Arthur & Vassilvitskii; sklearn's local trials)."""
    n, d = x.shape
    trials = 2 + int(math.log(k))
    xt = x.T.contiguous()  # (d, n): a contiguous right operand makes the small matmuls ~3x faster
    centers = torch.empty(k, d, dtype=x.dtype, device=x.device)
    first = int(torch.randint(n, (1,), generator=g, device="cpu"))
    centers[0] = x[first]
    closest = _sqdist(x[first:first + 1], x_sq[first:first + 1], xt, x_sq)[0]  # (n,)
    potential = float(closest.sum())
    for c in range(1, k):
        if potential <= 0.0:  # every row coincides with a centre: duplicates only, clusters stay empty
            centers[c:] = x[torch.randint(n, (k - c,), generator=g, device="cpu").to(x.device)]
            break
        # Drawn on the CPU (the generator's device), so a seed picks the same centres on every device.
        cand = torch.multinomial((closest / potential).cpu(), trials, replacement=True, generator=g).to(x.device)
        dist = _sqdist(x[cand], x_sq[cand], xt, x_sq)  # (t, n)
        new = torch.minimum(closest[None, :], dist)  # (t, n)
        pots = new.sum(1)  # (t,)
        best = int(pots.argmin())
        closest, potential = new[best], float(pots[best])
        centers[c] = x[cand[best]]
    return centers


def _assign(x: torch.Tensor, x_sq: torch.Tensor, centers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre of every row and the squared distance to it."""
    c_sq = (centers * centers).sum(1)
    part = torch.addmm(c_sq[None, :], x, centers.T.contiguous(), alpha=-2.0)  # (n, k); ‖x‖² kept out of argmin
    mins, labels = part.min(1)
    return labels, (mins + x_sq).clamp_(min=0.0)


def _lloyd(x: torch.Tensor, x_sq: torch.Tensor, centers: torch.Tensor, max_iter: int,
           tol: float) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    k, d = centers.shape
    labels = None
    it = 0
    for it in range(1, max_iter + 1):
        new_labels, dist = _assign(x, x_sq, centers)
        if labels is not None and torch.equal(new_labels, labels):
            break  # strict convergence: the centres below would not move
        labels = new_labels
        counts = torch.bincount(labels, minlength=k)  # (k,)
        sums = torch.zeros(k, d, dtype=x.dtype, device=x.device).index_add_(0, labels, x)  # (k, d)
        new = sums / counts.clamp(min=1)[:, None].to(x.dtype)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            far = dist.topk(len(empty)).indices  # the rows worst served by their centres
            new[empty] = x[far]
        shift = float(((new - centers) ** 2).sum())
        centers = new
        if shift <= tol:
            break
    labels, dist = _assign(x, x_sq, centers)
    return centers, labels, float(dist.sum()), it


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, *, seed: int = 42, n_init: int = 1, max_iter: int = 300,
           tol: float = 1e-4) -> KMeansResult:
    """Lloyd k-means with k-means++ init on the rows of ``x`` ``(n, d)``; deterministic for a seed.

    Args:
        x: the points, one per row (any float dtype; computed in float32).
        k: number of clusters (lowered to ``n`` when there are fewer rows).
        seed: seeds the one ``torch.Generator`` all restarts draw from.
        n_init: restarts; the run with the lowest inertia is returned.
        max_iter: Lloyd iterations per restart.
        tol: stop when the squared centre shift is ``<= tol * mean(var(x, dim=0))`` (sklearn's rule).
    """
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"kmeans: expected a non-empty (n, d) tensor, got shape {tuple(x.shape)}")
    if k < 1 or n_init < 1 or max_iter < 1:
        raise ValueError(f"kmeans: k, n_init and max_iter must be >= 1 (got {k}, {n_init}, {max_iter})")
    x = x.float()
    mean = x.mean(0)
    xc = x - mean  # (n, d)
    x_sq = (xc * xc).sum(1)  # (n,)
    k = min(k, xc.shape[0])
    tol_abs = tol * float(xc.var(0, unbiased=False).mean())
    g = torch.Generator().manual_seed(seed)
    best: KMeansResult | None = None
    for _ in range(n_init):
        init = _kmeans_pp(xc, x_sq, k, g)
        centers, labels, inertia, it = _lloyd(xc, x_sq, init, max_iter, tol_abs)
        if best is None or inertia < best.inertia:
            best = KMeansResult(centers + mean, labels, inertia, it)
    assert best is not None
    return best


def occupancy_entropy(labels: torch.Tensor, k: int | None = None) -> float:
    """Entropy in bits of the cluster-occupancy distribution ``p_j = n_j / n`` (empty clusters add 0)."""
    counts = torch.bincount(labels.flatten(), minlength=k or 0).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * torch.log2(p)).sum())


def kmeans_entropy(x: torch.Tensor, k: int = 100, seed: int = 42, *, n_init: int = 1,
                   max_tokens: int = DEFAULT_MAX_TOKENS, max_iter: int = 300, tol: float = 1e-4) -> float:
    """LUQ's layer entropy: k-means the token vectors ``x`` ``(n, d)``, return the occupancy entropy (bits).

    At most ``max_tokens`` rows are clustered (seeded subsample, see :func:`subsample`); the result lies
    in ``[0, log2 min(k, n)]``. NaN when ``x`` has no rows.
    """
    if x.ndim != 2:
        raise ValueError(f"kmeans_entropy: expected (n, d), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        return float("nan")
    x = subsample(x, max_tokens, seed)
    res = kmeans(x, k, seed=seed, n_init=n_init, max_iter=max_iter, tol=tol)
    return occupancy_entropy(res.labels, res.centers.shape[0])
