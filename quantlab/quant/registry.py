"""The backend registry: a dict of name -> :class:`Backend`, filled by the ``register_backend`` decorator.

The registry answers every question the rest of quantlab asks about a backend (which bits and options it
takes, whether it needs a Hessian, whether its codes are a uniform grid that third-party formats store,
its nominal width, and, for codes that are not, how quantlab's native format stores and decodes them), so
adding a backend is one file: its solver and one ``register_backend`` call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from quantlab.core.registry import Member, Registry
from quantlab.models.adapter import Component
from quantlab.quant.layout import Layout
from quantlab.quant.scheme import QuantScheme

if TYPE_CHECKING:  # results are created by the backends; the registry only names the type
    from quantlab.quant.result import QuantResult


class BackendFn(Protocol):
    """What a backend implements: one weight, its scheme, its Hessian (or None) -> a result."""

    def __call__(self, weight: Tensor, scheme: QuantScheme, hessian: Tensor | None) -> QuantResult: ...


class NativeCodec(BaseModel):
    """How quantlab's native format stores a backend whose codes are not a uniform grid.

    Attributes:
        layout: ``(out, in, scheme, *, bias, dtype_bytes) -> Layout``: the tensors stored per Linear.
        encode: ``result -> {suffix: tensor}``: what is written.
        decode: ``(scalars, tensors, shape, dtype) -> QuantResult``: the result back, dequantized.
        dequantize: ``result -> weight`` from the stored tensors.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    layout: Callable[..., Layout]
    encode: Callable[[Any], dict[str, Tensor]]
    decode: Callable[..., Any]
    dequantize: Callable[[Any], Tensor]


class Backend(Member):
    """A registered backend and everything the rest of quantlab needs to know about it.

    Attributes:
        name: registry key.
        fn: the implementation.
        bits: accepted code widths.
        needs_hessian: refuse to run without a Hessian (so not outside the calibrated decoder blocks).
        options: accepted keys of ``scheme.args``.
        nominal_bits: LUQ's nominal width of a weight (None: ``scheme.bits``).
        native: how the native format stores codes that are not a uniform grid; None for uniform-grid
            backends, whose codes every format (compressed-tensors, GPTQ, native) stores.
        check: ``(scheme, in_features or None) -> reason or None``: what else the backend refuses (a K grid
            that does not match the scheme, rows it cannot take), asked before any work.
    """

    fn: Callable[..., Any]
    bits: tuple[int, ...] = Field(min_length=1)
    needs_hessian: bool
    options: tuple[str, ...] = ()
    nominal_bits: float | None = Field(default=None, gt=0)
    native: NativeCodec | None = None
    check: Callable[[QuantScheme, int | None], str | None] | None = None

    @property
    def uniform_grid(self) -> bool:
        """Codes are integers on a uniform grid (scale, zero point): any uniform format can store them."""
        return self.native is None

    def problem(self, scheme: QuantScheme, in_features: int | None = None) -> str | None:
        """Why this backend cannot run ``scheme`` (on rows of ``in_features``, when given); None: it can."""
        if scheme.bits not in self.bits:
            return f"backend {self.name!r} takes bits in {list(self.bits)}, got {scheme.bits}"
        unknown = sorted(set(scheme.args) - set(self.options))
        if unknown:
            return f"unknown option(s) {unknown} for backend {self.name!r}; valid: {sorted(self.options)}"
        w = scheme.args.get("image_weight", 1.0)
        if w != MEASURED and (isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < float("inf")):
            return (f"image_weight must be a non-negative number (1.0: image tokens count as much as text) or "
                    f"{MEASURED!r}, got {w!r}")
        tw = scheme.args.get("token_weight")
        if tw is not None and tw != GRADIENT:
            return f"token_weight must be {GRADIENT!r} (each token's measured gradient saliency), got {tw!r}"
        awq = scheme.args.get("awq", False)
        if not isinstance(awq, bool):
            return f"awq must be true or false, got {awq!r}"
        if awq and scheme.args.get("grid"):
            return "awq searches its scales with a uniform grid; it does not combine with a GGUF K grid ('grid')"
        return None if self.check is None else self.check(scheme, in_features)

    def nominal(self, scheme: QuantScheme) -> float:
        """LUQ's nominal bits per weight of ``scheme`` (BiLLM: 1.08 whatever its stored size)."""
        return float(scheme.bits) if self.nominal_bits is None else self.nominal_bits

    def __call__(self, weight: Tensor, scheme: QuantScheme, hessian: Tensor | None, *,
                 consume_hessian: bool = False) -> QuantResult:
        """Run the backend; ``consume_hessian``: a backend that needs one may overwrite and free it."""
        if self.needs_hessian:
            return self.fn(weight, scheme, hessian, consume_hessian=consume_hessian)
        return self.fn(weight, scheme, hessian)


BACKENDS: Registry[Backend] = Registry("quantization backend")

# Options every Hessian backend takes: they shape the Hessian the quantize stage gathers, not the solver.
# ``image_weight``: weight of image tokens against text tokens (1.0) in ``H = XᵀDX / ΣD``; ``token_weight:
# gradient``: each token's D multiplied by its measured gradient saliency (VLMQ-style; docs/method.md).
HESSIAN_OPTIONS = ("image_weight", "token_weight")
MEASURED = "measured"  # image_weight from MBQ's measured gradient ratio, resolved per block by the plan stage
GRADIENT = "gradient"  # token_weight: calibration's per-token gradient saliency at each block's input


def register_backend(name: str, *, bits: tuple[int, ...] = tuple(range(1, 9)), needs_hessian: bool = False,
                     options: tuple[str, ...] = (), nominal_bits: float | None = None,
                     native: NativeCodec | None = None,
                     check: Callable[[QuantScheme, int | None], str | None] | None = None
                     ) -> Callable[[BackendFn], BackendFn]:
    """Decorator registering ``fn`` under ``name``; a duplicate name raises ``ValueError``.

    ``bits``, ``needs_hessian`` and ``options`` are what ``quantize_weight`` validates before the call (a backend
    that needs a Hessian also takes :data:`HESSIAN_OPTIONS`);
    ``nominal_bits``, ``native`` and ``check`` see :class:`Backend`.
    """

    def deco(fn: BackendFn) -> BackendFn:
        every = HESSIAN_OPTIONS if needs_hessian else ()
        BACKENDS.register(Backend(name=name, fn=fn, bits=tuple(bits), needs_hessian=needs_hessian,
                                  options=tuple(options) + every, nominal_bits=nominal_bits, native=native, check=check))
        return fn

    return deco


CALIBRATED = (Component.DECODER, Component.VISION, Component.PROJECTOR)  # what calibration samples reach
DECODER_ONLY_ARGS = HESSIAN_OPTIONS  # token weightings: image vs text tokens exist in decoder blocks only
BLOCK_ONLY_ARGS = ("awq",)  # AWQ's scales fold into a norm or Linear of a block (Adapter.scale_pairs, vision_scale_pairs)


def component_problem(scheme: QuantScheme, component: Component) -> str | None:
    """Why ``scheme`` cannot run on a Linear of ``component`` (None: it can).

    Calibration samples stream through the vision blocks, the projector and the decoder blocks, so a backend
    that needs a Hessian runs there and nowhere else (the head, embeddings); token weightings exist for
    decoder blocks only (image vs text tokens), AWQ for decoder and vision blocks (the adapter's scale pairs;
    the projector has no norm or Linear its scales could fold into).
    """
    if component is Component.DECODER:
        return None
    if component in CALIBRATED:
        asked = [a for a in DECODER_ONLY_ARGS if a in scheme.args]
        if asked:
            return f"args {asked} apply to decoder blocks only; drop them for the {component.value} Linears"
        folded = [a for a in BLOCK_ONLY_ARGS if scheme.args.get(a, False)]
        if component is Component.PROJECTOR and folded:
            return (f"args {folded} apply to decoder and vision blocks only (the projector has no norm or Linear "
                    "that its scales could fold into); drop it for the projector Linears")
        return None
    if not get_backend(scheme.backend).needs_hessian:
        return None
    data_free = sorted(b.name for b in BACKENDS.values() if not b.needs_hessian)
    return (f"backend {scheme.backend!r} needs calibration data, which reaches the vision tower, projector and "
            f"decoder only; use one of {data_free} for the {component.value}")


def get_backend(name: str) -> Backend:
    """The backend registered as ``name``; :class:`quantlab.core.registry.UnknownName` (a ``KeyError``) listing the
    valid names otherwise."""
    return BACKENDS.get(name)
