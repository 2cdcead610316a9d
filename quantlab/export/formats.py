"""The export-format registry: every format quantlab writes, by name (:class:`~quantlab.export.spec.ExportFormat`).

The registry answers every question the rest of quantlab asks about a format: how one Linear is laid out
(the cost model), what it can store (the plan's checks), how it is written (the export stage), how it is
opened (the model card). A new format is one module declaring ``FORMAT = ExportFormat(...)`` plus one
:func:`register_format` call (or one line below).
"""

from __future__ import annotations

from quantlab.errors import UserError
from quantlab.export import compressed_tensors, gptq, native
from quantlab.export.spec import ExportFormat

FORMATS: dict[str, ExportFormat] = {}


def register_format(fmt: ExportFormat) -> ExportFormat:
    """Add ``fmt`` to the registry; a duplicate name raises ``ValueError``."""
    if fmt.name in FORMATS:
        raise ValueError(f"export format {fmt.name!r} already registered")
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> ExportFormat:
    """The format registered as ``name``; a :class:`UserError` listing the valid names otherwise."""
    try:
        return FORMATS[name]
    except KeyError:
        raise UserError(f"unknown export format {name!r}; valid: {sorted(FORMATS)}") from None


for _module in (compressed_tensors, gptq, native):
    register_format(_module.FORMAT)
