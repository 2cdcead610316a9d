"""Where decoder blocks compute.

The model lives on the CPU (or the meta device, when streamed); with a compute device, the executor
moves one decoder block and one sample's inputs at a time onto it, so calibration statistics, Hessians
and the solvers run there while host memory keeps everything else. Results come back to the CPU.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

SUPPORTED = ("cpu", "cuda")


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """``None`` (compute where the weights are) or a checked :class:`torch.device`.

    Raises:
        ValueError: naming the value, when it is not a device string, not a supported type, or a CUDA
            device this machine does not have.
    """
    if device is None:
        return None
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r}: not a torch device ({e}); expected one of 'cpu', 'cuda', "
                         "'cuda:N'") from None
    if d.type not in SUPPORTED:
        raise ValueError(f"device {device!r}: quantlab computes on {' or '.join(SUPPORTED)} only")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available to this torch ({torch.__version__}); "
                             "use device 'cpu' or install a CUDA build of torch")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return d


@contextmanager
def placed(modules: Sequence[nn.Module], device: torch.device | None) -> Iterator[None]:
    """``modules`` on ``device`` for the duration, then back where each one was (a no-op for None)."""
    if device is None:
        yield
        return
    homes = [next(m.parameters()).device for m in modules]
    try:
        for m in modules:
            m.to(device)
        yield
    finally:
        for m, home in zip(modules, homes):
            m.to(home)


# CPU feature flags (/proc/cpuinfo: x86 "flags", aarch64 "Features") under which torch's 16-bit matmuls run
# on native instructions; without them they are emulated and far slower than float32 (measured on this
# project's AVX2 machine: bf16 F.linear 7 GFLOPS, float32 55; eval/RESULTS.md, "Full-size streamed pipeline")
NATIVE_HALF_FLAGS = {torch.bfloat16: ("amx_bf16", "avx512_bf16", "bf16"),
                     torch.float16: ("amx_fp16", "avx512_fp16", "fphp")}


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (empty when /proc/cpuinfo cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def compute_dtype(stored: torch.dtype, device: str | torch.device | None,
                  flags: frozenset[str] | None = None) -> torch.dtype:
    """The dtype a streamed block computes in: its stored dtype, except a 16-bit float on a CPU without
    instructions for it, which computes in float32 (a block's weights at twice the bytes, a block at a time).

    ``device``: where blocks compute (None: the CPU). ``flags``: the CPU's (default :func:`cpu_flags`).
    """
    if stored not in NATIVE_HALF_FLAGS or (device is not None and torch.device(device).type != "cpu"):
        return stored
    flags = cpu_flags() if flags is None else flags
    return stored if any(f in flags for f in NATIVE_HALF_FLAGS[stored]) else torch.float32
