"""The report figure: accuracy per task and type, accuracy vs stored bytes, model bytes and run-time memory on
panels of their own (a 500 MiB interpreter beside a 2 MiB model would hide the model), bits and activation
entropy per decoder block. matplotlib's object API on an Agg canvas: no pyplot state.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import TYPE_CHECKING

from quantlab.eval.memory import MIB, MemoryReport

if TYPE_CHECKING:  # the report module builds the Comparison and calls figure_png
    from quantlab.eval.report import Comparison

W4_LABEL = "uniform GPTQ W4 g128"


def _formatter(spec: str, scale: float = 1.0, suffix: str = "") -> Callable[[float | None], str]:
    """A cell formatter: ``-`` for a missing value, else ``scale * x`` in ``spec`` plus ``suffix``."""
    return lambda x: "-" if x is None else f"{format(scale * x, spec)}{suffix}"


cell_pct, cell_delta, cell_share = _formatter(".1f", 100), _formatter("+.1f", 100), _formatter(".1f", 100, "%")
cell_mib, cell_bits, cell_entropy = _formatter(",.2f", 1 / MIB), _formatter(".2f"), _formatter(".3f")


def byte_unit(nbytes: float) -> tuple[str, int]:
    """A byte unit that keeps ``nbytes`` readable: KiB below 1 MiB, GiB from 4 GiB, MiB between."""
    if nbytes >= 4 * 2**30:
        return "GiB", 2**30
    return ("MiB", MIB) if nbytes >= MIB else ("KiB", 2**10)


MODEL_MEASURES = ("predicted_bytes", "disk_tensor_bytes", "disk_file_bytes")  # the model's bytes
RUNTIME_MEASURES = ("runtime_peak_bytes", "runtime_import_bytes", "runtime_device_peak_bytes")  # a process's


def _measures(c: Comparison, attrs: tuple[str, ...]) -> list[tuple[str, str]]:
    """``(row name, attribute)`` of the measures in ``attrs`` that were measured for some model."""
    return [(name, attr) for name, attr in MemoryReport.ROWS
            if attr in attrs and any(getattr(m, attr) is not None for m in c.memory.values())]


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def _accuracy_panel(ax, c: Comparison) -> None:
    labels = [f"{r.task}: {r.question_type}" for r in c.rows]
    xs = list(range(len(c.rows)))
    for k, (name, values) in enumerate((("baseline", [r.baseline for r in c.rows]),
                                        ("quantized", [r.quantized for r in c.rows]))):
        ax.bar([x + (k - 0.5) * 0.4 for x in xs], [100 * (v or 0.0) for v in values], 0.4, label=name,
               color=f"C{k}")
    ax.set_xticks(xs, labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 115)
    title = "accuracy per task / question type"
    if c.paired:
        title += "\n" + "; ".join(f"{t}: delta {cell_delta(p.diff)} pts, {100 * p.level:g}% CI "
                                   f"[{cell_delta(p.ci_low)}, {cell_delta(p.ci_high)}]" for t, p in c.paired.items())
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper right", ncol=2, fontsize=8)


def _bytes_bars(ax, c: Comparison, measures: list[tuple[str, str]], title: str, ylabel: str,
                extra: float = 0.0) -> int | None:
    """Grouped bars, one group per measure, one bar per model, labelled with their values; returns the unit's
    bytes (None: nothing measured). ``extra``: another value (bytes) the axis must show."""
    if not measures:
        _no_data(ax, "not measured")
        ax.set_title(title, fontsize=10)
        return None
    top = max([extra] + [getattr(m, a) or 0 for m in c.memory.values() for _, a in measures])
    unit, div = byte_unit(top)
    width = 0.8 / max(1, len(c.memory))
    for k, (label, m) in enumerate(c.memory.items()):
        bars = ax.bar([i + (k - (len(c.memory) - 1) / 2) * width for i in range(len(measures))],
                      [(getattr(m, a) or 0) / div for _, a in measures], width, label=label, color=f"C{k}")
        ax.bar_label(bars, [_fmt_size(getattr(m, a), div) for _, a in measures], fontsize=7, padding=2)
    ax.set_xticks(range(len(measures)), [n.replace("run time: ", "").replace("on disk: ", "on disk:\n")
                                         for n, _ in measures], fontsize=8)
    ax.set_ylabel(f"{ylabel} ({unit})")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, 1.35 * top / div)  # room for the legend above the bars
    return div


def _fmt_size(n: int | None, div: int) -> str:
    return "n/a" if n is None else f"{n / div:,.3g}"


def _model_bytes_panel(ax, c: Comparison) -> None:
    w4 = c.savings.get("w4_bytes") or 0
    div = _bytes_bars(ax, c, _measures(c, MODEL_MEASURES), "model weights: predicted (cost model) and on disk",
                      "stored bytes", extra=w4)
    if div is not None:
        if w4:
            ax.axhline(w4 / div, color="grey", ls="--", lw=1, label=f"{W4_LABEL} (predicted)")
        ax.legend(fontsize=8, loc="upper center", ncol=2)


def _runtime_panel(ax, c: Comparison) -> None:
    if _bytes_bars(ax, c, _measures(c, RUNTIME_MEASURES), "run-time memory: whole process (interpreter, "
                   "libraries, model)", "memory"):
        ax.legend(fontsize=8, loc="upper center", ncol=2)


def _scatter_panel(ax, c: Comparison) -> None:
    pts = c.points
    ax.set_title("accuracy vs model bytes", fontsize=10)
    if not pts:
        _no_data(ax, "no scores or no sizes")
        return
    unit, div = byte_unit(max(p["bytes"] for p in pts))
    tasks = list(dict.fromkeys(p["task"] for p in pts))
    markers = "osD^v<>Pp*"
    for k, model in enumerate(dict.fromkeys(p["model"] for p in pts)):
        for p in (p for p in pts if p["model"] == model):
            ax.scatter(p["bytes"] / div, 100 * p["score"], s=60, color=f"C{k}",
                       marker=markers[tasks.index(p["task"]) % len(markers)],
                       label=f"{model}: {p['task']}" if len(tasks) > 1 else model)
            ax.annotate(f"{100 * p['score']:.1f}", (p["bytes"] / div, 100 * p["score"]), textcoords="offset points",
                        xytext=(6, 4), fontsize=8)
    if c.savings.get("w4_bytes"):
        ax.axvline(c.savings["w4_bytes"] / div, color="grey", ls="--", lw=1, label=f"{W4_LABEL} bytes")
    ax.set_xlim(0, 1.15 * max(p["bytes"] for p in pts) / div)
    lo = min(100 * p["score"] for p in pts)
    ax.set_ylim(max(0.0, min(lo - 5, 90.0)), 102)
    ax.set_xlabel(f"stored bytes, cost model ({unit})")
    ax.set_ylabel("overall score (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")


def _blocks_panels(ax_bits, ax_ent, c: Comparison) -> None:
    """Stored bits per weight of each decoder block (top) and its activation entropy by modality (bottom)."""
    ax_bits.set_title("decoder blocks: stored bits / weight (quantized)", fontsize=10)
    ax_ent.set_title("decoder blocks: activation entropy by modality (calibration)", fontsize=10)
    if not c.blocks:
        _no_data(ax_bits, "no plan blocks")
        _no_data(ax_ent, "no plan blocks")
        return
    xs = [b["block"] for b in c.blocks]
    bars = ax_bits.bar(xs, [b["avg_bits"] for b in c.blocks], 0.6, color="C1", label="quantized")
    ax_bits.bar_label(bars, [f"{b['avg_bits']:.2f}" for b in c.blocks], fontsize=7, padding=1)
    ax_bits.axhline(4.0, color="grey", ls=":", lw=1, label="4 bits (baseline: 16)")
    ax_bits.set_ylabel("stored bits / weight")
    ax_bits.set_ylim(0, max(5.0, 1.35 * max(b["avg_bits"] for b in c.blocks)))
    ax_bits.set_xticks(xs)
    ax_bits.legend(fontsize=8, loc="upper right", ncol=2)
    ent = [(m, [b.get(f"entropy_{m}") for b in c.blocks]) for m in ("image", "text")]
    ent = [(m, v) for m, v in ent if any(e is not None for e in v)]
    if not ent:
        _no_data(ax_ent, "no calibration entropies")
        return
    for (m, vals), (style, color) in zip(ent, (("-o", "C2"), ("--s", "C3"))):
        ax_ent.plot([x for x, v in zip(xs, vals) if v is not None], [v for v in vals if v is not None], style,
                    color=color, label=f"{m} tokens")
    ax_ent.set_xticks(xs)
    ax_ent.set_xlabel("decoder block")
    ax_ent.set_ylabel("entropy (bits)")
    ax_ent.set_ylim(0, 1.3 * max(v for _, vals in ent for v in vals if v is not None))
    ax_ent.grid(alpha=0.3)
    ax_ent.legend(fontsize=8, loc="lower right", ncol=2)


def figure(c: Comparison):
    """The report figure (a matplotlib ``Figure`` on an Agg canvas, no pyplot state): accuracy, accuracy vs
    bytes, model bytes, run-time memory and decoder blocks, each on its own axes (``fig.axes`` in that order,
    the blocks as bits then entropy)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 10), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplot_mosaic([["acc", "acc", "scatter"], ["bytes", "rss", "bits"], ["bytes", "rss", "entropy"]],
                              height_ratios=[2, 1, 1])
    _accuracy_panel(axes["acc"], c)
    _scatter_panel(axes["scatter"], c)
    _model_bytes_panel(axes["bytes"], c)
    _runtime_panel(axes["rss"], c)
    _blocks_panels(axes["bits"], axes["entropy"], c)
    fig.suptitle(f"baseline {c.baseline_model}  vs  quantized {c.quantized_model}", fontsize=11)
    return fig


def figure_png(c: Comparison) -> bytes:
    """PNG bytes of :func:`figure`."""
    buf = io.BytesIO()
    figure(c).savefig(buf, format="png", dpi=100)
    return buf.getvalue()
