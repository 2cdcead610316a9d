"""Writing artifacts so that a kill never leaves a half-written one: the one place quantlab does it.

Files and directories are built under a temporary name beside their destination and renamed into place
(``os.replace`` is atomic within a filesystem). ``tempfile`` creates them private (0600 / 0700); they are
given the mode a plain ``open``/``mkdir`` would have under the umask, so that an exported model is readable
by a server running as another user.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def as_if_created(path: str | Path) -> Path:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would have given it under the current umask."""
    path = Path(path)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())
    return path


def write_file_atomic(path: str | Path, data: bytes | str | Callable[[Path], None], *,
                      overwrite: bool = True) -> Path:
    """Write ``data`` (bytes, text, or ``write(tmp_path)``) to ``path`` through a temporary sibling.

    ``overwrite=False`` links the new file into place, which fails if ``path`` appeared meanwhile.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = as_if_created(name)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, str | bytes):
                f.write(data.encode() if isinstance(data, str) else data)
        if callable(data):
            data(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_dir_atomic(out_dir: str | Path, build: Callable[[Path], None], *, overwrite: bool = False,
                     before_replace: Callable[[], None] | None = None) -> Path:
    """Call ``build(tmp_dir)`` and move the result to ``out_dir``.

    An existing ``out_dir`` is refused unless ``overwrite``; even then it is only replaced once the new
    directory is complete, so an interrupted write never leaves a half-written directory behind.
    ``before_replace()`` runs once the new directory is complete, just before it takes ``out_dir``'s place
    (the run directory drops the old model's evaluation there).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = as_if_created(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        build(tmp)
        if before_replace is not None:
            before_replace()
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
