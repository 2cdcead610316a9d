"""The export-format registry: every format quantlab writes, by name (:class:`~quantlab.export.spec.ExportFormat`).

The registry answers every question the rest of quantlab asks about a format: how one Linear is laid out
(the cost model), what it can store (the plan's checks), how it is written (the export stage), how it is
opened (the model card). A new format is one module declaring ``FORMAT = ExportFormat(...)`` plus one
:func:`register_format` call (or one line below).
"""

from __future__ import annotations

from quantlab.core.registry import Registry
from quantlab.export import compressed_tensors, gguf, gptq, native
from quantlab.export.spec import ExportFormat

FORMATS: Registry[ExportFormat] = Registry("export format")
register_format = FORMATS.register
get_format = FORMATS.get

for _module in (compressed_tensors, gptq, native, gguf):
    register_format(_module.FORMAT)
