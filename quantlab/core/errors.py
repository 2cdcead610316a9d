"""What quantlab raises for a problem in the user's input, and how the CLI tells user errors from bugs.

A :class:`UserError` names the culprit (file, key, module, flag), what was expected and the remedy. The CLI
shows its message in a few lines with exit code 2; the traceback goes to the run log (and to the console
with ``--debug``). It subclasses ``ValueError`` so code that catches bad values keeps working.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(ValueError):
    """Bad input: a recipe key, a flag, a model, a file. ``remedy`` is the one line that fixes it."""

    def __init__(self, message: str, remedy: str | None = None):
        super().__init__(message if remedy is None else f"{message}\n  fix: {remedy}")
        self.remedy = remedy


class NotFound(UserError, FileNotFoundError):
    """A model, recipe or file the user named does not exist."""


class NotOurs(UserError, FileExistsError):
    """An output location holds something quantlab did not write (and so will not replace)."""


class RunDirBusy(UserError):
    """Another process works in this run directory (its lock is held)."""


def did_you_mean(word: str, valid: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the valid name closest to ``word``, or ``''`` when none is close."""
    close = difflib.get_close_matches(str(word), list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def problems_error(title: str, problems: list[str], remedy: str | None = None, *, limit: int = 40) -> UserError:
    """One error listing every problem found (a check reports them all, not just the first)."""
    lines = [f"  - {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return UserError(f"{title}:\n" + "\n".join(lines), remedy)


# Exceptions that describe the user's input or environment (a missing file, a full disk, an unreachable hub)
# rather than a bug in quantlab: shown as a message with exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, OSError)
