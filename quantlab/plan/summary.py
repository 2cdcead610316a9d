"""What a plan means for a model: per-block bits and bytes, totals against fp16 and uniform W4, a bar chart.

Pure functions over (model skeleton or model, adapter, plan); they work on meta-device models, so a real 7B
architecture can be summarised from its ``config.json`` alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from quantlab.models.adapter import Component
from quantlab.plan.cost import linear_bytes, model_size
from quantlab.quant.scheme import QuantScheme

W4 = QuantScheme(backend="gptq", bits=4, group_size=128)


@dataclass(frozen=True)
class BlockRow:
    """One decoder block under a plan."""

    block: int
    schemes: tuple[str, ...]  # distinct scheme labels of its Linears ("fp16" when kept)
    avg_bits: float  # stored bits per weight of its Linears (codes, scales, zeros, masks)
    bytes: int  # stored bytes of its Linears
    entropy_image: float | None = None
    entropy_text: float | None = None


@dataclass(frozen=True)
class PlanTotals:
    total_bytes: int
    fp16_bytes: int
    w4_bytes: int
    avg_bits: float  # over decoder Linears
    nominal_bits: float

    @property
    def saving_vs_fp16(self) -> float:
        return 1 - self.total_bytes / self.fp16_bytes

    @property
    def saving_vs_w4(self) -> float:
        return 1 - self.total_bytes / self.w4_bytes


def block_rows(loaded, plan, stats=None) -> list[BlockRow]:
    """Per decoder block: its schemes, exact stored bits per weight and bytes, and entropies when known."""
    adapter, layers = loaded.adapter, plan.layers
    ent = {m: _entropy(stats, m) for m in ("image", "text")}
    per: dict[int, list] = {}
    for name, lin in adapter.iter_linears(loaded.model, Component.DECODER):
        per.setdefault(adapter.block_index(name), []).append((name, lin))
    rows = []
    for b in sorted(per):
        nbytes = numel = 0
        labels = []
        for name, lin in per[b]:
            scheme = layers.get(name)
            nbytes += linear_bytes(lin.out_features, lin.in_features, scheme, plan.format, bias=False, dtype_bytes=2)
            numel += lin.out_features * lin.in_features
            label = scheme.label() if scheme is not None else "fp16"
            if label not in labels:
                labels.append(label)
        rows.append(BlockRow(b, tuple(labels), 8 * nbytes / numel, nbytes,
                             ent["image"].get(b), ent["text"].get(b)))
    return rows


def _entropy(stats, modality: str) -> dict[int, float]:
    if stats is None:
        return {}
    try:
        return stats.block_entropy(modality)
    except ValueError:
        return {}


def totals(loaded, plan) -> PlanTotals:
    """Whole-model bytes under the plan, in fp16, and with every decoder Linear at GPTQ W4 g128 (a Linear
    whose in_features 128 does not divide stays fp16 there)."""
    model, adapter = loaded.model, loaded.adapter
    size = model_size(model, adapter, plan.layers, plan.format, dtype_bytes=2)
    fp16 = model_size(model, adapter, {}, plan.format, dtype_bytes=2).total_bytes
    w4_map = {n: W4 for n, lin in adapter.iter_linears(model, Component.DECODER)
              if lin.in_features % W4.group_size == 0}
    w4 = model_size(model, adapter, w4_map, "compressed-tensors", dtype_bytes=2).total_bytes
    return PlanTotals(size.total_bytes, fp16, w4, size.avg_bits, size.nominal_bits)


def plot_bits(rows: list[BlockRow], path: str | Path, *, title: str = "") -> Path:
    """Bar chart of stored bits per weight for each decoder block (PNG); returns ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(5.0, 0.25 * len(rows) + 2), 3.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar([r.block for r in rows], [r.avg_bits for r in rows], color="tab:blue")
    ax.axhline(4.0, color="grey", ls=":", lw=1, label="4 bits")
    ax.set_xlabel("decoder block")
    ax.set_ylabel("stored bits / weight")
    ax.set_title(title or "bits per decoder block")
    ax.legend(loc="upper right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path
