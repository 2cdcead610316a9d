"""The export stage: quantization results -> checkpoints that transformers, vLLM, GPTQModel or quantlab open.

``quantlab.export(loaded, results, plan, out, format=...)`` is :func:`quantlab.export.api.export`; the package
itself is callable so that the verb works whether ``quantlab.export`` resolves to this package (once any
export module was imported) or to the function.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallablePackage(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from quantlab.export.api import export  # lazily: `import quantlab` stays cheap

        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
