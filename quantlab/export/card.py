"""Model card (README.md with Hub metadata) for an exported checkpoint."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from quantlab.export.formats import get_format


def model_card(base_model: str, recipe, plan, fmt: str, adapter, *, eval_results: dict | None = None,
               repo: str = "THIS_DIR") -> str:
    """The README.md text: metadata header, plan summary per component, memory, eval, how to load."""
    per_comp: dict[str, Counter] = {}
    for name, scheme in plan.layers.items():
        comp = adapter.component_of(name).value
        per_comp.setdefault(comp, Counter())[scheme.label() if scheme else "kept (fp16)"] += 1
    lines = [
        "---",
        f"base_model: {base_model}",
        "library_name: transformers",
        "license: # set the base model's license here",
        "tags: [quantlab, quantized, vision-language, " + fmt + "]",
        "---",
        "",
        f"# {Path(base_model).name} quantized with quantlab ({getattr(recipe, 'name', plan.planner)})",
        "",
        f"Format: **{fmt}**. Planner: **{plan.planner}**. Predicted size: **{plan.predicted_bytes / 1e9:.4f} GB**"
        + (f" (budget {plan.budget_bytes / 1e9:.4f} GB)" if plan.budget_bytes else "") + ".",
        "",
        "## Plan by component",
        "",
        "| component | scheme | Linear layers |",
        "|---|---|---|",
    ]
    for comp, counts in sorted(per_comp.items()):
        for label, n in sorted(counts.items()):
            lines.append(f"| {comp} | {label} | {n} |")
    if eval_results:
        lines += ["", "## Evaluation", "", "| model | task | accuracy |", "|---|---|---|"]
        for key, r in eval_results.items():
            lines.append(f"| {key} | {r.get('task', '?')} | {r.get('accuracy', float('nan')):.4f} |")
    lines += ["", "## How to load", "", get_format(fmt).load_snippet.format(repo=repo), "",
              "The recipe and the plan that produced this checkpoint are in `recipe.yaml` and `plan.yaml`.", ""]
    return "\n".join(lines)


def write_model_card(out: Path, base_model: str, recipe, plan, fmt: str, adapter,
                     eval_results: dict | None = None) -> Path:
    """Write ``out/README.md`` (see :func:`model_card`)."""
    path = Path(out) / "README.md"
    path.write_text(model_card(base_model, recipe, plan, fmt, adapter, eval_results=eval_results))
    return path
