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
from quantlab.quant.scheme import QuantScheme


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


class RuleSpec(_Strict):
    """Pin a scheme (or keep, with ``scheme: null``) for modules matching ``match``.

    ``match`` is ``component:<vision|projector|decoder|embed|head>``, ``re:<regex>`` or an exact name.
    """

    match: str = Field(description="component:<vision|projector|decoder|embed|head>, re:<regex> or an exact "
                       "module name; a pattern that matches no module is an error")
    scheme: QuantScheme | None = Field(description="the scheme to pin, or null to keep the modules unquantized")


class PlanSpec(_Strict):
    """How schemes are chosen per layer."""

    planner: Literal["luq", "budget", "uniform"] = Field(
        default="luq", description="luq: entropy ranking; budget: measured sensitivity + MILP; uniform: one scheme")
    scheme: QuantScheme | None = Field(default=None, description="uniform planner: the one scheme")
    low: QuantScheme | None = Field(default=None, description="luq: the ultra-low scheme")
    high: QuantScheme | None = Field(default=None, description="luq: the default scheme")
    candidates: list[QuantScheme] = Field(default_factory=list, description="budget: allowed schemes")
    k: int | None = Field(default=None, description="luq: number of low-entropy blocks to quantize low")
    target_avg_bits: float | None = Field(default=None, description="luq: the smallest k whose nominal average "
                                          "bits is at most this; budget: the decoder Linears' stored bits per weight")
    search_max_kl: float | None = Field(default=None, description="luq: binary-search the largest k whose "
                                        "logit KL to the full-precision model stays below this")
    budget_gb: float | None = Field(default=None, description="whole-model budget in GB (1e9 bytes)")
    entropy_modality: Literal["all", "image", "text"] = Field(default="all", description="luq: which tokens' "
                                                              "entropy ranks the blocks")
    sensitivity_samples: int = Field(default=32, ge=1, description="budget: calibration samples used to measure damage")
    rules: list[RuleSpec] = Field(default_factory=list, description="pins applied before the planner, first "
                                  "match wins (e.g. keep component:vision)")


class ExportSpec(_Strict):
    """Which checkpoint format the run writes."""

    format: Literal["compressed-tensors", "gptq", "native", "auto"] = Field(
        default="auto", description="auto: compressed-tensors, or native when the plan holds BiLLM layers")


class EvalSpec(_Strict):
    """What the eval stage measures, on the base and the quantized model alike."""

    tasks: list[str] = Field(default_factory=lambda: ["shapes-vqa"], description="shapes-vqa, vqav2, textvqa, "
                             "gqa, pope, mme, scienceqa")
    data_dir: str | None = Field(default=None, description="root of the benchmark folders (not needed for shapes-vqa)")
    limit: int = Field(default=500, description="seeded subset of this many items per task")
    batch_size: int = Field(default=32, description="generation batch size")


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
        """Load and validate a recipe file; ``overrides`` maps dotted keys to values (CLI ``--set``)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a recipe must be a mapping at the top level")
        for dotted, value in (overrides or {}).items():
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = value
        return cls.validate_data(data, source=str(path))

    @classmethod
    def validate_data(cls, data: dict[str, Any], source: str = "<recipe>") -> Recipe:
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ValueError(_explain(err, source)) from None

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
