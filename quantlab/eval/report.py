"""Baseline vs quantized, side by side: accuracy per task and question type, memory, and a figure.

:func:`compare` joins two :class:`~quantlab.eval.runner.EvalReport` (tasks present in both) and the
:class:`~quantlab.eval.memory.MemoryReport` of each model; :func:`write_report` writes

| file          | content                                                                            |
|---------------|------------------------------------------------------------------------------------|
| ``report.json`` | the :class:`Comparison` (rows, aggregates, failed counts, memory, notes)         |
| ``report.md``   | accuracy table (baseline, quantized, delta) and memory table (MiB)               |
| ``report.png``  | grouped bars: accuracy per task/question type, and memory per measure            |

Each file is written to a temporary sibling and renamed into place.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantlab.eval.memory import MIB, MemoryReport
from quantlab.eval.runner import EvalReport, TaskResult, atomic_write_bytes

logger = logging.getLogger(__name__)

OVERALL = "overall"


@dataclass(frozen=True)
class Row:
    """One accuracy line: a task overall or one of its question types. Scores are in [0, 1] or None."""

    task: str
    question_type: str
    n: int
    baseline: float | None
    quantized: float | None

    @property
    def delta(self) -> float | None:
        return None if self.baseline is None or self.quantized is None else self.quantized - self.baseline


@dataclass(frozen=True)
class Comparison:
    """Everything a report shows; JSON-serialisable through :meth:`to_dict`."""

    baseline_model: str
    quantized_model: str
    rows: list[Row]
    aggregates: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> {"baseline", "quantized"}
    failed: dict[str, dict[str, int]] = field(default_factory=dict)  # task -> {"baseline", "quantized"}
    memory: dict[str, MemoryReport] = field(default_factory=dict)  # label -> report
    notes: list[str] = field(default_factory=list)
    fallbacks: dict[str, str] = field(default_factory=dict)  # module -> the plan's shape fallback

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rows"] = [{**asdict(r), "delta": r.delta} for r in self.rows]
        d["memory"] = {k: m.to_dict() for k, m in self.memory.items()}
        return d


def _task_rows(name: str, b: TaskResult, q: TaskResult) -> list[Row]:
    rows = [Row(name, OVERALL, b.n - b.n_failed, b.score, q.score)]
    for qt in sorted(set(b.per_type) | set(q.per_type)):
        bt, qq = b.per_type.get(qt), q.per_type.get(qt)
        rows.append(Row(name, qt, (bt or qq).n, bt.score if bt else None, qq.score if qq else None))
    return rows


def compare(baseline: EvalReport, quantized: EvalReport, memory: Mapping[str, MemoryReport] | None = None,
            fallbacks: Mapping[str, str] | None = None) -> Comparison:
    """Join two evaluation reports task by task (tasks in only one report are left out, with a note).

    ``fallbacks``: the plan's shape fallbacks (module -> what it got instead), reported as they are.
    """
    notes: list[str] = []
    common = [t for t in baseline.tasks if t in quantized.tasks]
    for t in sorted(set(baseline.tasks) ^ set(quantized.tasks)):
        notes.append(f"task {t!r} is in only one report; left out")
    rows: list[Row] = []
    aggregates, failed = {}, {}
    for t in common:
        b, q = baseline.tasks[t], quantized.tasks[t]
        if (b.n, b.source) != (q.n, q.source):
            notes.append(f"task {t!r}: different items (baseline n={b.n} from {b.source}, "
                         f"quantized n={q.n} from {q.source}); scores are not paired")
        rows.extend(_task_rows(t, b, q))
        aggregates[t] = {"baseline": b.aggregates, "quantized": q.aggregates}
        failed[t] = {"baseline": b.n_failed, "quantized": q.n_failed}
    for note in notes:
        logger.warning(note)
    return Comparison(baseline.model, quantized.model, rows, aggregates, failed, dict(memory or {}), notes,
                      dict(fallbacks or {}))


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _delta(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f}"


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MIB:,.2f}"


def markdown(c: Comparison) -> str:
    """The report as Markdown: accuracy table, failed items, memory table, fit verdicts, notes."""
    out = ["# Evaluation: baseline vs quantized", "", f"- baseline: `{c.baseline_model}`",
           f"- quantized: `{c.quantized_model}`", "", "## Accuracy (%)", "",
           "| task | question type | n | baseline | quantized | delta |", "|---|---|---:|---:|---:|---:|"]
    out += [f"| {r.task} | {r.question_type} | {r.n} | {_pct(r.baseline)} | {_pct(r.quantized)} | {_delta(r.delta)} |"
            for r in c.rows]
    if any(v["baseline"] or v["quantized"] for v in c.failed.values()):
        out += ["", "Failed items (unreadable images): " + ", ".join(
            f"{t}: {v['baseline']} / {v['quantized']}" for t, v in c.failed.items())]
    if c.memory:
        labels = list(c.memory)
        out += ["", "## Memory (MiB)", "", "| measure | " + " | ".join(labels) + " |",
                "|---|" + "---:|" * len(labels)]
        out += [f"| {name} | " + " | ".join(_mib(getattr(c.memory[lb], attr)) for lb in labels) + " |"
                for name, attr in MemoryReport.ROWS
                if any(getattr(m, attr) is not None for m in c.memory.values())]  # measured rows only
        for lb, m in c.memory.items():
            if m.fits is not None:
                f = m.fits
                out.append(f"\n{lb}: fits in {f['budget_bytes'] / 2**30:g} GiB with {f['images']} image(s) and "
                           f"{f['text_tokens']} text tokens: **{'yes' if f['fits'] else 'no'}** "
                           f"(need {_mib(f['total_bytes'])} MiB; at most {f['max_images']} images)")
    if c.fallbacks:
        out += ["", f"## Shape fallbacks ({len(c.fallbacks)} modules, plan.shape_fallback)", "",
                "| module | what happened |", "|---|---|"] + [f"| {n} | {why} |" for n, why in c.fallbacks.items()]
    if c.notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in c.notes]
    return "\n".join(out) + "\n"


def figure_png(c: Comparison) -> bytes:
    """PNG bytes of the report figure (matplotlib Agg, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_acc, ax_mem = fig.subplots(1, 2, width_ratios=[2, 1])
    labels = [f"{r.task}: {r.question_type}" for r in c.rows]
    xs = list(range(len(c.rows)))
    for k, (name, values) in enumerate((("baseline", [r.baseline for r in c.rows]),
                                        ("quantized", [r.quantized for r in c.rows]))):
        ax_acc.bar([x + (k - 0.5) * 0.4 for x in xs], [100 * (v or 0.0) for v in values], 0.4, label=name)
    ax_acc.set_xticks(xs, labels, rotation=45, ha="right", fontsize=8)
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_ylim(0, 115)
    ax_acc.set_title("accuracy per task / question type")
    ax_acc.legend(loc="upper right", ncol=2)
    measures = [(name, attr) for name, attr in MemoryReport.ROWS
                if any(getattr(m, attr) is not None for m in c.memory.values())]
    width = 0.8 / max(1, len(c.memory))
    for k, (label, m) in enumerate(c.memory.items()):
        ax_mem.bar([i + (k - (len(c.memory) - 1) / 2) * width for i in range(len(measures))],
                   [(getattr(m, attr) or 0) / MIB for _, attr in measures], width, label=label)
    ax_mem.set_xticks(range(len(measures)), [n for n, _ in measures], rotation=30, ha="right", fontsize=8)
    ax_mem.set_ylabel("MiB")
    ax_mem.set_title("memory")
    if c.memory:
        ax_mem.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def write_report(out_dir: str | Path, comparison: Comparison) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``report.png`` into ``out_dir`` (each atomically).

    Returns:
        ``{"json": path, "md": path, "png": path}``.
    """
    out_dir = Path(out_dir)
    data = json.dumps(comparison.to_dict(), indent=2, sort_keys=True) + "\n"
    return {"json": atomic_write_bytes(out_dir / "report.json", data.encode()),
            "md": atomic_write_bytes(out_dir / "report.md", markdown(comparison).encode()),
            "png": atomic_write_bytes(out_dir / "report.png", figure_png(comparison))}
