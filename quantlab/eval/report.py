"""Baseline vs quantized, side by side: accuracy per task and question type, memory, and a figure.

:func:`compare` joins two :class:`~quantlab.eval.runner.EvalReport` (tasks present in both) and the
:class:`~quantlab.eval.memory.MemoryReport` of each model; :func:`write_report` writes

| file          | content                                                                            |
|---------------|------------------------------------------------------------------------------------|
| ``report.json`` | the :class:`Comparison` (rows, aggregates, failed counts, memory, notes) and, for    |
|                 | scripts, ``baseline`` / ``quantized`` ``{bytes, decoder_bytes, avg_bits, tasks}``,    |
|                 | ``paired`` (per task: quantized - baseline, bootstrap interval, sign test),          |
|                 | ``savings`` (vs fp16 and uniform GPTQ W4 g128), ``blocks`` (per decoder block bits,   |
|                 | bytes, entropy by modality) and ``points`` (accuracy vs bytes)                       |
| ``report.md``   | the same as tables: accuracy, paired differences, model size and savings, memory,    |
|                 | decoder blocks, accuracy vs memory                                                    |
| ``report.png``  | accuracy per task/question type, accuracy vs model bytes, model bytes (predicted, on |
|                 | disk), run-time memory, bits and entropy per decoder block: one panel each           |

Each file is written to a temporary sibling and renamed into place.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantlab.calib.artifact import SUMMARY_FILE
from quantlab.eval.memory import MIB, MemoryReport
from quantlab.eval.paired import N_RESAMPLES, SEED, PairedDiff, paired_difference
from quantlab.eval.runner import EvalReport, TaskResult
from quantlab.eval.tasks import TASKS
from quantlab.core.files import write_file_atomic

logger = logging.getLogger(__name__)

OVERALL = "overall"
W4_LABEL = "uniform GPTQ W4 g128"
# The name a task's overall score goes under in ``tasks``: the per-item metric, "accuracy" for right/wrong ones
METRIC_NAMES = {"exact_match": "accuracy", "pope": "accuracy", "mme": "accuracy", "multiple_choice": "accuracy"}


def metric_name(task: str) -> str:
    """The name of ``task``'s overall score (``accuracy``, ``vqa_accuracy``, ``anls``, ...)."""
    metric = TASKS[task].metric if task in TASKS else "score"
    return METRIC_NAMES.get(metric, metric)


def _numeric(d: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a nested aggregate, flattened with ``/`` (``exist/f1``, ``subtasks/OCR/score``)."""
    out: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_numeric(v, f"{prefix}{k}/"))
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def task_metrics(result: TaskResult) -> dict[str, float]:
    """``{metric: value}`` of one task: the overall score under :func:`metric_name`, then its numeric
    aggregates (POPE accuracy/precision/recall/f1/yes_ratio, MME perception/cognition, ...)."""
    out, name = _numeric(result.aggregates), metric_name(result.task)
    if result.score is not None:  # the overall score comes first, and wins over an aggregate of the same name
        out = {name: result.score, **{k: v for k, v in out.items() if k != name}}
    return out


@dataclass(frozen=True)
class ModelSize:
    """Stored bytes of one model (cost model): all weights, decoder-block Linear weights, bits per weight."""

    bytes: int
    decoder_bytes: int  # codes, scales, zero points of the decoder blocks' Linears; bias excluded
    avg_bits: float  # 8 * decoder_bytes / decoder Linear weights


@dataclass(frozen=True)
class ModelSummary:
    """One model for scripts: ``{bytes, decoder_bytes, avg_bits, tasks: {task: {metric: value}}}``."""

    bytes: int | None
    decoder_bytes: int | None
    avg_bits: float | None
    tasks: dict[str, dict[str, float]]


def model_summary(report: EvalReport, size: ModelSize | None) -> ModelSummary:
    tasks = {t: task_metrics(r) for t, r in report.tasks.items()}
    if size is None:
        return ModelSummary(None, None, None, tasks)
    return ModelSummary(size.bytes, size.decoder_bytes, size.avg_bits, tasks)


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
    baseline: ModelSummary | None = None
    quantized: ModelSummary | None = None
    paired: dict[str, PairedDiff] = field(default_factory=dict)  # task -> quantized - baseline, per item
    # bytes of the quantized model, fp16 and uniform GPTQ W4 g128 (cost model) and the savings against them
    savings: dict[str, Any] = field(default_factory=dict)
    blocks: list[dict[str, Any]] = field(default_factory=list)  # per decoder block: bits, bytes, entropies

    @property
    def points(self) -> list[dict[str, Any]]:
        """Accuracy vs memory: one ``{model, bytes, task, metric, score}`` per evaluated model and task."""
        out = []
        for name, m in (("baseline", self.baseline), ("quantized", self.quantized)):
            if m is None or m.bytes is None:
                continue
            for task, metrics in m.tasks.items():
                metric = metric_name(task)
                if metric in metrics:
                    out.append({"model": name, "bytes": m.bytes, "task": task, "metric": metric,
                                "score": metrics[metric]})
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rows"] = [{**asdict(r), "delta": r.delta} for r in self.rows]
        d["memory"] = {k: m.to_dict() for k, m in self.memory.items()}
        d["points"] = self.points
        return d


def _task_rows(name: str, b: TaskResult, q: TaskResult) -> list[Row]:
    rows = [Row(name, OVERALL, b.n - b.n_failed, b.score, q.score)]
    for qt in sorted(set(b.per_type) | set(q.per_type)):
        bt, qq = b.per_type.get(qt), q.per_type.get(qt)
        rows.append(Row(name, qt, (bt or qq).n, bt.score if bt else None, qq.score if qq else None))
    return rows


@dataclass(frozen=True)
class StatsEntropy:
    """Per-block entropies of a calibration artifact (``RUN/stats``), read from its ``summary.json`` alone.

    Answers :meth:`quantlab.calib.artifact.CalibrationStats.block_entropy` (what
    :func:`quantlab.plan.summary.block_rows` asks) without loading ``stats.safetensors``, whose Hessians can
    be tens of GB for a 7B model. A missing or unreadable directory gives no entropies.
    """

    blocks: dict[int, dict[str, dict[str, Any]]]  # block -> modality -> scalars

    @classmethod
    def load(cls, directory: str | Path) -> StatsEntropy:

        try:
            summary = json.loads((Path(directory) / SUMMARY_FILE).read_text(encoding="utf-8"))
            return cls({int(i): per for i, per in summary["blocks"].items()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            logger.warning("report: no calibration entropies from %s (%s)", directory, e)
            return cls({})

    def block_entropy(self, modality: str = "all", kind: str = "kmeans") -> dict[int, float]:
        """``{block: entropy in bits}``; raises ValueError when there is none (as CalibrationStats does)."""
        attr = "kmeans_entropy" if kind == "kmeans" else "hist_entropy"
        out = {i: float(per[modality][attr]) for i, per in self.blocks.items()
               if per.get(modality, {}).get(attr) is not None}
        if not out:
            raise ValueError(f"no {kind} entropy for modality {modality!r}")
        return out


def _savings(totals: Any) -> dict[str, Any]:
    """``totals``: a :class:`quantlab.plan.summary.PlanTotals` (or anything with its attributes)."""
    return {"bytes": totals.total_bytes, "fp16_bytes": totals.fp16_bytes, "w4_bytes": totals.w4_bytes,
            "w4_scheme": W4_LABEL, "vs_fp16": totals.saving_vs_fp16, "vs_w4": totals.saving_vs_w4}


def _block_dict(row: Any) -> dict[str, Any]:
    """A :class:`quantlab.plan.summary.BlockRow` (or a mapping with its fields) as JSON."""
    d = dict(row) if isinstance(row, Mapping) else asdict(row)
    return {**d, "schemes": list(d["schemes"])}


def compare(baseline: EvalReport, quantized: EvalReport, memory: Mapping[str, MemoryReport] | None = None,
            fallbacks: Mapping[str, str] | None = None, *, sizes: Mapping[str, ModelSize] | None = None,
            totals: Any = None, blocks: list | None = None, n_resamples: int = N_RESAMPLES,
            seed: int = SEED) -> Comparison:
    """Join two evaluation reports task by task (tasks in only one report are left out, with a note).

    Args:
        fallbacks: the plan's shape fallbacks (module -> what it got instead), reported as they are.
        sizes: ``{"baseline": ModelSize, "quantized": ModelSize}`` (cost model); without them the
            ``baseline``/``quantized`` summaries have no bytes.
        totals: the plan's :class:`~quantlab.plan.summary.PlanTotals` (savings vs fp16 and uniform W4).
        blocks: the plan's :class:`~quantlab.plan.summary.BlockRow` list (bits, bytes, entropies).
        n_resamples, seed: of the paired bootstrap (:func:`quantlab.eval.paired.paired_difference`).
    """
    notes: list[str] = []
    common = [t for t in baseline.tasks if t in quantized.tasks]
    for t in sorted(set(baseline.tasks) ^ set(quantized.tasks)):
        notes.append(f"task {t!r} is in only one report; left out")
    rows: list[Row] = []
    aggregates, failed, paired = {}, {}, {}
    for t in common:
        b, q = baseline.tasks[t], quantized.tasks[t]
        if (b.n, b.source) != (q.n, q.source):
            notes.append(f"task {t!r}: different items (baseline n={b.n} from {b.source}, "
                         f"quantized n={q.n} from {q.source}); scores are not paired")
        elif not (b.item_scores and q.item_scores):
            if b.n > b.n_failed and q.n > q.n_failed:
                notes.append(f"task {t!r}: no per-item scores in the evaluation results (written by an older "
                             "quantlab?); no paired difference (rerun the eval stage)")
        else:
            p = paired_difference(b.item_scores, q.item_scores, n_resamples=n_resamples, seed=seed)
            if p is not None:
                paired[t] = p
        rows.extend(_task_rows(t, b, q))
        aggregates[t] = {"baseline": b.aggregates, "quantized": q.aggregates}
        failed[t] = {"baseline": b.n_failed, "quantized": q.n_failed}
    for note in notes:
        logger.warning(note)
    sizes = sizes or {}
    return Comparison(baseline.model, quantized.model, rows, aggregates, failed, dict(memory or {}), notes,
                      dict(fallbacks or {}), baseline=model_summary(baseline, sizes.get("baseline")),
                      quantized=model_summary(quantized, sizes.get("quantized")), paired=paired,
                      savings=_savings(totals) if totals is not None else {},
                      blocks=[_block_dict(r) for r in blocks or []])


def _formatter(spec: str, scale: float = 1.0, suffix: str = "") -> Callable[[float | None], str]:
    """A cell formatter: ``-`` for a missing value, else ``scale * x`` in ``spec`` plus ``suffix``."""
    return lambda x: "-" if x is None else f"{format(scale * x, spec)}{suffix}"


_pct, _delta, _share = _formatter(".1f", 100), _formatter("+.1f", 100), _formatter(".1f", 100, "%")
_mib, _bits, _entropy = _formatter(",.2f", 1 / MIB), _formatter(".2f"), _formatter(".3f")


def _unit(nbytes: float) -> tuple[str, int]:
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


def _paired_md(c: Comparison) -> list[str]:
    if not c.paired:
        return []
    any_p = next(iter(c.paired.values()))
    out = ["", "## Paired difference: quantized - baseline (%, items both answered)", "",
           f"| task | metric | n | baseline | quantized | delta | {100 * any_p.level:g}% CI | better / worse | p |",
           "|---|---|---:|---:|---:|---:|---|---:|---:|"]
    for t, p in c.paired.items():
        test = "McNemar exact" if p.test == "mcnemar-exact" else "sign test"
        out.append(f"| {t} | {metric_name(t)} | {p.n} | {_pct(p.baseline)} | {_pct(p.quantized)} | "
                   f"{_delta(p.diff)} | [{_delta(p.ci_low)}, {_delta(p.ci_high)}] | {p.n_better} / {p.n_worse} | "
                   f"{p.p_value:.3g} ({test}) |")
    out += ["", (f"Interval: percentile bootstrap over items ({any_p.n_resamples:,} resamples, seed {any_p.seed}). "
                 "p: exact two-sided sign test on the items that changed (McNemar's exact test for right/wrong "
                 "scores); better / worse: items the quantized model scored higher / lower.")]
    skipped = {t: (p.only_baseline, p.only_quantized) for t, p in c.paired.items()
               if p.only_baseline or p.only_quantized}
    if skipped:
        out.append("Left out (answered by one model only, baseline / quantized): "
                   + ", ".join(f"{t}: {b} / {q}" for t, (b, q) in skipped.items()))
    return out


def _size_md(c: Comparison) -> list[str]:
    models = [(lb, m) for lb, m in (("baseline (fp16)", c.baseline), ("quantized", c.quantized))
              if m is not None and m.bytes is not None]
    if not models and not c.savings:
        return []
    out = ["", "## Model size (stored bytes, cost model)", "",
           "| model | all weights (MiB) | decoder Linears (MiB) | stored bits / decoder weight |",
           "|---|---:|---:|---:|"]
    out += [f"| {lb} | {_mib(m.bytes)} | {_mib(m.decoder_bytes)} | {_bits(m.avg_bits)} |" for lb, m in models]
    s = c.savings
    if s:
        out.append(f"| {W4_LABEL} (reference) | {_mib(s['w4_bytes'])} | - | - |")
        out += ["", (f"Saving of the quantized model (all weights): **{_share(s['vs_fp16'])}** vs fp16, "
                     f"**{_share(s['vs_w4'])}** vs {W4_LABEL} (every decoder Linear; a width 128 does not "
                     "divide stays fp16). Negative: larger.")]
    return out


def _blocks_md(c: Comparison) -> list[str]:
    if not c.blocks:
        return []
    unit, div = _unit(max(b["bytes"] for b in c.blocks))
    out = ["", "## Decoder blocks: bits and activation entropy by modality", "",
           (f"| block | schemes | stored bits / weight | Linears ({unit}) | entropy, image tokens (bits) | "
            "entropy, text tokens (bits) |"), "|---:|---|---:|---:|---:|---:|"]
    out += [f"| {b['block']} | {', '.join(b['schemes'])} | {_bits(b['avg_bits'])} | {b['bytes'] / div:,.1f} | "
            f"{_entropy(b.get('entropy_image'))} | {_entropy(b.get('entropy_text'))} |" for b in c.blocks]
    if all(b.get("entropy_image") is None and b.get("entropy_text") is None for b in c.blocks):
        out += ["", "(no calibration entropies: RUN/stats has none for these blocks)"]
    return out


def _points_md(c: Comparison) -> list[str]:
    pts = c.points
    if not pts:
        return []
    cols = list(dict.fromkeys((p["task"], p["metric"]) for p in pts))
    out = ["", "## Accuracy vs memory", "",
           "| model | bytes (MiB) | " + " | ".join(f"{t}: {m} (%)" for t, m in cols) + " |",
           "|---|---:|" + "---:|" * len(cols)]
    for model in dict.fromkeys(p["model"] for p in pts):
        mine = {(p["task"], p["metric"]): p for p in pts if p["model"] == model}
        nbytes = next(iter(mine.values()))["bytes"]
        out.append(f"| {model} | {_mib(nbytes)} | " + " | ".join(_pct(mine[k]["score"]) if k in mine else "-"
                                                             for k in cols) + " |")
    return out


def markdown(c: Comparison) -> str:
    """The report as Markdown: accuracy, paired differences, model size and savings, memory, fit verdicts,
    decoder blocks, accuracy vs memory, shape fallbacks, notes."""
    out = ["# Evaluation: baseline vs quantized", "", f"- baseline: `{c.baseline_model}`",
           f"- quantized: `{c.quantized_model}`", "", "## Accuracy (%)", "",
           "| task | question type | n | baseline | quantized | delta |", "|---|---|---:|---:|---:|---:|"]
    out += [f"| {r.task} | {r.question_type} | {r.n} | {_pct(r.baseline)} | {_pct(r.quantized)} | {_delta(r.delta)} |"
            for r in c.rows]
    if any(v["baseline"] or v["quantized"] for v in c.failed.values()):
        out += ["", "Failed items (unreadable images): " + ", ".join(
            f"{t}: {v['baseline']} / {v['quantized']}" for t, v in c.failed.items())]
    out += _paired_md(c)
    out += _size_md(c)
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
    out += _blocks_md(c)
    out += _points_md(c)
    if c.fallbacks:
        out += ["", f"## Shape fallbacks ({len(c.fallbacks)} modules, plan.shape_fallback)", "",
                "| module | what happened |", "|---|---|"] + [f"| {n} | {why} |" for n, why in c.fallbacks.items()]
    if c.notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in c.notes]
    return "\n".join(out) + "\n"


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
        title += "\n" + "; ".join(f"{t}: delta {_delta(p.diff)} pts, {100 * p.level:g}% CI "
                                   f"[{_delta(p.ci_low)}, {_delta(p.ci_high)}]" for t, p in c.paired.items())
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
    unit, div = _unit(top)
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
    unit, div = _unit(max(p["bytes"] for p in pts))
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


def write_report(out_dir: str | Path, comparison: Comparison) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``report.png`` into ``out_dir`` (each atomically).

    Returns:
        ``{"json": path, "md": path, "png": path}``.
    """
    out_dir = Path(out_dir)
    data = json.dumps(comparison.to_dict(), indent=2, sort_keys=True) + "\n"
    return {"json": write_file_atomic(out_dir / "report.json", data.encode()),
            "md": write_file_atomic(out_dir / "report.md", markdown(comparison).encode()),
            "png": write_file_atomic(out_dir / "report.png", figure_png(comparison))}
