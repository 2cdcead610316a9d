"""Permissions for files made through ``tempfile`` (which creates them private: 0600 / 0700).

quantlab writes every artifact to a temporary sibling and renames it into place; without this, an exported
model directory would be readable by its owner only, and a server running as another user could not load it.
"""

from __future__ import annotations

import os
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
