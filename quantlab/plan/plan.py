"""The Plan artifact: which scheme each Linear gets, what it should cost, and why; plus pin rules.

A plan is written as human-editable YAML (``plan.yaml``), one compact mapping per scheme::

    model: llava-hf/llava-1.5-7b-hf
    format: compressed-tensors
    planner: luq
    budget_bytes: null
    total_predicted_bytes: 3912345600
    avg_bits: 2.54
    layers:
      model.language_model.layers.0.self_attn.q_proj: {backend: billm, bits: 1, group_size: 128, sym: true}
      lm_head: null
    info:
      block.0: {entropy: 6.41, bytes: 56623104}
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

from quantlab.core.files import write_file_atomic
from quantlab.models.adapter import Adapter, Component
from quantlab.plan.cost import FORMATS
from quantlab.quant.scheme import QuantScheme


class Plan(BaseModel):
    """Per-module quantization decisions for one model and export format."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    model: str = Field(description="model id, alias or path the plan was made for")
    format: str = Field(description=f"export format the byte counts assume: {', '.join(FORMATS)}")
    planner: str = Field(description="planner that produced it: uniform, luq, budget, hand, ...")
    layers: dict[str, QuantScheme | None] = Field(description="Linear name -> scheme; None keeps it in fp")
    predicted_bytes: int = Field(ge=0, description="stored size of the whole model under this plan",
                                 validation_alias=AliasChoices("total_predicted_bytes", "predicted_bytes"))
    avg_bits: float | None = Field(default=None, ge=0,
                                   description="exact stored bits per weight over the decoder Linears")
    info: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                            description="per module or block: entropy, sensitivity, bytes, ...")
    budget_bytes: int | None = Field(default=None, ge=0)

    @field_validator("format")
    @classmethod
    def _fmt(cls, v: str) -> str:
        if v not in FORMATS:
            raise ValueError(f"unknown format {v!r}; valid: {list(FORMATS)}")
        return v

    def to_yaml(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the plan atomically (temp file + rename in the same directory).

        Raises:
            FileExistsError: ``path`` exists and ``overwrite`` is False.
        """
        path = Path(path)
        text = yaml.dump(_plain(self._yaml_dict()), Dumper=_PlanDumper, sort_keys=False, width=140,
                         allow_unicode=True)
        write_file_atomic(path, text, overwrite=overwrite)
        return path

    @classmethod
    def from_yaml(cls, path: str | Path) -> Plan:
        """Read a plan written by :meth:`to_yaml` (or by hand).

        Raises:
            ValueError: invalid YAML, or a bad/unknown key; the message names the file and the key path.
        """
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            lines = [f"{_loc(e['loc'])}: {e['msg']}" for e in err.errors()]
            raise ValueError(f"{path}: invalid plan:\n  " + "\n  ".join(lines)) from err

    def _yaml_dict(self) -> dict[str, Any]:
        return {"model": self.model, "format": self.format, "planner": self.planner,
                "budget_bytes": self.budget_bytes, "total_predicted_bytes": self.predicted_bytes,
                "avg_bits": None if self.avg_bits is None else round(self.avg_bits, 4),
                "layers": {n: scheme_dict(s) for n, s in self.layers.items()},
                "info": {k: _Flow(v) for k, v in self.info.items()}}


def _loc(loc: tuple) -> str:
    """A pydantic error location as a key path; dotted module names are quoted: layers['a.b'].bits."""
    out = ""
    for part in loc:
        part = str(part)
        out += f"[{part!r}]" if "." in part else (f".{part}" if out else part)
    return out or "<root>"


def scheme_dict(scheme: QuantScheme | None) -> dict[str, Any] | None:
    """Compact mapping of a scheme for YAML (``args`` only when set); None stays None."""
    if scheme is None:
        return None
    d = scheme.model_dump()
    if not d["args"]:
        del d["args"]
    return _Flow(d)


class _Flow(dict):
    """A mapping written in YAML flow style (one line)."""


class _PlanDumper(yaml.SafeDumper):
    pass


_PlanDumper.add_representer(_Flow, lambda d, data: d.represent_mapping("tag:yaml.org,2002:map", data,
                                                                        flow_style=True))


def _plain(x: Any) -> Any:
    """Numpy/torch scalars -> Python numbers, recursively, keeping _Flow mappings."""
    if isinstance(x, dict):
        return type(x)((k, _plain(v)) for k, v in x.items()) if isinstance(x, _Flow) else \
            {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if hasattr(x, "item") and callable(x.item):
        return x.item()
    return x


class Rule(BaseModel):
    """One pin: ``match`` is ``component:<name>``, ``re:<regex>`` (``re.match``, start-anchored, as
    compressed-tensors targets) or an exact module name; ``scheme`` None keeps the module in fp."""

    model_config = ConfigDict(extra="forbid")

    match: str
    scheme: QuantScheme | None


def _matcher(rule: Rule, adapter: Adapter | None):
    m = rule.match
    if m.startswith("component:"):
        value = m.split(":", 1)[1]
        valid = [c.value for c in Component]
        if value not in valid:
            raise ValueError(f"rule {m!r}: unknown component {value!r}; valid: {valid}")
        if adapter is None:
            raise ValueError(f"rule {m!r} needs an adapter to resolve components")
        return lambda name: adapter.component_of(name).value == value
    if m.startswith("re:"):
        try:
            rx = re.compile(m[3:])
        except re.error as err:
            raise ValueError(f"rule {m!r}: bad regex: {err}") from err
        return lambda name: rx.match(name) is not None
    return lambda name: name == m


def apply_rules(names: Iterable[str], rules: Sequence[Rule | Mapping[str, Any]], adapter: Adapter | None = None
                ) -> dict[str, QuantScheme | None]:
    """Schemes pinned by rules; the first matching rule wins, names no rule matches are left out.

    Args:
        names: module names to match (e.g. every Linear).
        rules: ``[{match: ..., scheme: {...} | None}, ...]`` or :class:`Rule` objects.
        adapter: needed for ``component:`` rules.

    Raises:
        ValueError: malformed rule (bad key, unknown component, bad regex) or a rule that matches no name.
    """
    parsed = []
    for i, r in enumerate(rules):
        try:
            rule = r if isinstance(r, Rule) else Rule.model_validate(r)
        except ValidationError as err:
            raise ValueError(f"rule {i} ({r!r}) is invalid: {err}") from err
        parsed.append((_matcher(rule, adapter), rule.scheme))
    out: dict[str, QuantScheme | None] = {}
    used: set[int] = set()
    names = list(names)
    for name in names:
        for i, (hit, scheme) in enumerate(parsed):
            if hit(name):
                out[name] = scheme
                used.add(i)
                break
    for i, r in enumerate(rules):
        # a rule shadowed by an earlier one still counts as matching; only a pattern that names nothing is an error
        if i not in used and not any(parsed[i][0](n) for n in names):
            match = r.match if isinstance(r, Rule) else r.get("match")
            raise ValueError(f"rule {i}: match {match!r} names no module of this model "
                             f"(e.g. {names[0] if names else 'no modules'!r}); check the pattern")
    return out
