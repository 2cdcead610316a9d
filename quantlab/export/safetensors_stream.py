"""A safetensors file written one tensor at a time, without holding its tensors in memory.

``safetensors.torch.save_file`` takes the whole dict at once and builds the file in memory: an export shard
of 512 MiB costs that much again, and a single 0.6 GB embedding cast from bf16 to fp16 three times its size.
The format (https://huggingface.co/docs/safetensors, "Format") is an 8-byte little-endian header length, a
JSON header (``__metadata__`` and, per tensor, ``dtype``, ``shape`` and ``data_offsets`` into the byte buffer
that follows, which has no holes), space-padded to a multiple of 8 bytes, then the tensors' bytes.

:class:`SafetensorsWriter` writes each tensor's bytes to a side file as it arrives (cast to the target dtype a
slice at a time), then assembles the file in the order ``save_file`` uses, copying the bytes from the side
file in slices: the result is byte-for-byte what ``save_file`` writes for the same tensors
(``tests/test_export_shards.py``), and the memory it needs is one slice.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import torch
from torch import Tensor

# The format's dtype names. safetensors orders a file's tensors by dtype, from the last of this list to the
# first (its Rust ``Dtype`` enum order, descending: wider types first, which keeps every tensor aligned), and
# by name within a dtype.
DTYPES: dict[torch.dtype, str] = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.uint16: "U16", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32", torch.float64: "F64",
    torch.int64: "I64", torch.uint64: "U64",
}
_RANK = {name: i for i, name in enumerate(DTYPES.values())}
SLICE_BYTES = 16 << 20  # what is converted or copied at once


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # in the side file
    nbytes: int


def tensor_bytes(t: Tensor, dtype: torch.dtype | None = None) -> int:
    """Bytes ``t`` takes in a file, written as ``dtype`` (default its own)."""
    return t.numel() * torch.empty(0, dtype=dtype or t.dtype).element_size()


class SafetensorsWriter:
    """Write ``path`` tensor by tensor (:meth:`add`); :meth:`close` (or leaving the ``with`` block) finishes
    it. Leaving the block on an error removes the partial files."""

    def __init__(self, path: str | Path, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.metadata = metadata
        self._side_path = self.path.with_name(self.path.name + ".data")
        self._side = open(self._side_path, "w+b")  # noqa: SIM115 - closed in close()/abort()
        self._entries: dict[str, _Entry] = {}
        self.nbytes = 0

    def add(self, name: str, tensor: Tensor, dtype: torch.dtype | None = None) -> None:
        """Append ``tensor`` (cast to ``dtype`` if given), a slice at a time."""
        if name in self._entries:
            raise ValueError(f"{self.path.name}: tensor {name} written twice")
        dtype = dtype or tensor.dtype
        if dtype not in DTYPES:
            raise ValueError(f"{self.path.name}: {name} has dtype {dtype}, which safetensors does not store")
        flat = tensor.detach().reshape(-1)  # a view for the contiguous tensors state dicts hold
        per_slice = max(1, SLICE_BYTES // max(flat.element_size(), torch.empty(0, dtype=dtype).element_size()))
        start = self._side.tell()
        for part in flat.split(per_slice):
            part = part.to("cpu", dtype).contiguous()
            self._side.write(memoryview(part.view(torch.uint8).numpy()))
        nbytes = self._side.tell() - start
        self._entries[name] = _Entry(name, DTYPES[dtype], tuple(tensor.shape), start, nbytes)
        self.nbytes += nbytes

    def close(self) -> Path:
        """Write the header and the tensors in safetensors' order; remove the side file."""
        order = sorted(self._entries.values(), key=lambda e: (-_RANK[e.dtype], e.name))
        header: dict[str, object] = {} if self.metadata is None else {"__metadata__": self.metadata}
        offset = 0
        for e in order:
            header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)
        side = self._side
        side.flush()
        with open(self.path, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for e in order:
                side.seek(e.start)
                left = e.nbytes
                while left:
                    chunk = side.read(min(left, SLICE_BYTES))
                    f.write(chunk)
                    left -= len(chunk)
        self._drop_side()
        return self.path

    def abort(self) -> None:
        """Remove the side file and whatever was written."""
        self._drop_side()
        self.path.unlink(missing_ok=True)

    def _drop_side(self) -> None:
        self._side.close()
        if self._side_path.exists():
            os.unlink(self._side_path)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()
