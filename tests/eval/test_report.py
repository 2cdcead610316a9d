"""Baseline-vs-quantized comparison and the report files (json, md, png), from synthetic results."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from quantlab.calib.artifact import CalibrationStats
from quantlab.calib.stats import TensorStats
from quantlab.eval.memory import MIB, MemoryReport
from quantlab.eval.readers import EvalItem
from quantlab.eval.report import (
    OVERALL,
    ModelSize,
    StatsEntropy,
    compare,
    figure,
    markdown,
    task_metrics,
    write_report,
)
from quantlab.eval.runner import EvalReport, FailedItem, summarize
from quantlab.eval.tasks import get_task
from quantlab.plan.summary import BlockRow, PlanTotals

ITEMS = [EvalItem(f"q{i}", None, "?", (ans,), qt) for i, (ans, qt) in
         enumerate([("red", "color"), ("blue", "color"), ("2", "count"), ("yes", "exist"), ("no", "exist")])]


def _report(model: str, preds: list[str | None], extra_task: bool = False) -> EvalReport:
    failed = [FailedItem(id=ITEMS[i].id, image=None, error="FileNotFoundError: x") for i, p in enumerate(preds)
              if p is None]
    tasks = {"shapes-vqa": summarize(get_task("shapes-vqa"), ITEMS, preds, failed, source="generated")}
    if extra_task:
        tasks["gqa"] = summarize(get_task("gqa"), ITEMS[:1], ["red"], [], source="d")
    return EvalReport(model=model, seed=0, limit=5, batch_size=4, max_new_tokens=4, tasks=tasks)


@pytest.fixture
def comparison():
    base = _report("base", ["red", "blue", "2", "yes", "no"], extra_task=True)
    quant = _report("quant", ["red", "green", "3", "yes", None])
    memory = {"baseline": MemoryReport("baseline", 100 * 2**20, 101 * 2**20, 102 * 2**20, 600 * 2**20, 400 * 2**20),
              "quantized": MemoryReport("quantized", 30 * 2**20, 31 * 2**20, 32 * 2**20, 520 * 2**20, 400 * 2**20,
                                        fits={"fits": True, "budget_bytes": 2**30, "images": 2, "text_tokens": 64,
                                              "total_bytes": 40 * 2**20, "max_images": 9})}
    return compare(base, quant, memory, sizes=SIZES, totals=TOTALS, blocks=BLOCKS)


SIZES = {"baseline": ModelSize(100 * 2**20, 64 * 2**20, 16.0), "quantized": ModelSize(30 * 2**20, 17 * 2**20, 4.25)}
TOTALS = PlanTotals(total_bytes=30 * 2**20, fp16_bytes=100 * 2**20, w4_bytes=40 * 2**20, avg_bits=4.25,
                    nominal_bits=4.0)
BLOCKS = [BlockRow(0, ("gptq-w4-g128",), 4.25, 3 * 2**20, 5.5, 4.25),
          BlockRow(1, ("billm-w1-g128", "fp16"), 3.0, 2 * 2**20, None, 3.5)]


def test_compare_rows_and_deltas(comparison):
    rows = {(r.task, r.question_type): r for r in comparison.rows}
    assert set(rows) == {("shapes-vqa", t) for t in (OVERALL, "color", "count", "exist")}
    assert rows["shapes-vqa", OVERALL].baseline == 1.0 and rows["shapes-vqa", OVERALL].quantized == pytest.approx(0.5)
    assert rows["shapes-vqa", "color"].delta == pytest.approx(-0.5) and rows["shapes-vqa", "exist"].delta == 0.0
    assert comparison.failed == {"shapes-vqa": {"baseline": 0, "quantized": 1}}
    assert any("gqa" in n for n in comparison.notes)
    assert comparison.aggregates["shapes-vqa"]["baseline"]["exist"]["accuracy"] == 1.0


def test_write_report_files(tmp_path, comparison):
    paths = write_report(tmp_path / "out", comparison)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.json", "report.md", "report.png"]
    data = json.loads(paths["json"].read_text())
    assert data["baseline_model"] == "base" and data["memory"]["quantized"]["predicted_bytes"] == 30 * 2**20
    assert {"task", "question_type", "n", "baseline", "quantized", "delta"} == set(data["rows"][0])
    md = paths["md"].read_text()
    assert "| shapes-vqa | color | 2 | 100.0 | 50.0 | -50.0 |" in md
    assert "| predicted (cost model) | 100.00 | 30.00 |" in md and "**yes**" in md
    with Image.open(paths["png"]) as im:
        assert im.format == "PNG" and im.size[0] > 600


def test_markdown_without_memory(tmp_path):
    c = compare(_report("a", ["red"] * 5), _report("b", ["red"] * 5))
    md = markdown(c)
    assert "## Memory" not in md and "## Notes" not in md and "| shapes-vqa | overall | 5 |" in md
    assert "## Model size" not in md and "## Decoder blocks" not in md and "## Accuracy vs memory" not in md
    data = json.loads(write_report(tmp_path, c)["json"].read_text())  # no sizes, plan or memory: still written
    assert data["points"] == [] and data["savings"] == {} and data["baseline"]["bytes"] is None


def test_json_for_scripts(tmp_path, comparison):
    data = json.loads(write_report(tmp_path, comparison)["json"].read_text())
    exist = {"exist/accuracy", "exist/precision", "exist/recall", "exist/f1", "exist/yes_ratio"}
    assert data["baseline"] == {"bytes": 100 * 2**20, "decoder_bytes": 64 * 2**20, "avg_bits": 16.0,
                                "tasks": {"shapes-vqa": data["baseline"]["tasks"]["shapes-vqa"],
                                          "gqa": {"accuracy": 1.0}}}
    assert set(data["baseline"]["tasks"]["shapes-vqa"]) == {"accuracy"} | exist
    assert data["baseline"]["tasks"]["shapes-vqa"]["accuracy"] == 1.0
    q = data["quantized"]
    assert (q["bytes"], q["decoder_bytes"], q["avg_bits"]) == (30 * 2**20, 17 * 2**20, 4.25)
    assert q["tasks"]["shapes-vqa"]["accuracy"] == pytest.approx(0.5) and set(q["tasks"]) == {"shapes-vqa"}
    assert data["savings"] == {"bytes": 30 * 2**20, "fp16_bytes": 100 * 2**20, "w4_bytes": 40 * 2**20,
                               "w4_scheme": "uniform GPTQ W4 g128", "vs_fp16": pytest.approx(0.7),
                               "vs_w4": pytest.approx(0.25)}
    assert data["blocks"][1] == {"block": 1, "schemes": ["billm-w1-g128", "fp16"], "avg_bits": 3.0,
                                 "bytes": 2 * 2**20, "entropy_image": None, "entropy_text": 3.5}
    assert data["points"] == [
        {"model": "baseline", "bytes": 100 * 2**20, "task": "shapes-vqa", "metric": "accuracy", "score": 1.0},
        {"model": "baseline", "bytes": 100 * 2**20, "task": "gqa", "metric": "accuracy", "score": 1.0},
        {"model": "quantized", "bytes": 30 * 2**20, "task": "shapes-vqa", "metric": "accuracy", "score": 0.5}]


def test_paired_difference_per_task(comparison):
    # q4 failed for the quantized model: 4 pairs, baseline right on all, quantized wrong on q1 and q2.
    # Bootstrap of the mean of [0, -1, -1, 0]: -k/4 with k ~ Binomial(4, 1/2), P[k=0] = P[k=4] = 1/16 > 2.5%
    p = comparison.paired["shapes-vqa"]
    assert (p.n, p.only_baseline, p.only_quantized, p.n_better, p.n_worse) == (4, 1, 0, 0, 2)
    assert (p.baseline, p.quantized, p.diff) == pytest.approx((1.0, 0.5, -0.5))
    assert (p.ci_low, p.ci_high) == pytest.approx((-1.0, 0.0))
    assert p.test == "mcnemar-exact" and p.p_value == pytest.approx(0.5)  # 2 * P[Binom(2, 1/2) = 0]
    assert "gqa" not in comparison.paired  # in one report only


def test_markdown_tables(comparison):
    md = markdown(comparison)
    assert "| shapes-vqa | accuracy | 4 | 100.0 | 50.0 | -50.0 | [-100.0, +0.0] | 0 / 2 | 0.5 (McNemar exact) |" in md
    assert "Left out (answered by one model only, baseline / quantized): shapes-vqa: 1 / 0" in md
    assert "| baseline (fp16) | 100.00 | 64.00 | 16.00 |" in md and "| quantized | 30.00 | 17.00 | 4.25 |" in md
    assert "| uniform GPTQ W4 g128 (reference) | 40.00 | - | - |" in md
    assert "**70.0%** vs fp16, **25.0%** vs uniform GPTQ W4 g128" in md
    assert "| 0 | gptq-w4-g128 | 4.25 | 3.0 | 5.500 | 4.250 |" in md  # MiB: the largest block is 3 MiB
    assert "| 1 | billm-w1-g128, fp16 | 3.00 | 2.0 | - | 3.500 |" in md
    assert "| model | bytes (MiB) | shapes-vqa: accuracy (%) | gqa: accuracy (%) |" in md
    assert "| quantized | 30.00 | 50.0 | - |" in md


def test_figure_puts_model_bytes_and_runtime_memory_on_their_own_axes(comparison):
    axes = {a.get_title().split("\n")[0]: a for a in figure(comparison).axes}
    model = next(a for t, a in axes.items() if t.startswith("model weights"))
    rss = next(a for t, a in axes.items() if t.startswith("run-time memory"))
    scatter = axes["accuracy vs model bytes"]
    # the 100 MiB model and its 600 MiB process do not share a scale: the model's bars fill its own axis
    assert model.get_ylim()[1] < 200 and rss.get_ylim()[1] >= 600
    assert "MiB" in model.get_ylabel() and "MiB" in rss.get_ylabel()
    assert {t.get_text() for t in model.get_legend().get_texts()} == \
        {"baseline", "quantized", "uniform GPTQ W4 g128 (predicted)"}
    heights = sorted(round(b.get_height(), 3) for b in model.patches)
    assert heights == [30, 31, 32, 100, 101, 102]  # MiB: predicted, on-disk tensors, files
    assert sorted(round(b.get_height()) for b in rss.patches) == [400, 400, 520, 600]
    xy = sorted(tuple(o.get_offsets()[0]) for o in scatter.collections)
    assert xy == [(30.0, 50.0), (100.0, 100.0), (100.0, 100.0)]  # (MiB, %): quantized, baseline x 2 tasks
    bits = next(a for t, a in axes.items() if "stored bits" in t)
    assert [round(b.get_height(), 2) for b in bits.patches] == [4.25, 3.0]
    assert any(t.startswith("decoder blocks: activation entropy") for t in axes)


def test_old_eval_results_without_item_scores_still_load(tmp_path):
    old = json.loads(_report("base", ["red"] * 5).model_dump_json())
    del old["tasks"]["shapes-vqa"]["item_scores"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    legacy = EvalReport.load_json(tmp_path / "old.json")
    assert legacy.tasks["shapes-vqa"].item_scores == {}
    c = compare(legacy, _report("quant", ["red"] * 5))
    assert c.paired == {} and any("no per-item scores" in n for n in c.notes)
    assert c.baseline.bytes is None and c.baseline.tasks["shapes-vqa"]["accuracy"] == pytest.approx(0.2)


def test_task_metrics_of_pope_and_mme():
    items = [EvalItem(f"p{i}", None, "?", (lab,), "random") for i, lab in enumerate(["yes", "no", "yes", "no"])]
    pope = task_metrics(summarize(get_task("pope"), items, ["yes", "yes", "yes", "no"], [], source="x"))
    assert pope["accuracy"] == pytest.approx(0.75) and pope["f1"] == pytest.approx(0.8)
    assert pope["by_category/random/precision"] == pytest.approx(2 / 3) and pope["yes_ratio"] == 0.75
    mme_items = [EvalItem(f"existence/1/{q}", None, "?", (a,), "existence", None,
                          {"subtask": "existence", "image_id": "1"}) for q, a in ((1, "Yes"), (2, "No"))]
    mme = task_metrics(summarize(get_task("mme"), mme_items, ["yes", "no"], [], source="x"))
    assert mme["accuracy"] == 1.0 and mme["perception"] == pytest.approx(200)
    assert mme["subtasks/existence/score"] == pytest.approx(200)
    vqa = task_metrics(summarize(get_task("vqav2"), [EvalItem("v", None, "?", ("2",) * 10, None)], ["2"], [],
                                 source="x"))
    assert vqa == {"vqa_accuracy": 1.0}


def _tensor_stats(entropy: float | None) -> TensorStats:
    return TensorStats(tokens=3, hist_entropy=1.0, variance=1.0, kurtosis=3.0, absmax=1.0, outlier_share=0.0,
                       kmeans_entropy=entropy, mean_sq=torch.zeros(4), mean_abs=torch.zeros(4),
                       chan_absmax=torch.zeros(4))


def test_stats_entropy_reads_what_calibration_stats_answers(tmp_path):
    blocks = {0: {"all": _tensor_stats(5.0), "image": _tensor_stats(6.0), "text": _tensor_stats(4.5)},
              1: {"all": _tensor_stats(5.5), "text": _tensor_stats(None)}}
    CalibrationStats(blocks, meta={"source": "x"}).save(tmp_path / "stats")
    full, light = CalibrationStats.load(tmp_path / "stats"), StatsEntropy.load(tmp_path / "stats")
    for modality in ("all", "image"):
        assert light.block_entropy(modality) == full.block_entropy(modality)
    assert light.block_entropy("image") == {0: 6.0} and light.block_entropy("text") == {0: 4.5}
    with pytest.raises(ValueError):
        StatsEntropy.load(tmp_path / "missing").block_entropy("image")


def test_w4_reference_keeps_linears_128_cannot_group_in_fp16(tmp_path):
    from quantlab.models import load_model
    from quantlab.models.adapter import Component
    from quantlab.models.load import ASSETS
    from quantlab.plan.cost import model_size
    from quantlab.plan.summary import W4, totals

    config = json.loads((ASSETS / "toy-llava" / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 200  # down_proj: in_features 200, not a multiple of 128
    (tmp_path / "config.json").write_text(json.dumps(config))
    lm = load_model(tmp_path / "config.json", weights=False)
    t = totals(lm, SimpleNamespace(layers={}, format="compressed-tensors"))
    mapping = {n: W4 for n, lin in lm.adapter.iter_linears(lm.model, Component.DECODER) if "down_proj" not in n}
    assert t.w4_bytes == model_size(lm.model, lm.adapter, mapping, "compressed-tensors", dtype_bytes=2).total_bytes
    assert t.fp16_bytes > t.w4_bytes and t.saving_vs_fp16 == 0.0 and t.w4_bytes / MIB > 0
