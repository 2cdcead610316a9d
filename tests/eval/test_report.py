"""Baseline-vs-quantized comparison and the report files (json, md, png), from synthetic results."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from quantlab.eval.memory import MemoryReport
from quantlab.eval.readers import EvalItem
from quantlab.eval.report import OVERALL, compare, markdown, write_report
from quantlab.eval.runner import EvalReport, FailedItem, summarize
from quantlab.eval.tasks import get_task

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
    return compare(base, quant, memory)


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


def test_markdown_without_memory():
    c = compare(_report("a", ["red"] * 5), _report("b", ["red"] * 5))
    md = markdown(c)
    assert "## Memory" not in md and "## Notes" not in md and "| shapes-vqa | overall | 5 |" in md
