"""Recipes: YAML files validated by pydantic. Unknown keys are errors that name the key and the valid ones.

The same recipe serves toys and real models; only the MODEL argument of the command differs.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from quantlab.calib.data import CalibDataOptions
from quantlab.core.errors import NotFound, UserError
from quantlab.plan.spec import PlanSpec, RuleSpec  # noqa: F401 - the recipe's plan section

BUILTIN_RECIPES = Path(__file__).resolve().parent / "recipes"


def builtin_recipes() -> dict[str, Path]:
    """The recipes shipped with quantlab (package data): name -> file."""
    return {p.stem: p for p in sorted(BUILTIN_RECIPES.glob("*.yaml"))}


def resolve_recipe(spec: str | Path) -> Path:
    """A recipe file from a path, or a built-in recipe's name (``luq`` or ``luq.yaml``).

    An existing file wins over a built-in of the same name.

    Raises:
        UserError: neither a file nor a built-in name (the message lists the built-ins).
    """
    path = Path(spec)
    if path.is_file():
        return path
    if path.exists():
        raise UserError(f"recipe {path} is a directory, not a YAML file")
    builtin = builtin_recipes()
    name = path.name.removesuffix(".yaml").removesuffix(".yml")
    if len(path.parts) == 1 and name in builtin:
        return builtin[name]
    raise NotFound(f"recipe {spec}: no such file, and not the name of a built-in recipe "
                    f"({', '.join(builtin)})", "pass a path to a recipe YAML, or a built-in name "
                    "(`quantlab recipes` lists them)")


def recipe_summary(path: Path) -> str:
    """The leading comment block of a recipe file (its description), as one line; '' if none."""
    words = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        words.append(line.lstrip("# ").strip())
    return " ".join(w for w in words if w)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StatsSpec(_Strict):
    """Which activation statistics calibration collects."""

    entropy_k: int = Field(default=100, ge=2, description="k-means clusters for LUQ entropy")
    entropy_max_tokens: int = Field(default=4096, ge=16, description="token subsample cap for k-means")
    hook: Literal["block_input_norm", "block_output"] = Field(
        default="block_input_norm", description="the LUQ tensor: the block's input_layernorm output (the "
        "reference code's hook) or the block's output hidden state (the paper's wording)")
    hessians: bool = Field(default=False, description="keep per-Linear Hessians in stats/ (always on for the "
                           "budget planner and the luq KL search)")
    vision: bool = Field(default=False, description="also stream the image samples through the vision tower and "
                         "projector: their Linears' statistics (and Hessians), the vision blocks' entropies (always "
                         "on when plan.components includes vision or projector and the planner reads statistics)")


class ExportSpec(_Strict):
    """Which checkpoint format the run writes."""

    format: Literal["compressed-tensors", "gptq", "native", "gguf", "auto"] = Field(
        default="auto", description="auto: compressed-tensors, or native when the plan holds BiLLM layers; gguf: "
        "llama.cpp's model.gguf + mmproj.gguf (docs/formats.md#gguf)")


class VisionCheckSpec(_Strict):
    """The image-embedding check run when a plan quantizes vision or projector Linears (docs/recipes.md)."""

    images: int = Field(default=16, ge=1, description="held-out images from the calibration image sources")
    min_cosine: float | None = Field(default=None, ge=-1.0, le=1.0, description="refuse the run when the "
                                     "quantized image embeddings' mean cosine to full precision is below this "
                                     "(null: report only)")


class EvalSpec(_Strict):
    """What the eval stage measures, on the base and the quantized model alike."""

    tasks: list[str] = Field(default_factory=lambda: ["shapes-vqa"], description="shapes-vqa, shapes-vqa-hard, vqav2, textvqa, "
                             "gqa, pope, mme, scienceqa")
    data_dir: str | None = Field(default=None, description="root of the benchmark folders (not needed for shapes-vqa and shapes-vqa-hard)")
    limit: int = Field(default=500, description="seeded subset of this many items per task")
    batch_size: int = Field(default=32, description="generation batch size")
    engine: str = Field(default="transformers", description="generation engine: transformers (in-process) or "
                        "vllm (its own environment: quantlab engines --install vllm); see docs/engines.md")
    engine_options: dict[str, Any] = Field(default_factory=dict, description="passed to the engine, e.g. "
                                           "{tensor_parallel_size: 2, dtype: bfloat16} for vllm.LLM")
    vision_check: VisionCheckSpec = Field(default_factory=VisionCheckSpec, description="image embeddings of a "
                                          "quantized vision tower vs full precision (run when the plan quantizes one)")


class Recipe(_Strict):
    """A whole quantization run, stage by stage."""

    name: str = Field(default="recipe", description="a label, written to the model card")
    calibration: CalibDataOptions = Field(default_factory=CalibDataOptions)
    stats: StatsSpec = Field(default_factory=StatsSpec)
    plan: PlanSpec = Field(default_factory=PlanSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
        """Load and validate a recipe file or built-in name (:func:`resolve_recipe`); ``overrides`` maps
        dotted keys to values (CLI ``--set``).

        Raises:
            UserError: no such recipe, bad YAML, or an invalid key or value (named, with the valid ones).
        """
        path = resolve_recipe(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: a recipe must be a mapping at the top level")
        for dotted, value in (overrides or {}).items():
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node.setdefault(key, {})
                if not isinstance(node, dict):
                    raise UserError(f"--set {dotted}: {key!r} is not a section of the recipe")
            node[leaf] = value
        return cls.validate_data(data, source=str(path))

    @classmethod
    def validate_data(cls, data: dict[str, Any], source: str = "<recipe>") -> Recipe:
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise UserError(_explain(err, source), "see docs/recipes.md for every key and its values") from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models a field annotation refers to (``X``, ``X | None``, ``list[X]``), in order."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in models_in(arg)]


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the field at ``loc`` (for listing valid keys)."""
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        inner = models_in(field.annotation) if field is not None else []
        if not inner:
            return None
        model = inner[0]
    return model


def _explain(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid recipe"]
    for e in err.errors():
        loc = tuple(e["loc"])
        where = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            owner = _model_at(loc)
            valid = sorted(owner.model_fields) if owner else []
            lines.append(f"  unknown key '{where}'; valid keys here: {', '.join(valid)}")
        else:
            lines.append(f"  {where}: {e['msg']}")
    return "\n".join(lines)
