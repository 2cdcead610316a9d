"""The plan section of a recipe: which planner, which schemes, what target, which pins (validated)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from quantlab.quant.scheme import QuantScheme


class RuleSpec(BaseModel):
    """Pin a scheme (or keep, with ``scheme: null``) for modules matching ``match``.

    ``match`` is ``component:<vision|projector|decoder|embed|head>``, ``re:<regex>`` or an exact name.
    """

    model_config = ConfigDict(extra="forbid")

    match: str = Field(description="component:<vision|projector|decoder|embed|head>, re:<regex> or an exact "
                       "module name; a pattern that matches no module is an error")
    scheme: QuantScheme | None = Field(description="the scheme to pin, or null to keep the modules unquantized")


class PlanSpec(BaseModel):
    """How schemes are chosen per layer."""

    model_config = ConfigDict(extra="forbid")

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
    components: list[Literal["decoder", "vision", "projector"]] = Field(
        default_factory=lambda: ["decoder"], min_length=1,
        description="which parts the planner decides: decoder blocks, vision-tower blocks, projector Linears "
        "(luq ranks vision blocks by their own entropy beside the decoder's and gives the projector the high "
        "scheme; budget measures every vision and projector unit like a decoder one); the rest is kept unless a "
        "rule pins it")
    sensitivity_samples: int = Field(default=32, ge=1, description="budget: calibration samples used to measure damage")
    rules: list[RuleSpec] = Field(default_factory=list, description="pins applied before the planner, first "
                                  "match wins (e.g. keep component:vision)")
    shape_fallback: Literal["smaller_group", "per_channel", "keep", "error"] = Field(
        default="smaller_group", description="a Linear whose shape a scheme cannot take (group size not dividing "
        "in_features, GPTQ packing): smaller_group (largest of 128/64/32 that divides, else per channel, else "
        "keep), per_channel (else keep), keep (fp16), or error (refuse before calibration, naming every module); "
        "each fallback is recorded in plan.yaml and the report")
