"""What the calibration pass collects: :class:`CollectOptions` (written to ``summary.json``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from quantlab.calib.stats import MODALITIES

EntropyOn = Literal["block_input_norm", "block_output"]
ENTROPY_ON: tuple[str, ...] = ("block_input_norm", "block_output")


@dataclass(frozen=True)
class CollectOptions:
    """What the calibration pass collects (all fields are written to ``summary.json``).

    Attributes:
        entropy: run LUQ's k-means entropy per block and modality.
        entropy_on: which tensor is the LUQ tensor (module table).
        entropy_k: k-means clusters (LUQ: 100).
        max_tokens: reservoir size per modality for the LUQ tensor (k-means and histogram entropy).
        kmeans_n_init, kmeans_max_iter, kmeans_tol: see :func:`quantlab.calib.kmeans.kmeans`.
        linears: collect the statistics of every Linear's input.
        linear_max_tokens: reservoir size per modality for a Linear input's histogram entropy.
        hist_bins: histogram entropy bins.
        outlier_ratio: a channel is massive when its max|x| exceeds this × the median channel max|x|.
        entropy_modalities: which modalities get a k-means entropy (each costs one k-means per block).
        flush_tokens: pending tokens per tensor before their sums are computed (bounds the extra memory:
            about ``flush_tokens`` × the block's distinct Linear input widths, in the model dtype).
        hessians: accumulate ``H = Σ w_t x_t x_tᵀ`` (float32, plain sum) for every Linear.
        modality_weights: ``(image, text)`` token weights ``w_t`` of the Hessians.
        modality_gradients: measure MBQ's per-block gradient ratio (image / text tokens) with one backward pass
            per sample (:mod:`quantlab.calib.modality_grad`; in-memory models only), for ``image_weight: measured``.
        token_importance: measure each token's gradient saliency at every block's input (the same backward
            pass), for ``token_weight: gradient``.
        vision: also stream the image samples through the vision tower and projector
            (:mod:`quantlab.calib.vision`): their Linears' statistics and Hessians, the vision blocks' LUQ
            entropies (in-memory models only).
        seed: seeds the reservoirs and k-means.
    """

    entropy: bool = True
    entropy_on: EntropyOn = "block_input_norm"
    entropy_k: int = 100
    max_tokens: int = 4096
    kmeans_n_init: int = 1
    kmeans_max_iter: int = 300
    kmeans_tol: float = 1e-4
    linears: bool = True
    linear_max_tokens: int = 512
    entropy_modalities: tuple[str, ...] = MODALITIES
    flush_tokens: int = 2048
    hist_bins: int = 256
    outlier_ratio: float = 20.0
    hessians: bool = False
    modality_weights: tuple[float, float] = (1.0, 1.0)
    modality_gradients: bool = False
    token_importance: bool = False
    vision: bool = False
    seed: int = 42

    def __post_init__(self) -> None:
        if self.entropy_on not in ENTROPY_ON:
            raise ValueError(f"entropy_on={self.entropy_on!r}; expected one of {ENTROPY_ON}")
        if isinstance(self.modality_weights, Mapping):
            extra = set(self.modality_weights) - {"image", "text"}
            if extra:
                raise ValueError(f"modality_weights: unknown keys {sorted(extra)}; expected 'image', 'text'")
            w = (self.modality_weights.get("image", 1.0), self.modality_weights.get("text", 1.0))
            object.__setattr__(self, "modality_weights", w)
        w = tuple(float(v) for v in self.modality_weights)
        if len(w) != 2 or min(w) < 0:
            raise ValueError(f"modality_weights must be two non-negative numbers (image, text), got {w}")
        object.__setattr__(self, "modality_weights", w)
        mods = tuple(self.entropy_modalities)
        if not set(mods) <= set(MODALITIES):
            raise ValueError(f"entropy_modalities={mods}; expected a subset of {MODALITIES}")
        object.__setattr__(self, "entropy_modalities", mods)
        if self.linear_max_tokens > self.max_tokens:
            raise ValueError(f"linear_max_tokens ({self.linear_max_tokens}) must be <= max_tokens "
                             f"({self.max_tokens}): Linears reading the LUQ tensor use its reservoir")
        for name in ("flush_tokens", "entropy_k", "max_tokens", "kmeans_n_init", "kmeans_max_iter",
                     "linear_max_tokens", "hist_bins"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["modality_weights"] = {"image": self.modality_weights[0], "text": self.modality_weights[1]}
        d["entropy_modalities"] = list(self.entropy_modalities)
        for flag in ("modality_gradients", "token_importance", "vision"):
            if not d[flag]:  # absent when off: runs calibrated before it keep their fingerprints
                del d[flag]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CollectOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown calibration options {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**d)
