"""Save and load quantization results (``{module: QuantResult}``) as safetensors + JSON metadata.

Used for per-block checkpoints during quantization (resume after a kill) and by the native format.
Tensors are stored as ``<module>|<field>`` and ``<module>|extra|<key>``; scalars go to the safetensors
metadata as JSON. No pickle.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quantlab.core.files import write_file_atomic
from quantlab.quant.result import QuantResult

_TENSOR_FIELDS = ("codes", "scales", "zeros", "g_idx", "dequantized", "input_scales")


def results_to_tensors(results: Mapping[str, QuantResult], *, with_dequantized: bool = True
                       ) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Flatten results into a tensor dict and a per-module scalar dict."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for name, r in results.items():
        for f in _TENSOR_FIELDS:
            t = getattr(r, f)
            if t is not None and (with_dequantized or f != "dequantized"):
                tensors[f"{name}|{f}"] = t.contiguous()
        for k, t in r.extra.items():
            tensors[f"{name}|extra|{k}"] = t.contiguous()
        scalars[name] = {f.name: getattr(r, f.name) for f in fields(r)
                         if f.name not in _TENSOR_FIELDS and f.name != "extra"}
        scalars[name]["dequantized_dtype"] = str(r.dequantized.dtype).removeprefix("torch.")
    return tensors, scalars


def save_results(path: str | Path, results: Mapping[str, QuantResult], *, with_dequantized: bool = True) -> Path:
    """Write results atomically (temp file + rename); without the dense weights, :func:`load_results`
    recomputes them from the codes (bit for bit, see ``QuantResult.dequantize``)."""
    path = Path(path)
    tensors, scalars = results_to_tensors(results, with_dequantized=with_dequantized)
    return write_file_atomic(path, lambda tmp: save_file(tensors, str(tmp),
                                                         metadata={"quantlab_results": json.dumps(scalars)}))


def load_results(path: str | Path, *, dequantized: bool = True) -> dict[str, QuantResult]:
    """Read results written by :func:`save_results`.

    ``dequantized=False``: the dense weights are neither read nor recomputed; each result carries an empty
    tensor of its dtype there (what exports need: codes and scales; ``dequantize()`` rebuilds it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no quantization results here")
    tensors, scalars = read_results_file(path, dequantized=dequantized)
    return results_from_tensors(tensors, scalars, dequantized=dequantized)


def read_results_file(path: str | Path, *, dequantized: bool = True
                      ) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Tensors and scalars of a results file (safetensors with ``quantlab_results`` metadata)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if "quantlab_results" not in meta:
            raise ValueError(f"{path}: not a quantlab results file (no 'quantlab_results' metadata)")
        keys = [k for k in f.keys() if dequantized or not k.endswith("|dequantized")]
        return {k: f.get_tensor(k) for k in keys}, json.loads(meta["quantlab_results"])


def results_from_tensors(tensors: Mapping[str, torch.Tensor], scalars: Mapping[str, dict], *,
                         dequantized: bool = True) -> dict[str, QuantResult]:
    """Rebuild results; when ``dequantized`` was not stored it is recomputed from the codes (with
    ``dequantized=False`` it is left empty)."""
    out = {}
    for name, sc in scalars.items():
        sc = dict(sc)
        dtype = getattr(torch, sc.pop("dequantized_dtype", "float32"))
        extra = {k.split("|", 2)[2]: t for k, t in tensors.items() if k.startswith(f"{name}|extra|")}
        kw = {f: tensors.get(f"{name}|{f}") for f in _TENSOR_FIELDS}
        if not dequantized:
            out[name] = QuantResult(**sc, **(kw | {"dequantized": torch.empty(0, dtype=dtype)}), extra=extra)
        elif kw["dequantized"] is None:
            kw["dequantized"] = torch.empty(tuple(kw["codes"].shape), dtype=dtype)
            r = QuantResult(**sc, **kw, extra=extra)
            out[name] = dataclasses.replace(r, dequantized=r.dequantize())
        else:
            out[name] = QuantResult(**sc, **kw, extra=extra)
    return out


def read_input_scales(path: str | Path) -> dict[str, torch.Tensor]:
    """Module -> AWQ scales (``QuantResult.input_scales``) of a results file, reading only those tensors."""
    with safe_open(str(path), framework="pt") as f:
        return {k.rpartition("|")[0]: f.get_tensor(k) for k in f.keys() if k.endswith("|input_scales")}


def input_scales_of(results: Mapping[str, QuantResult]) -> dict[str, torch.Tensor]:
    """Module -> AWQ scales of every result that has them (a :class:`BlockResults` reads only those)."""
    if isinstance(results, BlockResults):
        return results.input_scales()
    return {n: r.input_scales for n, r in results.items() if r.input_scales is not None}


class BlockResults(Mapping[str, QuantResult]):
    """Results held in memory for some modules and on disk, one results file per block, for the rest.

    A streamed run keeps no block's codes in memory once the block is saved (a 3B decoder's codes are
    2.8 GB as uint8): the export and the report read them back here, one block at a time (the last
    block read is cached, so iterating in order reads every file once). Values come without their dense
    weights (see :func:`load_results` with ``dequantized=False``).
    """

    def __init__(self, resident: Mapping[str, QuantResult], block_of: Mapping[str, int],
                 read_block: Callable[[int], Mapping[str, QuantResult]],
                 read_scales: Callable[[int], Mapping[str, torch.Tensor]] | None = None):
        self._resident = dict(resident)
        self._block_of = dict(block_of)
        self._read = read_block
        self._read_scales = read_scales  # block -> its AWQ scales alone (else whole blocks are read)
        self._cached: tuple[int, Mapping[str, QuantResult]] | None = None

    def input_scales(self) -> dict[str, torch.Tensor]:
        """Module -> AWQ scales of every result that has them, one read per block."""
        out = {n: r.input_scales for n, r in self._resident.items() if r.input_scales is not None}
        for block in sorted(set(self._block_of.values())):
            if self._read_scales is not None:
                out.update(self._read_scales(block))
            else:
                out.update({n: r.input_scales for n, r in self._read(block).items() if r.input_scales is not None})
        return out

    def __getitem__(self, name: str) -> QuantResult:
        if name in self._resident:
            return self._resident[name]
        block = self._block_of[name]
        if self._cached is None or self._cached[0] != block:
            self._cached = None  # the previous block goes before the next is read
            self._cached = (block, self._read(block))
        return self._cached[1][name]

    def __iter__(self) -> Iterator[str]:
        yield from self._resident
        yield from self._block_of

    def __len__(self) -> int:
        return len(self._resident) + len(self._block_of)
