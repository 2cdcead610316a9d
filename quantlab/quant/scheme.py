"""The quantization scheme of one Linear: which backend, how many bits, which grouping.

A scheme is validated, frozen data: it is what a plan assigns to a module and what a backend receives.
``group_size=-1`` means one group per output channel (per-channel quantization).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class QuantScheme(BaseModel):
    """Weight-only quantization scheme for one Linear layer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: str = Field(description="registered backend name: rtn, gptq, billm, ...")
    bits: int = Field(ge=1, le=8, description="code width in bits (billm: 1, its nominal width)")
    group_size: int = Field(default=128, description="columns per quantization group; -1 = per channel")
    sym: bool = Field(default=True, description="symmetric grid (no stored zero point)")
    args: dict[str, Any] = Field(default_factory=dict, description="backend options, e.g. damp, act_order, mse")

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v != -1 and v <= 0:
            raise ValueError(f"group_size must be positive or -1 (per channel), got {v}")
        return v

    def label(self) -> str:
        """Short human label, e.g. ``gptq-w4-g128``, ``rtn-w8-ch-asym`` or ``gptq-q4_k`` (a GGUF K-quant grid),
        with the options that change what is solved for: ``-img0.25`` (``image_weight``), ``-tokgrad``
        (``token_weight: gradient``), ``-awq`` (so a planner's candidates that differ only there stay apart)."""
        if self.args.get("grid"):
            base = f"{self.backend}-{self.args['grid']}"
        else:
            g = "ch" if self.group_size == -1 else f"g{self.group_size}"
            base = f"{self.backend}-w{self.bits}-{g}" + ("" if self.sym else "-asym")
        w = self.args.get("image_weight", 1.0)
        if w != 1.0:
            base += f"-img{w:g}" if isinstance(w, (int, float)) else f"-img{w}"
        if self.args.get("token_weight"):
            base += "-tok" + ("grad" if self.args["token_weight"] == "gradient" else str(self.args["token_weight"]))
        return base + ("-awq" if self.args.get("awq") else "")

    def __hash__(self) -> int:  # args may hold unhashable values; the label plus args repr is enough
        return hash((self.label(), repr(sorted(self.args.items()))))
