"""The evaluation runner on a tiny random toy-llava: structure, counts, determinism, failed images, bad data;
and the lm-eval shapes_vqa task on a saved toy checkpoint (when lm_eval is importable)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from quantlab.data.shapes import QUESTION_TYPES
from quantlab.data.synthetic import write_set_split
from quantlab.eval import metrics
from quantlab.eval.readers import EvalItem
from quantlab.eval.runner import (
    EvalReport,
    FailedItem,
    TaskResult,
    evaluate,
    load_items,
    predict,
    shapes_items,
    summarize,
)
from quantlab.eval.tasks import get_task
from quantlab.models.load import LoadedModel, get_adapter
from quantlab.toys.build import build_toy

TASK_DIR = Path(__file__).resolve().parents[2] / "quantlab" / "eval" / "lm_eval_tasks"


@pytest.fixture(scope="module")
def toy() -> LoadedModel:
    model, processor = build_toy("toy-llava")
    return LoadedModel(model, processor, get_adapter(model), "toy-llava (random)")


def _strip_time(report: EvalReport) -> dict:
    d = report.model_dump()
    for t in d["tasks"].values():
        t.pop("seconds")
    return d


def test_shapes_in_memory_structure_and_determinism(toy, tmp_path):
    kw = dict(data_dir=None, limit=5, batch_size=5, max_new_tokens=2)
    report = evaluate(toy, ["shapes-vqa"], **kw)
    r = report.tasks["shapes-vqa"]
    assert r.source.startswith("generated") and (r.n, r.n_failed, r.failed) == (5, 0, [])
    assert set(r.per_type) == set(QUESTION_TYPES) and all(v.n == 1 for v in r.per_type.values())
    assert 0.0 <= r.score <= 1.0 and set(r.aggregates) == {"exist"}
    assert set(r.aggregates["exist"]) == {"accuracy", "precision", "recall", "f1", "yes_ratio"}
    assert len(r.examples) == 5 and r.examples[0].id == "test-000000"
    assert r.item_scores == {e.id: e.score for e in r.examples}  # every answered item, by id
    assert (report.model, report.limit, report.batch_size) == ("toy-llava (random)", 5, 5)
    again = evaluate(toy, ["shapes-vqa"], **{**kw, "batch_size": 2})  # batching does not change answers
    assert _strip_time(again) | {"batch_size": 5} == _strip_time(report)
    path = report.save_json(tmp_path / "sub" / "eval.json")
    assert EvalReport.load_json(path) == report and json.loads(path.read_text())["tasks"]["shapes-vqa"]["n"] == 5
    assert [p.name for p in path.parent.iterdir()] == ["eval.json"]  # no temporary left behind


def test_missing_and_corrupt_images_are_failed_items(toy, tmp_path):
    split = write_set_split(tmp_path / "shapes-vqa", "shapes-vqa", "test", 6)
    (split / "images" / "test-000001.png").unlink()
    (split / "images" / "test-000004.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    r = evaluate(toy, ["shapes-vqa"], data_dir=tmp_path, limit=None, batch_size=4, max_new_tokens=2).tasks["shapes-vqa"]
    assert r.source == str(tmp_path) and (r.n, r.n_failed) == (6, 2)
    assert [f.id for f in r.failed] == ["test-000001", "test-000004"]
    assert "FileNotFoundError" in r.failed[0].error and r.failed[0].image.endswith("test-000001.png")
    assert "UnidentifiedImageError" in r.failed[1].error
    assert sum(v.n for v in r.per_type.values()) == 4 and r.score is not None


def test_all_images_missing_gives_no_score(toy, tmp_path):
    split = write_set_split(tmp_path / "shapes-vqa", "shapes-vqa", "test", 2)
    for p in (split / "images").iterdir():
        p.unlink()
    r = evaluate(toy, ["shapes-vqa"], data_dir=tmp_path, limit=None, max_new_tokens=2).tasks["shapes-vqa"]
    assert (r.n, r.n_failed, r.score, r.per_type, r.aggregates) == (2, 2, None, {}, {})


def test_text_only_items_run_in_their_own_batches(toy):
    items = shapes_items(3)
    items.insert(1, EvalItem("t0", None, "How many shapes are there?", ("2",), "count"))
    items.append(EvalItem("t1", None, "Is there a red circle?", ("no",), "exist"))
    preds, failed = predict(toy, get_task("shapes-vqa"), items, batch_size=8, max_new_tokens=2)
    assert failed == [] and len(preds) == 5 and all(isinstance(p, str) for p in preds)


def test_malformed_annotations_raise_with_file_and_line(toy, tmp_path):
    split = write_set_split(tmp_path / "shapes-vqa", "shapes-vqa", "test", 3)
    lines = (split / "questions.jsonl").read_text().splitlines()
    lines[1] = lines[1][:-5]  # truncated JSON on line 2
    (split / "questions.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"questions\.jsonl:2: invalid JSON"):
        evaluate(toy, ["shapes-vqa"], data_dir=tmp_path, limit=None)
    lines[1] = json.dumps({"question_id": "x", "image": "images/x.png"})
    (split / "questions.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"questions\.jsonl:2: missing key"):
        evaluate(toy, ["shapes-vqa"], data_dir=tmp_path, limit=None)


def test_task_and_data_errors(tmp_path):
    with pytest.raises(KeyError, match="unknown task .nope.*valid: .*shapes-vqa"):
        load_items("nope", tmp_path, limit=None)
    with pytest.raises(ValueError, match="data_dir"):
        load_items("pope", None, limit=None)
    with pytest.raises(FileNotFoundError, match="pope"):
        load_items("pope", tmp_path, limit=None)


def test_limit_is_a_seeded_subset(tmp_path):
    write_set_split(tmp_path / "shapes-vqa", "shapes-vqa", "test", 12)
    a, _ = load_items("shapes-vqa", tmp_path, limit=5, seed=0)
    b, _ = load_items("shapes-vqa", tmp_path, limit=5, seed=0)
    c, _ = load_items("shapes-vqa", tmp_path, limit=5, seed=1)
    assert [i.id for i in a] == [i.id for i in b] and len(a) == 5 and [i.id for i in a] != [i.id for i in c]
    assert [i.id for i in a] == sorted(i.id for i in a)  # original order kept


def _pope_dir(tmp_path: Path) -> Path:
    root = tmp_path / "pope"
    (root / "images").mkdir(parents=True)
    for name, cat in (("coco_pope_random.jsonl", "random"), ("coco_pope_adversarial.jsonl", "adversarial")):
        rows = [{"question_id": i, "image": "a.jpg", "text": f"Is there a {o}?", "label": lab, "category": cat}
                for i, (o, lab) in enumerate([("dog", "yes"), ("cat", "no"), ("cow", "yes"), ("car", "no")], 1)]
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_pope_layout_and_aggregates(tmp_path):
    items, _ = load_items("pope", _pope_dir(tmp_path), limit=None)
    assert len(items) == 8 and items[0].id == "coco_pope_adversarial/1"  # ids restart per file: prefixed
    preds = ["Yes", "No", "No, there is not.", "yes", "yes", "no", "Yes.", "No"]
    r = summarize(get_task("pope"), items, preds, [], source="x")
    labels = [i.answers[0] for i in items]
    assert {k: r.aggregates[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")} == \
        metrics.pope_metrics(preds, labels)
    assert set(r.aggregates["by_category"]) == {"random", "adversarial"}
    assert r.score == pytest.approx(r.aggregates["accuracy"]) and r.per_type["adversarial"].n == 4


def test_mme_aggregate_totals():
    items = [EvalItem(f"existence/{img}/{q}", None, "?", (ans,), "existence", None,
                      {"subtask": "existence", "image_id": img}) for img, q, ans in
             (("1", 1, "Yes"), ("1", 2, "No"), ("2", 1, "Yes"), ("2", 2, "No"))]
    r = summarize(get_task("mme"), items, ["yes", "no", "yes", "yes"], [], source="x")
    assert r.aggregates["subtasks"]["existence"]["score"] == pytest.approx(75 + 50)
    assert r.aggregates["perception"] == pytest.approx(125) and r.aggregates["cognition"] == 0


def _lm_eval_untrained_toy(tmp_path, toy: str, set_name: str, n: int) -> dict:
    """lm-eval's hf-multimodal on an untrained toy checkpoint over ``n`` test items of ``set_name``, with the
    task of the same name (``shapes-vqa`` -> ``shapes_vqa``), samples logged."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    model, processor = build_toy(toy)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    split = write_set_split(tmp_path / "data", set_name, "test", n)
    tm = TaskManager(include_path=str(TASK_DIR), include_defaults=False, metadata={"split_dir": str(split)})
    return lm_eval.simple_evaluate(model="hf-multimodal", model_args=f"pretrained={ckpt},dtype=float32",
                                   tasks=[set_name.replace("-", "_")], task_manager=tm, apply_chat_template=True,
                                   batch_size=n, device="cpu", log_samples=True)


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                    reason="lm_eval is not installed (pip install 'quantlab[eval]')")
def test_lm_eval_shapes_vqa_on_toy_checkpoint(tmp_path):
    out = _lm_eval_untrained_toy(tmp_path, "toy-llava", "shapes-vqa", 5)
    res = out["results"]["shapes_vqa"]
    assert 0.0 <= res["exact_match,none"] <= 1.0 and out["n-samples"]["shapes_vqa"]["effective"] == 5
    assert {f"exact_match_{t},none" for t in QUESTION_TYPES} <= set(res)
    assert len(out["samples"]["shapes_vqa"]) == 5


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                    reason="lm_eval is not installed (pip install 'quantlab[eval]')")
def test_lm_eval_reproduces_quantlab_accuracy_on_trained_toy(tmp_path):
    """The shipped toy-llava scores the same through lm-eval's hf-multimodal as through quantlab's runner."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from quantlab.models import load_model
    from quantlab.models.load import ASSETS

    ckpt = ASSETS / "toy-llava"
    if not (ckpt / "model.safetensors").is_file():
        pytest.skip("toy-llava is not built (make toys)")
    split = write_set_split(tmp_path / "data" / "shapes-vqa", "shapes-vqa", "test", 40)
    ours = evaluate(load_model("toy-llava"), ["shapes-vqa"], data_dir=tmp_path / "data", limit=None)
    r = ours.tasks["shapes-vqa"]
    assert r.n == 40 and r.source == str(tmp_path / "data")
    tm = TaskManager(include_path=str(TASK_DIR), include_defaults=False, metadata={"split_dir": str(split)})
    out = lm_eval.simple_evaluate(model="hf-multimodal", model_args=f"pretrained={ckpt},dtype=float32",
                                  tasks=["shapes_vqa"], task_manager=tm, apply_chat_template=True, batch_size=8,
                                  device="cpu")
    theirs = out["results"]["shapes_vqa"]
    assert theirs["exact_match,none"] == pytest.approx(r.score)
    for t, s in r.per_type.items():
        assert theirs[f"exact_match_{t},none"] == pytest.approx(s.score), t


def test_item_scores_of_answered_items():
    items = [EvalItem("a", None, "?", ("red",), "color"), EvalItem("b", None, "?", ("2",), "count"),
             EvalItem("a", None, "?", ("yes",), "exist"), EvalItem("c", None, "?", ("no",), "exist")]
    failed = [FailedItem(id="b", image=None, error="FileNotFoundError: x")]
    r = summarize(get_task("shapes-vqa"), items, ["red", None, "no", "no"], failed, source="x")
    assert r.item_scores == {"a": 1.0, "a#2": 0.0, "c": 1.0}  # failed items left out; a repeated id numbered
    assert sum(r.item_scores.values()) / len(r.item_scores) == r.score
    old = json.loads(r.model_dump_json())
    del old["item_scores"]  # results written before the field existed still load
    assert TaskResult.model_validate(old).item_scores == {}


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                    reason="lm_eval is not installed (pip install 'quantlab[eval]')")
def test_lm_eval_shapes_vqa_hard_reports_every_type_and_anls(tmp_path):

    from quantlab.data import shapes_hard

    out = _lm_eval_untrained_toy(tmp_path, "toy-llava-hard", "shapes-vqa-hard", 6)  # one item of each type
    res = out["results"]["shapes_vqa_hard"]
    assert {f"exact_match_{t},none" for t in shapes_hard.QUESTION_TYPES} | {"anls_text,none"} <= set(res)
    assert out["n-samples"]["shapes_vqa_hard"]["effective"] == 6
    docs = {s["doc"]["question_id"]: s for s in out["samples"]["shapes_vqa_hard"]}
    text = next(s for s in docs.values() if s["doc"]["question_type"] == "text")
    assert text["anls_text"] == metrics.anls(text["filtered_resps"][0].strip(), text["doc"]["answers"])
