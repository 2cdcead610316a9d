"""Planners: pure functions from data (names, entropies, damages, costs) to ``{name: scheme | None}``.

| planner   | input                                       | decision                                           |
|-----------|---------------------------------------------|----------------------------------------------------|
| uniform   | Linear names, one scheme, pin rules         | the same scheme everywhere except where pinned      |
| luq       | entropy per decoder block, k, low/high      | the k lowest-entropy blocks low, the rest high      |
| budget    | damage and bytes per (unit, candidate)      | min total damage s.t. total bytes <= budget (MILP) |

Helpers: :func:`k_for_budget` (LUQ's k from a byte budget or a nominal-bit target) and :func:`luq_search`
(binary search on k against a quality threshold), :func:`fused_groups` (units vLLM fuses).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import lil_matrix, vstack

from quantlab.models.adapter import Adapter
from quantlab.plan.cost import nominal_bits
from quantlab.plan.plan import Rule, apply_rules
from quantlab.quant.scheme import QuantScheme

LayerMap = dict[str, QuantScheme | None]


def uniform(linears: Iterable[str], scheme: QuantScheme | None, rules: Sequence[Rule | Mapping[str, Any]] = (),
            *, adapter: Adapter | None = None) -> LayerMap:
    """Every Linear gets ``scheme`` unless a rule pins it (first match wins; see ``apply_rules``)."""
    names = list(linears)
    pinned = apply_rules(names, rules, adapter)
    return {n: pinned[n] if n in pinned else scheme for n in names}


BlockKey = int | tuple[str, int]  # a decoder block's index, or ("vision", index) for a vision-tower block


def block_sort_key(b: BlockKey) -> tuple:
    """Decoder blocks by index, then vision blocks by index (keys of both kinds in one ordering)."""
    return (1, b) if isinstance(b, tuple) else (0, ("", b))


def luq_order(block_entropy: Mapping[BlockKey, float]) -> list[BlockKey]:
    """Blocks by ascending entropy (ties: decoder before vision, lower index first), LUQ's fixed order
    (docs/method.md#block-order)."""
    return sorted(block_entropy, key=lambda b: (block_entropy[b], block_sort_key(b)))


def luq(block_entropy: Mapping[BlockKey, float], k: int, low: QuantScheme, high: QuantScheme,
        block_linears: Mapping[BlockKey, Sequence[str]]) -> LayerMap:
    """LUQ: the ``k`` lowest-entropy decoder blocks get ``low``, the others ``high``; whole blocks move.

    Args:
        block_entropy: entropy of each decoder block's output, ``{block index: bits}``.
        k: number of low-precision blocks, ``0 <= k <= len(block_entropy)``.
        low: scheme of the low-entropy blocks (e.g. BiLLM).
        high: scheme of the other blocks (e.g. GPTQ W4 g128).
        block_linears: Linear names of each block (every block of ``block_entropy`` must be present).
    """
    if not 0 <= k <= len(block_entropy):
        raise ValueError(f"k={k} outside [0, {len(block_entropy)}] (number of blocks)")
    missing = sorted(set(block_entropy) - set(block_linears))
    if missing:
        raise ValueError(f"no Linear names given for blocks {missing}")
    lows = set(luq_order(block_entropy)[:k])
    return {n: (low if b in lows else high) for b in sorted(block_entropy, key=block_sort_key)
            for n in block_linears[b]}


def k_for_budget(order: Sequence[int], low_bytes: Mapping[int, int], high_bytes: Mapping[int, int], *,
                 fixed_bytes: int = 0, budget_bytes: int | None = None, block_numel: Mapping[int, int] | None = None,
                 low: QuantScheme | None = None, high: QuantScheme | None = None,
                 target_bits: float | None = None) -> int:
    """The smallest ``k`` (fewest low-precision blocks, so the best expected quality) that meets the targets.

    Bytes for ``k``: ``fixed_bytes + Σ low_bytes[first k of order] + Σ high_bytes[rest]``. Nominal bits for
    ``k`` (LUQ, docs/method.md#nominal-bits): ``Σ bits·numel / Σ numel`` with ``nominal_bits(low|high)`` per block.

    Args:
        order: blocks in LUQ order (:func:`luq_order`).
        low_bytes, high_bytes: stored bytes of each block under the low / high scheme.
        fixed_bytes: bytes outside the decoder blocks.
        budget_bytes: require total bytes <= this.
        block_numel, low, high, target_bits: require nominal avg bits <= ``target_bits``.

    Raises:
        ValueError: no target given, or even ``k = len(order)`` misses it (the message gives the minimum).
    """
    if budget_bytes is None and target_bits is None:
        raise ValueError("give budget_bytes and/or target_bits")
    if target_bits is not None and (block_numel is None or low is None or high is None):
        raise ValueError("target_bits needs block_numel, low and high")
    total_numel = sum(block_numel[b] for b in order) if block_numel else 0

    def size(k: int) -> int:
        return fixed_bytes + sum(low_bytes[b] for b in order[:k]) + sum(high_bytes[b] for b in order[k:])

    def bits(k: int) -> float:
        lo, hi = nominal_bits(low), nominal_bits(high)
        return sum((lo if i < k else hi) * block_numel[b] for i, b in enumerate(order)) / total_numel

    for k in range(len(order) + 1):
        if (budget_bytes is None or size(k) <= budget_bytes) and (target_bits is None or bits(k) <= target_bits):
            return k
    n = len(order)
    raise ValueError(f"infeasible: with all {n} blocks low the plan takes {size(n)} bytes"
                     + (f" and {bits(n):.4f} nominal bits" if target_bits is not None else "")
                     + f" (budget_bytes={budget_bytes}, target_bits={target_bits})")


def luq_search(order: Sequence[int], evaluate: Callable[[int], float], threshold: float, lo: int = 0,
               hi: int | None = None) -> tuple[int | None, list[tuple[int, float]]]:
    """Binary search for the largest ``k`` in [lo, hi] whose quality ``evaluate(k) >= threshold``.

    Assumes quality does not increase with ``k`` (LUQ's premise; it may not hold, see docs/method.md#choosing-k,
    hence every probe is returned for inspection). Each ``k`` is evaluated at most once.

    Args:
        order: LUQ block order; only its length (the default ``hi``) is used, ``evaluate`` closes over it.
        evaluate: builds/evaluates the model with the first ``k`` blocks of ``order`` low; higher is better.
        threshold: minimum acceptable score.
        lo, hi: search range (``hi`` defaults to ``len(order)``).

    Returns:
        ``(k, probes)``: k is None when no probed k passes (then even ``lo`` failed); probes are the
        ``(k, score)`` pairs in evaluation order.
    """
    hi = len(order) if hi is None else hi
    if not 0 <= lo <= hi <= len(order):
        raise ValueError(f"need 0 <= lo <= hi <= {len(order)}, got lo={lo}, hi={hi}")
    probes: list[tuple[int, float]] = []
    best, a, b = None, lo, hi
    while a <= b:
        mid = (a + b + 1) // 2
        score = float(evaluate(mid))
        probes.append((mid, score))
        if score >= threshold:
            best, a = mid, mid + 1
        else:
            b = mid - 1
    return best, probes


def fused_groups(names: Iterable[str], adapter: Adapter) -> list[tuple[str, ...]]:
    """Groups of Linear names that vLLM fuses (q/k/v, gate/up per block), from ``adapter.fused_groups``."""
    names = list(names)
    groups = []
    for suffixes in adapter.fused_groups:
        by_prefix: dict[str, list[str]] = {}
        for n in names:
            for s in suffixes:
                if n.endswith("." + s):
                    by_prefix.setdefault(n[: -len(s) - 1], []).append(n)
        groups += [tuple(g) for g in by_prefix.values() if len(g) > 1]
    return groups


@dataclass(frozen=True)
class BudgetChoice:
    """Solution of :func:`budget`."""

    choice: dict[Hashable, str]  # unit -> candidate label
    objective: float  # total damage
    total_bytes: int


def budget(units: Sequence[Hashable], candidates: Sequence[str], damage: Mapping[tuple[Hashable, str], float],
           cost: Mapping[tuple[Hashable, str], int], budget_bytes: int,
           groups: Sequence[Sequence[Hashable]] = ()) -> BudgetChoice:
    """Exact multiple-choice knapsack as an integer program (``scipy.optimize.milp``, HiGHS, gap 0).

    One binary ``x[u, c]`` per unit and candidate; ``Σ_c x[u, c] = 1``; ``Σ cost·x <= budget_bytes``;
    minimise ``Σ damage·x``. Units in one group pick the same candidate (``x[u, c] = x[v, c]``), as vLLM's
    fused q/k/v and gate/up need. A (unit, candidate) pair missing from ``cost`` is not allowed.

    Args:
        units: what gets a scheme (Linear names, blocks, ...).
        candidates: candidate labels (e.g. ``QuantScheme.label()``, "fp").
        damage: ``{(unit, label): damage}`` for every pair in ``cost``.
        cost: ``{(unit, label): bytes}``.
        budget_bytes: byte budget for the units.
        groups: units tied to one candidate.

    Raises:
        ValueError: a unit with no allowed candidate, a costed pair without damage, a group unit not in
            ``units``, or an infeasible budget (the message names the minimum achievable bytes).
    """
    units, cands = list(units), list(candidates)
    index = {u: i for i, u in enumerate(units)}
    bad = [u for g in groups for u in g if u not in index]
    if bad:
        raise ValueError(f"group members not in units: {bad[:5]}")
    pairs = [(u, c) for u in units for c in cands if (u, c) in cost]
    var = {p: i for i, p in enumerate(pairs)}
    undamaged = [p for p in pairs if p not in damage]
    if undamaged:
        raise ValueError(f"{len(undamaged)} (unit, candidate) pairs have a cost but no damage: {undamaged[:5]}")
    lonely = [u for u in units if not any((u, c) in var for c in cands)]
    if lonely:
        raise ValueError(f"units with no candidate in cost: {lonely[:5]}")
    floor = _min_bytes(units, cands, cost, groups)
    if floor > budget_bytes:
        raise ValueError(f"budget {budget_bytes} bytes is infeasible: the minimum achievable is {floor} bytes")

    n = len(pairs)
    onehot = lil_matrix((len(units), n))  # [units, vars]: each unit picks exactly one candidate
    for (u, _), i in var.items():
        onehot[index[u], i] = 1
    weight = lil_matrix(np.array([[float(cost[p]) for p in pairs]]))  # [1, vars]: total bytes
    ties = [(g[0], v, c) for g in groups for v in g[1:] for c in cands]
    tie = lil_matrix((len(ties), n))  # [ties, vars]: x[u, c] - x[v, c] = 0
    for r, (u, v, c) in enumerate(ties):
        if (u, c) in var:
            tie[r, var[u, c]] = 1
        if (v, c) in var:
            tie[r, var[v, c]] = -1
    A = vstack([onehot, weight, tie]).tocsr()
    lb = np.concatenate([np.ones(len(units)), [-np.inf], np.zeros(len(ties))])
    ub = np.concatenate([np.ones(len(units)), [float(budget_bytes)], np.zeros(len(ties))])
    res = milp(c=np.array([float(damage[p]) for p in pairs]),
               constraints=LinearConstraint(A, lb, ub),
               integrality=np.ones(n), bounds=Bounds(0, 1), options={"mip_rel_gap": 0.0})
    if res.x is None:
        raise ValueError(f"no solution for budget {budget_bytes} bytes ({res.message}); minimum is {floor}")
    x = np.round(res.x).astype(bool)
    choice = {u: c for (u, c), i in var.items() if x[i]}
    total = sum(cost[u, c] for u, c in choice.items())
    if len(choice) != len(units) or total > budget_bytes:
        raise RuntimeError(f"MILP returned an invalid choice ({len(choice)}/{len(units)} units, {total} bytes "
                           f"> budget {budget_bytes}?): {res.message}")
    return BudgetChoice(choice=choice, objective=float(sum(damage[u, c] for u, c in choice.items())),
                        total_bytes=int(total))


def _min_bytes(units: Sequence[Hashable], cands: Sequence[str], cost: Mapping[tuple[Hashable, str], int],
               groups: Sequence[Sequence[Hashable]]) -> float:
    """Smallest achievable total bytes honouring the ties (inf if a group has no common candidate)."""
    tied = {u for g in groups for u in g}
    total = sum(min(cost[u, c] for c in cands if (u, c) in cost) for u in units if u not in tied)
    for comp in _merge(groups):
        opts = [sum(cost[u, c] for u in comp) for c in cands if all((u, c) in cost for u in comp)]
        total += min(opts) if opts else float("inf")
    return total


def _merge(groups: Sequence[Sequence[Hashable]]) -> list[set[Hashable]]:
    """Connected components of overlapping groups."""
    comps: list[set[Hashable]] = []
    for g in groups:
        g = set(g)
        hit = [c for c in comps if c & g]
        for c in hit:
            g |= c
            comps.remove(c)
        comps.append(g)
    return comps

