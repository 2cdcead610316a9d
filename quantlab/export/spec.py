"""What an export format is, as data: :class:`ExportFormat` (each writer module declares its own ``FORMAT``)."""

from __future__ import annotations

from collections.abc import Callable

from quantlab.core.registry import Member
from quantlab.quant.layout import Layout
from quantlab.quant.registry import get_backend
from quantlab.quant.scheme import QuantScheme


class ExportFormat(Member):
    """One checkpoint format quantlab writes.

    Attributes:
        name: the recipe's ``export.format`` value.
        write: ``(loaded, results, out_dir, *, weights=None) -> None``: the checkpoint's files into ``out_dir``.
        layout: ``(out, in, scheme, *, bias, dtype_bytes) -> Layout``: the tensors one quantized Linear stores
            (the cost model counts exactly these); raises ``ValueError`` for what the format cannot store.
        uniform_only: stores only codes on a uniform grid (not BiLLM's bit planes).
        bits: the code widths it stores (None: every width the backends produce).
        load_snippet: how to open it (model card), with ``{repo}`` for the path or hub id.
        loader_package: the Python package quantlab needs to load it back in-process (None: transformers or
            quantlab alone).
        k_grids: stores GGUF K-quant grids (``scheme.args["grid"]``, :mod:`quantlab.quant.kquant`).
        in_process: quantlab can load it back in its own process (False: only an external engine serves it,
            e.g. GGUF through ``--engine llama-cpp``).
        dense_element_bytes: ``(hub-legacy tensor name, ndim, model dtype bytes) -> bytes per element`` of an
            unquantized tensor, where the format does not store it at the model's dtype (0: not stored;
            None: every tensor at the model's dtype).
        vision: stores quantized vision-tower and projector Linears (False: its loaders quantize the decoder
            only, and a plan must keep those Linears).
    """

    write: Callable[..., None]
    layout: Callable[..., Layout]
    uniform_only: bool
    load_snippet: str
    bits: tuple[int, ...] | None = None
    loader_package: str | None = None
    k_grids: bool = False
    in_process: bool = True
    dense_element_bytes: Callable[[str, int, int], int] | None = None
    vision: bool = False

    def problem(self, scheme: QuantScheme) -> str | None:
        """Why this format cannot store ``scheme`` on any Linear (None: it can)."""
        if self.uniform_only and not get_backend(scheme.backend).uniform_grid:
            return (f"{scheme.backend} codes are not a uniform grid: export format {self.name!r} cannot hold them "
                    "(use native or auto)")
        grid = scheme.args.get("grid")
        if grid and not self.k_grids:
            return (f"{grid} is a GGUF K-quant grid (sub-block minima are not integer zero points): export format "
                    f"{self.name!r} cannot hold it; use export.format: gguf")
        if self.bits is not None and scheme.bits not in self.bits:
            return f"{self.name} stores bits in {list(self.bits)}, got {scheme.bits}"
        return None
