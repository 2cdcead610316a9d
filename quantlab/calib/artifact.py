"""The calibration artifact: per-block and per-Linear statistics by modality, saved as safetensors + JSON.

On disk (a directory, written atomically: into a temporary sibling, then renamed):

| file                | content                                                                                 |
|---------------------|-----------------------------------------------------------------------------------------|
| ``stats.safetensors`` | ``block/{i}/{modality}/{field}`` and ``linear/{name}/{modality}/{field}`` for the       |
|                     | per-channel fields (``mean_sq``, ``mean_abs``, ``chan_absmax``, float32 ``(c,)``);        |
|                     | ``hessian/{name}`` (float32 ``(in, in)``, plain sum ``Σ w_t x_t x_tᵀ``) when collected    |
| ``summary.json``    | ``meta`` (model source, sample and token counts incl. image/text and skipped samples,    |
|                     | options), ``blocks`` / ``linears`` scalars (``tokens``, entropies, variance, kurtosis,   |
|                     | absmax, outlier share; NaN written as null), ``hessian_weight`` (``Σ w_t`` per Linear);  |
|                     | ``meta.modality_gradient_ratio`` (per block, MBQ's image / text ratio) when measured     |
| (stats.safetensors) | ``vision_block/{i}/{modality}/{field}``: vision block ``i``'s LUQ tensor (its pre-attention    |
|                     | norm's output), and vision/projector Linears under ``linear/`` and ``hessian/`` beside    |
|                     | the decoder's, when calibrated with ``vision`` (``summary.json``: ``vision_blocks``)        |
| (stats.safetensors) | ``importance/{i}/{sample id}``: each token's gradient saliency at block ``i``'s input     |
|                     | (float32 ``(seq,)``, ``token_weight: gradient``) when measured                           |

``block/{i}`` is the LUQ tensor of decoder block ``i`` (``meta.luq_tensor`` says which one). Loading reads
only these two files (no pickle).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from quantlab.calib.stats import MODALITIES, TensorStats
from quantlab.core.errors import NotOurs
from quantlab.core.files import write_dir_atomic

STATS_FILE = "stats.safetensors"
SUMMARY_FILE = "summary.json"
ENTROPY_KINDS = ("kmeans", "hist")
IMPORTANCE = "importance/"  # key prefix of the token saliencies: importance/{block}/{sample id}


def _json_float(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v


def _scalars_to_json(st: TensorStats) -> dict[str, Any]:
    return {k: _json_float(v) for k, v in st.scalars().items()}


def _stats_from(scalars: dict[str, Any], tensors: dict[str, torch.Tensor]) -> TensorStats:
    vals = {k: (float("nan") if v is None and k not in ("kmeans_entropy",) else v) for k, v in scalars.items()}
    return TensorStats(**vals, **tensors)


@dataclass
class CalibrationStats:
    """Statistics of one calibration pass.

    Attributes:
        blocks: ``{block index: {modality: TensorStats}}`` of each block's LUQ tensor.
        linears: ``{Linear full name: {modality: TensorStats}}`` of each decoder Linear's input (and of each
            vision-tower and projector Linear's, image tokens only, when calibrated with ``vision``).
        hessians: ``{Linear full name: Σ w_t x_t x_tᵀ}`` (float32) when collected.
        hessian_weight: ``{Linear full name: Σ w_t}``.
        meta: source, sample/token counts, options (see :func:`quantlab.calib.collect.calibrate`).
        token_importance: ``{block: {sample id: (seq,)}}`` gradient saliency of each token at the block's
            input (:func:`quantlab.calib.modality_grad.token_importance`) when measured.
        vision_blocks: ``{vision block index: {modality: TensorStats}}`` of each vision block's LUQ tensor
            (:mod:`quantlab.calib.vision`), when calibrated with ``vision``.
    """

    blocks: dict[int, dict[str, TensorStats]]
    linears: dict[str, dict[str, TensorStats]] = field(default_factory=dict)
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)
    hessian_weight: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    token_importance: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    vision_blocks: dict[int, dict[str, TensorStats]] = field(default_factory=dict)

    @classmethod
    def from_blocks(cls, blocks: dict, meta: dict[str, Any]) -> CalibrationStats:
        """Gather :class:`~quantlab.calib.collector.BlockStats` (by index) into one artifact."""
        out = cls({}, meta=dict(meta))
        for i in sorted(blocks):
            b = blocks[i]
            out.blocks[i] = dict(b.luq)
            out.linears.update(b.linears)
            out.hessians.update(b.hessians)
            out.hessian_weight.update(b.hessian_weight)
        return out

    # --- queries -------------------------------------------------------------------------------------

    def block_entropy(self, modality: str = "all", kind: str = "kmeans") -> dict[int, float]:
        """``{block: entropy in bits}`` of the LUQ tensor; ``kind`` is ``kmeans`` (LUQ) or ``hist``."""
        if modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
        if kind not in ENTROPY_KINDS:
            raise ValueError(f"unknown entropy kind {kind!r}; expected one of {ENTROPY_KINDS}")
        attr = "kmeans_entropy" if kind == "kmeans" else "hist_entropy"
        out = {i: getattr(per[modality], attr) for i, per in self.blocks.items() if modality in per}
        out = {i: float(v) for i, v in out.items() if v is not None}
        if not out:
            raise ValueError(f"no {kind} entropy for modality {modality!r} (no such tokens, or entropy was off)")
        return out

    def vision_block_entropy(self, kind: str = "kmeans") -> dict[int, float]:
        """``{vision block: entropy in bits}`` of its LUQ tensor (every token an image token); empty when the
        artifact has no vision statistics."""
        if kind not in ENTROPY_KINDS:
            raise ValueError(f"unknown entropy kind {kind!r}; expected one of {ENTROPY_KINDS}")
        attr = "kmeans_entropy" if kind == "kmeans" else "hist_entropy"
        out = {i: getattr(per["all"], attr) for i, per in self.vision_blocks.items() if "all" in per}
        return {i: float(v) for i, v in out.items() if v is not None}

    def block_linears(self) -> dict[int, list[str]]:
        """Linear full names of each decoder block (for the planners)."""
        prefix = self.meta.get("decoder_blocks", "")
        out: dict[int, list[str]] = {i: [] for i in self.blocks}
        for name in self.linears or self.hessians:
            if prefix and not name.startswith(prefix + "."):
                continue  # a vision-tower or projector Linear
            rest = name[len(prefix) + 1:] if prefix else name
            out.setdefault(int(rest.split(".")[0]), []).append(name)
        return out

    def mean_sq(self, name: str, modality: str = "all") -> torch.Tensor:
        """Per input channel ``E[x²]`` of Linear ``name``."""
        try:
            return self.linears[name][modality].mean_sq
        except KeyError as err:
            raise KeyError(f"no statistics for {name!r} / {modality!r}") from err

    def table(self, kind: str = "kmeans") -> list[dict[str, Any]]:
        """One row per block: entropies by modality, then the "all" scalars of the LUQ tensor."""
        attr = "kmeans_entropy" if kind == "kmeans" else "hist_entropy"
        rows = []
        for i in sorted(self.blocks):
            per = self.blocks[i]
            row: dict[str, Any] = {"block": i}
            for m in MODALITIES:
                row[f"H_{m}"] = getattr(per[m], attr) if m in per else None
            a = per.get("all")
            if a is not None:
                row.update(hist_all=a.hist_entropy, variance=a.variance, kurtosis=a.kurtosis, absmax=a.absmax,
                           outliers=a.outlier_share, tokens=a.tokens)
            rows.append(row)
        return rows

    # --- persistence ---------------------------------------------------------------------------------

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, per in self.blocks.items():
            for m, st in per.items():
                out.update({f"block/{i}/{m}/{k}": t.contiguous() for k, t in st.tensors().items()})
        for i, per in self.vision_blocks.items():
            for m, st in per.items():
                out.update({f"vision_block/{i}/{m}/{k}": t.contiguous() for k, t in st.tensors().items()})
        for name, per in self.linears.items():
            for m, st in per.items():
                out.update({f"linear/{name}/{m}/{k}": t.contiguous() for k, t in st.tensors().items()})
        for name, h in self.hessians.items():
            out[f"hessian/{name}"] = h.contiguous()
        for i, per in self.token_importance.items():
            out.update({f"{IMPORTANCE}{i}/{sid}": t.contiguous() for sid, t in per.items()})
        return out

    def _summary(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "blocks": {str(i): {m: _scalars_to_json(st) for m, st in per.items()} for i, per in self.blocks.items()},
            "linears": {n: {m: _scalars_to_json(st) for m, st in per.items()} for n, per in self.linears.items()},
            "hessian_weight": self.hessian_weight,
            **({"vision_blocks": {str(i): {m: _scalars_to_json(st) for m, st in per.items()}
                                  for i, per in self.vision_blocks.items()}} if self.vision_blocks else {}),
        }

    def save(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``stats.safetensors`` + ``summary.json`` into ``directory`` atomically.

        Raises:
            FileExistsError: ``directory`` exists and ``overwrite`` is False.
        """
        directory = Path(directory)
        if directory.exists() and not overwrite:
            raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it")
        if directory.exists() and not is_stats_dir(directory):
            raise NotOurs(f"{directory} exists and is not a statistics directory written by quantlab (it holds "
                            f"{sorted(p.name for p in directory.iterdir())[:5]}); quantlab replaces only its own",
                            "choose another directory")
        def build(tmp: Path) -> None:
            save_file(self._tensors(), str(tmp / STATS_FILE))
            (tmp / SUMMARY_FILE).write_text(json.dumps(self._summary(), indent=1, allow_nan=False) + "\n")

        write_dir_atomic(directory, build, overwrite=overwrite)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> CalibrationStats:
        """Read an artifact written by :meth:`save` (safetensors + JSON only)."""
        directory = Path(directory)
        for f in (STATS_FILE, SUMMARY_FILE):
            if not (directory / f).is_file():
                raise FileNotFoundError(f"{directory}: missing {f} (not a calibration artifact)")
        tensors = load_file(str(directory / STATS_FILE))
        summary = json.loads((directory / SUMMARY_FILE).read_text())

        def fields(prefix: str) -> dict[str, torch.Tensor]:
            return {k: tensors[f"{prefix}/{k}"] for k in TensorStats.TENSORS}

        blocks = {int(i): {m: _stats_from(sc, fields(f"block/{i}/{m}")) for m, sc in per.items()}
                  for i, per in summary["blocks"].items()}
        linears = {n: {m: _stats_from(sc, fields(f"linear/{n}/{m}")) for m, sc in per.items()}
                   for n, per in summary["linears"].items()}
        hweight = dict(summary.get("hessian_weight", {}))
        hessians = {n: tensors[f"hessian/{n}"] for n in hweight}  # in the order they were collected
        vision = {int(i): {m: _stats_from(sc, fields(f"vision_block/{i}/{m}")) for m, sc in per.items()}
                  for i, per in summary.get("vision_blocks", {}).items()}
        return cls(blocks, linears, hessians, hweight, summary["meta"],
                   _importance(tensors, tensors.__getitem__), vision)


def _importance(keys: Iterable[str], get: Callable[[str], torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """``{block: {sample id: tensor}}`` from the ``importance/{block}/{sample id}`` keys among ``keys``."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for k in keys:
        if k.startswith(IMPORTANCE):
            i, sid = k.removeprefix(IMPORTANCE).split("/", 1)
            out.setdefault(int(i), {})[sid] = get(k)
    return out


def load_token_importance(directory: str | Path) -> dict[int, dict[str, torch.Tensor]]:
    """``CalibrationStats.token_importance`` of an artifact, reading only those tensors (not its Hessians)."""
    from safetensors import safe_open

    with safe_open(str(Path(directory) / STATS_FILE), framework="pt") as f:
        return _importance(f.keys(), f.get_tensor)


STATS_DIR_FILES = (STATS_FILE, SUMMARY_FILE, "entropy.png")


def is_stats_dir(directory: str | Path) -> bool:
    """True when ``directory`` holds a statistics artifact and nothing else (so replacing it loses nothing)."""
    directory = Path(directory)
    if not directory.is_dir():
        return False
    names = {p.name for p in directory.iterdir()}
    return {STATS_FILE, SUMMARY_FILE} <= names and names <= set(STATS_DIR_FILES)
