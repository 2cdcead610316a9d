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

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantlab.calib.artifact import SUMMARY_FILE
from quantlab.core.files import write_file_atomic
from quantlab.eval.memory import MemoryReport
from quantlab.eval.paired import N_RESAMPLES, SEED, PairedDiff, paired_difference
from quantlab.eval.report_figure import (  # noqa: F401 - figure: part of the report's API
    W4_LABEL,
    byte_unit,
    cell_bits,
    cell_delta,
    cell_entropy,
    cell_mib,
    cell_pct,
    cell_share,
    figure,
    figure_png,
)
from quantlab.eval.runner import EvalReport, TaskResult
from quantlab.eval.tasks import TASKS

logger = logging.getLogger(__name__)

OVERALL = "overall"
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
    # per pipeline stage: {"forecast_bytes", "peak_bytes"} of this process's host memory (the run's own)
    stage_memory: dict[str, dict[str, Any]] = field(default_factory=dict)
    # quantlab.eval.embeddings.EmbeddingCheck.to_dict() when the plan quantized vision or projector Linears
    vision_check: dict[str, Any] | None = None

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


def _paired_md(c: Comparison) -> list[str]:
    if not c.paired:
        return []
    any_p = next(iter(c.paired.values()))
    out = ["", "## Paired difference: quantized - baseline (%, items both answered)", "",
           f"| task | metric | n | baseline | quantized | delta | {100 * any_p.level:g}% CI | better / worse | p |",
           "|---|---|---:|---:|---:|---:|---|---:|---:|"]
    for t, p in c.paired.items():
        test = "McNemar exact" if p.test == "mcnemar-exact" else "sign test"
        out.append(f"| {t} | {metric_name(t)} | {p.n} | {cell_pct(p.baseline)} | {cell_pct(p.quantized)} | "
                   f"{cell_delta(p.diff)} | [{cell_delta(p.ci_low)}, {cell_delta(p.ci_high)}] | {p.n_better} / {p.n_worse} | "
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
    out += [f"| {lb} | {cell_mib(m.bytes)} | {cell_mib(m.decoder_bytes)} | {cell_bits(m.avg_bits)} |" for lb, m in models]
    s = c.savings
    if s:
        out.append(f"| {W4_LABEL} (reference) | {cell_mib(s['w4_bytes'])} | - | - |")
        out += ["", (f"Saving of the quantized model (all weights): **{cell_share(s['vs_fp16'])}** vs fp16, "
                     f"**{cell_share(s['vs_w4'])}** vs {W4_LABEL} (every decoder Linear; a width 128 does not "
                     "divide stays fp16). Negative: larger.")]
    return out


def _blocks_md(c: Comparison) -> list[str]:
    if not c.blocks:
        return []
    unit, div = byte_unit(max(b["bytes"] for b in c.blocks))
    out = ["", "## Decoder blocks: bits and activation entropy by modality", "",
           (f"| block | schemes | stored bits / weight | Linears ({unit}) | entropy, image tokens (bits) | "
            "entropy, text tokens (bits) |"), "|---:|---|---:|---:|---:|---:|"]
    out += [f"| {b['block']} | {', '.join(b['schemes'])} | {cell_bits(b['avg_bits'])} | {b['bytes'] / div:,.1f} | "
            f"{cell_entropy(b.get('entropy_image'))} | {cell_entropy(b.get('entropy_text'))} |" for b in c.blocks]
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
        out.append(f"| {model} | {cell_mib(nbytes)} | " + " | ".join(cell_pct(mine[k]["score"]) if k in mine else "-"
                                                             for k in cols) + " |")
    return out


def markdown(c: Comparison) -> str:
    """The report as Markdown: accuracy, paired differences, model size and savings, memory, fit verdicts,
    decoder blocks, accuracy vs memory, shape fallbacks, notes."""
    out = ["# Evaluation: baseline vs quantized", "", f"- baseline: `{c.baseline_model}`",
           f"- quantized: `{c.quantized_model}`", "", "## Accuracy (%)", "",
           "| task | question type | n | baseline | quantized | delta |", "|---|---|---:|---:|---:|---:|"]
    out += [f"| {r.task} | {r.question_type} | {r.n} | {cell_pct(r.baseline)} | {cell_pct(r.quantized)} | {cell_delta(r.delta)} |"
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
        out += [f"| {name} | " + " | ".join(cell_mib(getattr(c.memory[lb], attr)) for lb in labels) + " |"
                for name, attr in MemoryReport.ROWS
                if any(getattr(m, attr) is not None for m in c.memory.values())]  # measured rows only
        for lb, m in c.memory.items():
            if m.runtime_note is not None:
                out.append(f"\n{lb}: run-time memory not measured: {m.runtime_note}")
            if m.fits is not None:
                f = m.fits
                out.append(f"\n{lb}: fits in {f['budget_bytes'] / 2**30:g} GiB with {f['images']} image(s) and "
                           f"{f['text_tokens']} text tokens: **{'yes' if f['fits'] else 'no'}** "
                           f"(need {cell_mib(f['total_bytes'])} MiB; at most {f['max_images']} images)")
    out += _vision_check_md(c)
    out += _stage_memory_md(c)
    out += _blocks_md(c)
    out += _points_md(c)
    if c.fallbacks:
        out += ["", f"## Shape fallbacks ({len(c.fallbacks)} modules, plan.shape_fallback)", "",
                "| module | what happened |", "|---|---|"] + [f"| {n} | {why} |" for n, why in c.fallbacks.items()]
    if c.notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in c.notes]
    return "\n".join(out) + "\n"


def _vision_check_md(c: Comparison) -> list[str]:
    v = c.vision_check
    if not v:
        return []
    threshold = "none (reported only)" if v.get("min_cosine") is None else f"{v['min_cosine']:g}"
    return ["", "## Vision tower: image embeddings vs full precision", "",
            f"{v['n_images']} held-out images, {v['n_tokens']} image tokens (projector outputs).", "",
            "| cosine, mean | cosine, min | relative error | threshold on the mean | passed |",
            "|---:|---:|---:|---:|---|",
            (f"| {v['cosine_mean']:.4f} | {v['cosine_min']:.4f} | {v['rel_error']:.4f} | {threshold} | "
             f"{'yes' if v['passed'] else 'no'} |")]


def _stage_memory_md(c: Comparison) -> list[str]:
    if not c.stage_memory:
        return []
    out = ["", "## Host memory of the run, by stage (MiB)", "", "| stage | forecast | measured peak | measured / forecast |",
           "|---|---:|---:|---:|"]
    for stage, m in c.stage_memory.items():
        f, p = m.get("forecast_bytes"), m.get("peak_bytes")
        ratio = f"{p / f:.2f}" if f and p else "-"
        out.append(f"| {stage} | {cell_mib(f)} | {cell_mib(p)} | {ratio} |")
    return out


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
