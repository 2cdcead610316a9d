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
