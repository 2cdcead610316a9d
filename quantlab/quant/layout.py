"""Stored tensors as data: the shape and element size of each tensor a format writes for one Linear.

The export formats' cost model (:mod:`quantlab.plan.cost`) and the backends that bring a storage of their
own (BiLLM's bit planes) both describe storage this way, so a byte count is never written twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

INT32, INT64, FP16, UINT8 = 4, 8, 2, 1


@dataclass(frozen=True)
class TensorSpec:
    """Shape and element size of one stored tensor."""

    shape: tuple[int, ...]
    itemsize: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


Layout = dict[str, TensorSpec]


def n_groups(in_features: int, group_size: int, *, where: str = "") -> int:
    """Groups along the input of a Linear (``-1``: one, per channel); a size that does not divide is refused."""
    if group_size == -1:
        return 1
    if in_features % group_size:
        raise ValueError(f"{where}group_size {group_size} does not divide in_features {in_features}")
    return in_features // group_size
