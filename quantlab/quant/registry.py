"""The backend registry: a dict of name -> :class:`Backend`, filled by the ``register_backend`` decorator."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from quantlab.quant.result import QuantResult
from quantlab.quant.scheme import QuantScheme


class BackendFn(Protocol):
    """What a backend implements: one weight, its scheme, its Hessian (or None) -> a result."""

    def __call__(self, weight: Tensor, scheme: QuantScheme, hessian: Tensor | None) -> QuantResult: ...


@dataclass(frozen=True)
class Backend:
    """A registered backend with what :func:`quantlab.quant.api.quantize_weight` checks before calling it.

    Attributes:
        name: registry key.
        fn: the implementation.
        bits: accepted code widths.
        needs_hessian: refuse to run without a Hessian.
        options: accepted keys of ``scheme.args``.
    """

    name: str
    fn: BackendFn
    bits: tuple[int, ...]
    needs_hessian: bool
    options: tuple[str, ...]

    def __call__(self, weight: Tensor, scheme: QuantScheme, hessian: Tensor | None) -> QuantResult:
        return self.fn(weight, scheme, hessian)


BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, *, bits: tuple[int, ...] = tuple(range(1, 9)), needs_hessian: bool = False,
                     options: tuple[str, ...] = ()) -> Callable[[BackendFn], BackendFn]:
    """Decorator registering ``fn`` under ``name``; a duplicate name raises ``ValueError``.

    ``bits``, ``needs_hessian`` and ``options`` are what ``quantize_weight`` validates before the call.
    """

    def deco(fn: BackendFn) -> BackendFn:
        if name in BACKENDS:
            raise ValueError(f"backend {name!r} already registered")
        BACKENDS[name] = Backend(name, fn, tuple(bits), needs_hessian, tuple(options))
        return fn

    return deco


def get_backend(name: str) -> Backend:
    """The backend registered as ``name``; ``KeyError`` listing the valid names otherwise."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise KeyError(f"unknown quantization backend {name!r}; registered: {sorted(BACKENDS)}") from None
