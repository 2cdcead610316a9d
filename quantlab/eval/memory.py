"""Memory of a model three ways: predicted by the cost model, stored on disk, and measured at run time.

| measure    | function             | what it counts                                                         |
|------------|----------------------|------------------------------------------------------------------------|
| predicted  | :func:`predicted_bytes` | :func:`quantlab.plan.cost.model_size` of a mapping/plan in a format  |
| on disk    | :func:`disk_bytes`   | tensor bytes of every ``*.safetensors`` (from the headers), file sizes  |
| run time   | :func:`runtime_peak_rss` | peak RSS of a fresh interpreter that loads the model and generates |
| fits       | :func:`fits`         | ``weights + kv_cache_bytes + activation_bytes <= budget``               |

Run-time RSS includes the interpreter and its libraries (torch alone is a few hundred MiB):
:func:`measure_runtime` also reports the RSS right after the imports, so ``peak - import`` is the model's
share. Budgets are in GiB (``2**30`` bytes), like :attr:`quantlab.plan.cost.SizeReport.gib`.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from quantlab.models.adapter import Adapter
from quantlab.plan.context import activation_bytes, kv_cache_bytes
from quantlab.plan.cost import model_size

GIB = 2**30
MIB = 2**20


def predicted_bytes(model: nn.Module, adapter: Adapter, mapping: Any, fmt: str, *,
                    dtype_bytes: int | None = None) -> int:
    """Stored bytes the cost model predicts for ``model`` under ``mapping`` (a Plan or ``{name: scheme}``).

    A thin wrapper over :func:`quantlab.plan.cost.model_size` (``.total_bytes``); an empty mapping gives
    the unquantized model's size.
    """
    return model_size(model, adapter, mapping, fmt, dtype_bytes=dtype_bytes).total_bytes


@dataclass(frozen=True)
class DiskSize:
    """What a checkpoint directory holds: tensor bytes in its safetensors, and file sizes."""

    tensor_bytes: int  # sum of every tensor's byte range, read from the safetensors headers
    safetensors_file_bytes: int  # sizes of the *.safetensors files (tensors + headers)
    total_file_bytes: int  # every file under the directory (configs, tokenizer, ...)
    n_safetensors: int


def safetensors_tensor_bytes(path: str | Path) -> int:
    """Sum of tensor byte ranges declared in one safetensors file's header (tensors are not read).

    The header is what ``safe_open`` parses: an 8-byte little-endian length, then JSON mapping each
    tensor to ``{dtype, shape, data_offsets: [begin, end]}``.

    Raises:
        ValueError: if the file is not a valid safetensors file.
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a safetensors file (unreadable JSON header)") from e
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")


def gguf_tensor_bytes(path: str | Path) -> int:
    """Bytes of the tensor data in a GGUF file (quantized blocks included), from its header."""
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)


def disk_bytes(directory: str | Path) -> DiskSize:
    """Tensor bytes and file sizes of a checkpoint directory (searched recursively).

    Raises:
        FileNotFoundError: if ``directory`` is not a directory.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"directory not found: {directory}")
    files = [p for p in directory.rglob("*") if p.is_file()]
    st = [p for p in files if p.suffix == ".safetensors"]
    return DiskSize(tensor_bytes=sum(safetensors_tensor_bytes(p) for p in st) + sum(map(gguf_tensor_bytes,
                                                                                      (p for p in files if p.suffix == ".gguf"))),
                    safetensors_file_bytes=sum(p.stat().st_size for p in st),
                    total_file_bytes=sum(p.stat().st_size for p in files), n_safetensors=len(st))


# The measuring child: load like `quantlab eval` does, run one generate (or forward) on a tiny input.


@dataclass(frozen=True)
class RuntimeMemory:
    """Peak RSS (bytes) of the measuring process after imports, after loading, and overall; with a CUDA
    device, the peak of memory allocated on it (torch's allocator: weights and activations, not the
    CUDA context)."""

    import_rss: int
    loaded_rss: int
    peak_rss: int
    device_peak: int | None = None


def measure_runtime(model_dir_or_alias: str | Path, *, generate: bool = True, dtype: str = "auto",
                    timeout: float = 1800.0, device: str | None = None) -> RuntimeMemory:
    """Load a model in a fresh Python process, run one generate (or forward) on a tiny input, report RSS.

    Directories load with ``AutoModelForImageTextToText.from_pretrained`` (quantlab-native checkpoints with
    ``load_native``); aliases and hub ids with :func:`quantlab.models.load.load_model`. With a CUDA
    ``device``, the model and the input are moved there and the device's peak allocation is reported too.

    Raises:
        RuntimeError: if the child process fails (its stderr tail is included).
    """
    cmd = [sys.executable, "-m", "quantlab.eval.measure_child", str(model_dir_or_alias), "1" if generate else "0",
           dtype, str(device or "cpu")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("QUANTLAB_RSS ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"measuring {model_dir_or_alias} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-2000:]}")
    return RuntimeMemory(**json.loads(line.removeprefix("QUANTLAB_RSS ")))


def runtime_peak_rss(model_dir_or_alias: str | Path, *, generate: bool = True, dtype: str = "auto") -> int:
    """Peak RSS in bytes of loading ``model_dir_or_alias`` plus one generate/forward, in a subprocess."""
    return measure_runtime(model_dir_or_alias, generate=generate, dtype=dtype).peak_rss


def _need(config: Any, weights_bytes: int, images: int, text_tokens: int, batch: int, kv_dtype_bytes: int,
          image_hw: tuple[int, int] | None) -> tuple[int, int, int]:
    kv = kv_cache_bytes(config, images=images, text_tokens=text_tokens, batch=batch, dtype_bytes=kv_dtype_bytes,
                        image_hw=image_hw)
    act = activation_bytes(config, images=images, text_tokens=text_tokens, batch=batch,
                           dtype_bytes=kv_dtype_bytes, image_hw=image_hw)
    return kv, act, weights_bytes + kv + act


def _max_images(config: Any, budget: int, weights_bytes: int, text_tokens: int, batch: int, kv_dtype_bytes: int,
                image_hw: tuple[int, int] | None, cap: int = 1 << 20) -> int:
    """Largest image count that fits (the need grows with images): doubling, then bisection."""
    def ok(k: int) -> bool:
        return _need(config, weights_bytes, k, text_tokens, batch, kv_dtype_bytes, image_hw)[2] <= budget
    if not ok(0):
        return -1
    hi = 1
    while hi < cap and ok(hi):
        hi *= 2
    if ok(hi):
        return hi
    lo = hi // 2  # ok(lo) holds, ok(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def fits(config: Any, budget_gb: float, images: int, text_tokens: int, weights_bytes: int, *, batch: int = 1,
         kv_dtype_bytes: int = 2, image_hw: tuple[int, int] | None = None) -> dict[str, Any]:
    """Does the model fit in ``budget_gb`` GiB with ``images`` images and ``text_tokens`` text tokens?

    ``need = weights_bytes + kv_cache_bytes + activation_bytes`` (see :mod:`quantlab.plan.context`).

    Returns:
        ``{"fits", "budget_bytes", "weights_bytes", "kv_cache_bytes", "activation_bytes", "total_bytes",
        "headroom_bytes", "images", "text_tokens", "batch", "max_images"}``; ``max_images`` is the most
        images that fit with the same text (-1 when not even a text-only context fits).
    """
    if budget_gb <= 0 or images < 0 or text_tokens < 0 or weights_bytes < 0:
        raise ValueError("fits: budget_gb must be > 0 and images, text_tokens, weights_bytes >= 0")
    budget = int(budget_gb * GIB)
    kv, act, total = _need(config, weights_bytes, images, text_tokens, batch, kv_dtype_bytes, image_hw)
    return {"fits": total <= budget, "budget_bytes": budget, "weights_bytes": weights_bytes, "kv_cache_bytes": kv,
            "activation_bytes": act, "total_bytes": total, "headroom_bytes": budget - total, "images": images,
            "text_tokens": text_tokens, "batch": batch,
            "max_images": _max_images(config, budget, weights_bytes, text_tokens, batch, kv_dtype_bytes, image_hw)}


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MIB:,.2f} MiB"


@dataclass(frozen=True)
class MemoryReport:
    """One model's memory: predicted, on disk, at run time (bytes; ``None`` = not measured), and ``fits``."""

    label: str
    predicted_bytes: int | None = None
    disk_tensor_bytes: int | None = None
    disk_file_bytes: int | None = None
    runtime_peak_bytes: int | None = None
    runtime_import_bytes: int | None = None
    fits: dict[str, Any] | None = None
    runtime_device_peak_bytes: int | None = None
    runtime_note: str | None = None  # why run-time memory was not measured

    ROWS = (("predicted (cost model)", "predicted_bytes"), ("on disk: tensors", "disk_tensor_bytes"),
            ("on disk: files", "disk_file_bytes"), ("run time: peak RSS", "runtime_peak_bytes"),
            ("run time: RSS after imports", "runtime_import_bytes"),
            ("run time: peak GPU memory (allocated)", "runtime_device_peak_bytes"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemoryReport:
        return cls(**data)

    def table(self) -> str:
        """A plain-text table of the measures (MiB), plus the fit verdict when there is one."""
        width = max(len(r) for r, _ in self.ROWS)
        lines = [f"memory: {self.label}"] + [f"  {r:<{width}}  {_mib(getattr(self, a)):>16}" for r, a in self.ROWS]
        if self.fits is not None:
            f = self.fits
            lines.append(f"  fits in {f['budget_bytes'] / GIB:g} GiB with {f['images']} image(s), {f['text_tokens']} "
                         f"text tokens: {'yes' if f['fits'] else 'no'} (need {_mib(f['total_bytes'])}; "
                         f"max images {f['max_images']})")
        return "\n".join(lines)


def memory_report(label: str, *, predicted: int | None = None, directory: str | Path | None = None,
                  runtime_source: str | Path | None = None, generate: bool = True,
                  fits_result: dict[str, Any] | None = None, device: str | None = None,
                  runtime_note: str | None = None) -> MemoryReport:
    """Gather a :class:`MemoryReport`: disk sizes of ``directory`` and run-time memory of ``runtime_source``
    (host RSS; with a CUDA ``device``, also the device's peak allocation); ``runtime_note`` says why there is
    no ``runtime_source``."""
    disk = disk_bytes(directory) if directory is not None else None
    rt = measure_runtime(runtime_source, generate=generate, device=device) if runtime_source is not None else None
    return MemoryReport(label=label, predicted_bytes=predicted,
                        disk_tensor_bytes=disk.tensor_bytes if disk else None,
                        disk_file_bytes=disk.total_file_bytes if disk else None,
                        runtime_peak_bytes=rt.peak_rss if rt else None,
                        runtime_import_bytes=rt.import_rss if rt else None, fits=fits_result,
                        runtime_device_peak_bytes=rt.device_peak if rt else None, runtime_note=runtime_note)
