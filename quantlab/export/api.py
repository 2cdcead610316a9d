"""``quantlab.export``: quantization results -> a checkpoint directory in a registered format."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from quantlab.core.errors import problems_error
from quantlab.core.files import write_dir_atomic
from quantlab.export.card import write_model_card
from quantlab.export.formats import get_format
from quantlab.models.load import LoadedModel
from quantlab.quant.scheme import QuantScheme


def export(loaded: LoadedModel, results: Mapping[str, Any], plan, out: str | Path, format: str | None = None, *,
           recipe=None, base_model: str | None = None, weights=None, overwrite: bool = False,
           before_replace: Callable[[], None] | None = None) -> Path:
    """Write ``results`` (from :func:`quantlab.quantize`) for ``plan`` as a checkpoint in ``out``.

    Args:
        loaded: the model the results belong to (its dense tensors, config and processor are written too).
        results: module name -> QuantResult.
        plan: the :class:`~quantlab.plan.plan.Plan` (its ``format`` is used when ``format`` is None or
            ``"auto"``; it is written beside the checkpoint with a model card).
        out: the directory; built in a temporary sibling and renamed into place when complete.
        format: a registered format name (``compressed-tensors``, ``gptq``, ``native``).
        recipe: the recipe, written as ``recipe.yaml`` and named in the model card (optional).
        base_model: the name the model card gives the base model (default: where ``loaded`` came from).
        weights: a streamed model's weight source (``quantlab.load_streaming``).
        overwrite: replace an existing ``out`` (only once the new directory is complete).
        before_replace: called when the new directory is complete, before it replaces ``out``.

    Raises:
        UserError: a result the format cannot store (every such module is named).
    """
    fmt = get_format(plan.format if format in (None, "auto") else format)
    bad = [f"{n} ({r.backend}): {why}" for n, r in results.items()
           if (why := fmt.problem(_scheme_of(r))) is not None]
    if bad:
        raise problems_error(f"export format {fmt.name!r} cannot hold {len(bad)} quantized module(s)", bad,
                             "use export.format: native (or auto)")

    def build(d: Path) -> None:
        fmt.write(loaded, results, d, weights=weights)
        write_model_card(d, base_model or loaded.source, recipe, plan, fmt.name, loaded.adapter)
        if recipe is not None:
            (d / "recipe.yaml").write_text(recipe.to_yaml())
        plan.to_yaml(d / "plan.yaml", overwrite=True)

    return write_dir_atomic(out, build, overwrite=overwrite, before_replace=before_replace)


def _scheme_of(r) -> QuantScheme:
    grid = r.args.get("grid")
    return QuantScheme(backend=r.backend, bits=r.bits, group_size=r.group_size, sym=r.sym,
                       args={"grid": grid} if grid else {})
