"""This process's resident memory on Linux: now, its peak, and the peak of a stretch of work.

``VmHWM`` in ``/proc/self/status`` is the kernel's high-water mark of the process's resident set; writing
``5`` to ``/proc/self/clear_refs`` resets it to the current RSS (proc(5), "clear_refs"), which is how a
stage's own peak is measured inside one long run. Elsewhere every function returns None.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            name, _, rest = line.partition(":")
            if name == key:
                return int(rest.split()[0]) * 1024  # the kernel reports kB (KiB)
    except OSError:
        return None
    return None


def current_rss() -> int | None:
    """Resident set size now, in bytes."""
    return _status_bytes("VmRSS")


def peak_rss() -> int | None:
    """Peak resident set size since the process started or the last :func:`reset_peak`, in bytes."""
    return _status_bytes("VmHWM")


def reset_peak() -> bool:
    """Reset the peak to the current RSS; False when the kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def heap_trimmer() -> Callable[[], None]:
    """glibc's ``malloc_trim(0)``, or a no-op where it does not exist.

    Streaming dozens of blocks through many mid-sized temporaries leaves freed memory in glibc's heaps
    (glibc raises its mmap threshold after large frees, so later tensors of up to 32 MiB come from the
    heap and stay there when freed; measured on Qwen2.5-VL-3B: ~7 MiB per block in calibration, none of it
    live); trimming after each block returns it to the OS.
    """
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return lambda: None

    def trim() -> None:
        fn(0)

    return trim


M_MMAP_THRESHOLD = -3  # mallopt(3) parameter number (glibc malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20


def map_large_allocations(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Make glibc serve every allocation of ``threshold`` bytes or more with its own mapping, returned to the
    OS when freed (``mallopt(M_MMAP_THRESHOLD, threshold)``, which also stops glibc from raising the
    threshold after large frees). False where there is no glibc.

    Without it, glibc raises its mmap threshold to the largest block freed so far (up to 32 MiB), and from
    then on the streamed blocks' weights and activations, tensors of 1-32 MiB, come from the heap and
    fragment it: measured on Qwen2.5-VL-3B, calibration's resident memory grew by 0.3 GB while the vision
    tower streamed, none of it live; with the threshold fixed at 1 MiB it did not grow (eval/RESULTS.md).
    Process-wide, so the pipeline sets it for its run (:func:`quantlab.pipeline.run.run_all`).
    """
    try:
        return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


@contextmanager
def measured_peak() -> Iterator[dict[str, int | None]]:
    """Yields a dict that holds, after the block, ``start`` (RSS before) and ``peak`` (peak RSS during the
    block, None when the peak could not be reset, since it would include earlier work).

    The heap is trimmed first, so memory earlier work freed (and glibc kept) is not counted as this work's."""
    heap_trimmer()()
    out: dict[str, int | None] = {"start": current_rss(), "peak": None}
    resettable = reset_peak()
    try:
        yield out
    finally:
        out["peak"] = peak_rss() if resettable else None
