"""Benchmark readers on tiny fixture files, the task registry, scoring dispatch and seeded subsets."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from quantlab.eval import readers as R
from quantlab.eval import tasks as T

FIX = Path(__file__).parent / "fixtures"


# --- readers ---------------------------------------------------------------------------------------------


def test_read_vqav2(tmp_path):
    items = list(R.read_vqav2(FIX / "vqav2_questions.json", FIX / "vqav2_annotations.json", tmp_path))
    assert [i.id for i in items] == ["420", "71"]
    first = items[0]
    assert first.image == tmp_path / "COCO_val2014_000000000042.jpg"  # split from data_subtype, not checked
    assert first.answers == ("2", "2", "3") and first.question_type == "how many"
    assert first.extra["answer_type"] == "number" and first.extra["multiple_choice_answer"] == "2"
    items = list(R.read_vqav2(FIX / "vqav2_questions.json", None, tmp_path, split="test2015"))
    assert items[1].image.name == "COCO_test2015_000000000007.jpg" and items[1].answers == ()


def test_read_vqav2_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        R.read_vqav2(tmp_path / "nope.json", None, tmp_path)
    with pytest.raises(FileNotFoundError, match="no_images"):
        R.read_vqav2(FIX / "vqav2_questions.json", None, tmp_path / "no_images")
    bad = tmp_path / "ann.json"
    bad.write_text(json.dumps({"annotations": [{"question_id": 420, "answers": []}, {"question_id": 71}]}))
    with pytest.raises(ValueError, match=r"ann.json: annotations\[1\]: missing key\(s\) \['answers'\]"):
        R.read_vqav2(FIX / "vqav2_questions.json", bad, tmp_path)
    bad.write_text(json.dumps({"annotations": [{"question_id": 420, "answers": []}]}))
    with pytest.raises(ValueError, match="no annotation for question_id 71"):
        list(R.read_vqav2(FIX / "vqav2_questions.json", bad, tmp_path))
    bad.write_text(json.dumps({"questions": [{"image_id": 1, "question_id": 2, "question": "q"}]}))
    with pytest.raises(ValueError, match="data_subtype"):
        R.read_vqav2(bad, None, tmp_path)
    bad.write_text('{"questions": [')
    with pytest.raises(ValueError, match="ann.json: invalid JSON at line 1"):
        R.read_vqav2(bad, None, tmp_path)


def test_read_textvqa(tmp_path):
    items = list(R.read_textvqa(FIX / "textvqa.json", tmp_path))
    assert [i.id for i in items] == ["34602", "34603"]
    assert items[0].image == tmp_path / "003a8ae2ef43b901.jpg"
    assert len(items[0].answers) == 10 and items[0].extra["ocr_tokens"] == ["DAKOTA", "DIGITAL"]
    bad = tmp_path / "t.json"
    bad.write_text(json.dumps({"data": [{"question_id": 1, "question": "q"}]}))
    with pytest.raises(ValueError, match=r"t.json: data\[0\]: missing key\(s\) \['image_id'\]"):
        list(R.read_textvqa(bad, tmp_path))
    bad.write_text(json.dumps([{"question_id": 1}]))
    with pytest.raises(ValueError, match="'data'"):
        R.read_textvqa(bad, tmp_path)


def test_read_gqa(tmp_path):
    items = list(R.read_gqa(FIX / "gqa_questions.json", tmp_path))
    assert [(i.id, i.answers, i.question_type) for i in items] == [("20968379", ("yes",), "verify"),
                                                                  ("201307251", ("umbrella",), None)]
    assert items[0].image == tmp_path / "n288870.jpg" and items[0].extra["full_answer"] == "Yes, the sky is dark."
    bad = tmp_path / "g.json"
    bad.write_text(json.dumps({"7": ["n1", "q"]}))
    with pytest.raises(ValueError, match="key '7': expected a JSON object"):
        list(R.read_gqa(bad, tmp_path))
    bad.write_text(json.dumps({"7": {"question": "q"}}))
    with pytest.raises(ValueError, match=r"key '7': missing key\(s\) \['imageId'\]"):
        list(R.read_gqa(bad, tmp_path))


def test_read_pope(tmp_path):
    items = list(R.read_pope(FIX / "pope.jsonl", tmp_path))  # the blank line in the fixture is skipped
    assert [(i.id, i.answers, i.question_type) for i in items] == [("1", ("yes",), "adversarial"),
                                                                  ("2", ("no",), "adversarial")]
    assert items[0].image == tmp_path / "COCO_val2014_000000310196.jpg"
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"question_id": 1, "image": "a.jpg", "text": "q", "label": "yes"}\n{"question_id": 2, "ima\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: invalid JSON"):
        list(R.read_pope(bad, tmp_path))
    bad.write_text('{"question_id": 1, "image": "a.jpg", "text": "q"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: missing key\(s\) \['label'\]"):
        list(R.read_pope(bad, tmp_path))
    bad.write_text('[1, 2]\n')
    with pytest.raises(ValueError, match="p.jsonl:1: expected a JSON object"):
        list(R.read_pope(bad, tmp_path))


def _mme_tree(root: Path) -> None:
    art = root / "artwork"  # layout 1: images/ + questions_answers_YN/
    (art / "images").mkdir(parents=True)
    (art / "questions_answers_YN").mkdir()
    (art / "images" / "10002.jpg").write_bytes(b"")
    (art / "questions_answers_YN" / "10002.txt").write_text(
        "Is this artwork created by Gozzoli? Please answer yes or no.\tYes\n"
        "Is this artwork created by Monet? Please answer yes or no.\tNo\n")
    ocr = root / "OCR"  # layout 2: images and .txt side by side
    ocr.mkdir()
    (ocr / "0001.png").write_bytes(b"")
    (ocr / "0001.txt").write_text("Is the word 'STOP'? Please answer yes or no.\tYes\n\n"
                                  "Is the word 'GO'? Please answer yes or no.\tNo\n")
    (ocr / "0002.txt").write_text("Is it a sign? Please answer yes or no.\tYes\n")  # image missing: not an error
    (root / "eval_tool").mkdir()  # no question files: skipped


def test_read_mme(tmp_path):
    _mme_tree(tmp_path)
    items = list(R.read_mme(tmp_path))
    assert [i.id for i in items] == ["OCR/0001/1", "OCR/0001/3", "OCR/0002/1", "artwork/10002/1", "artwork/10002/2"]
    assert items[0].image == tmp_path / "OCR" / "0001.png"
    assert items[2].image == tmp_path / "OCR" / "0002.jpg"  # guessed path for a missing image
    assert items[3].image == tmp_path / "artwork" / "images" / "10002.jpg"
    assert items[4].answers == ("No",) and items[4].question_type == "artwork"
    assert items[4].extra == {"subtask": "artwork", "image_id": "10002"}
    assert items[4].question == "Is this artwork created by Monet? Please answer yes or no."


def test_read_mme_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_root"):
        R.read_mme(tmp_path / "missing_root")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no MME subtask folders"):
        R.read_mme(tmp_path / "empty")
    _mme_tree(tmp_path / "mme")
    (tmp_path / "mme" / "OCR" / "0002.txt").write_text("Is it a sign? Yes\n")
    with pytest.raises(ValueError, match=r"0002.txt:1: expected 'question<TAB>answer'"):
        list(R.read_mme(tmp_path / "mme"))


def test_read_scienceqa(tmp_path):
    items = list(R.read_scienceqa(FIX / "scienceqa_problems.json", tmp_path, split="test"))
    assert [i.id for i in items] == ["5", "12"]
    assert items[0].image is None and items[0].answers == ("B",) and items[0].options == ("simile", "metaphor")
    assert items[0].extra["hint"].startswith("Sing") and items[0].question_type == "language science"
    assert items[1].image == tmp_path / "test" / "12" / "image.png" and items[1].answers == ("A",)
    assert len(list(R.read_scienceqa(FIX / "scienceqa_problems.json", tmp_path))) == 3
    bad = tmp_path / "problems.json"
    bad.write_text(json.dumps({"1": {"question": "q", "choices": ["a"], "answer": 3, "split": "test"}}))
    with pytest.raises(ValueError, match="key '1': 'answer' must index"):
        list(R.read_scienceqa(bad, tmp_path))


def test_read_shapes_vqa(tmp_path):
    items = list(R.read_shapes_vqa(FIX / "shapes"))
    assert [i.id for i in items] == ["test-000000", "test-000001", "test-000002"]
    assert items[0].image == FIX / "shapes" / "images" / "test-000000.png"  # images are not shipped: fine
    assert items[0].answers == ("green",) * 10 and items[0].question_type == "color"
    assert items[2].extra["caption"].startswith("There are 3 shapes")
    (tmp_path / "questions.jsonl").write_text('{"question_id": "x", "image": "i.png", "question": "q"}\n')
    with pytest.raises(ValueError, match=r"questions.jsonl:1: missing key\(s\) \['answer'\]"):
        list(R.read_shapes_vqa(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty/questions.jsonl"):
        R.read_shapes_vqa(tmp_path / "empty")


def test_read_shapes_vqa_matches_generator(tmp_path):
    from quantlab.data import shapes
    from quantlab.data.synthetic import write_set_split

    split_dir = write_set_split(tmp_path, "shapes-vqa", "calibration", 4)
    items = list(R.read_shapes_vqa(split_dir))
    samples = list(shapes.iter_samples("calibration", 4))
    assert [(i.id, i.question, i.answers[0]) for i in items] == [(s.id, s.question, s.answer) for s in samples]
    assert all(i.image.is_file() for i in items)


def test_read_hf_dataset_without_datasets(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'quantlab\[eval\]'"):
        R.read_hf_dataset(FIX / "pope.jsonl", image_col="image", question_col="text", answers_col="label")
    with pytest.raises(FileNotFoundError, match="nope"):
        R.read_hf_dataset(tmp_path / "nope", image_col="image", question_col="text", answers_col="label")


def test_read_hf_dataset_jsonl_and_saved(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")  # keep ~/.cache clean
    items = list(R.read_hf_dataset(FIX / "pope.jsonl", image_col="image", question_col="text", answers_col="label",
                                   id_col="question_id"))
    assert [(i.id, i.answers) for i in items] == [("1", ("yes",)), ("2", ("no",))]
    assert items[0].image == FIX / "COCO_val2014_000000310196.jpg"
    with pytest.raises(ValueError, match=r"column\(s\) \['answer'\] not found"):
        R.read_hf_dataset(FIX / "pope.jsonl", image_col="image", question_col="text", answers_col="answer")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"img": "a.png", "q": "What?", "ans": [{"answer": "cat", "answer_id": 1},
                                                                       {"answer": "dog", "answer_id": 2}]}) + "\n")
    ds = datasets.load_dataset("json", data_files=str(rows), split="train", cache_dir=str(tmp_path / "cache"))
    datasets.DatasetDict({"val": ds}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match="pass split="):
        R.read_hf_dataset(tmp_path / "saved", image_col="img", question_col="q", answers_col="ans")
    (item,) = R.read_hf_dataset(tmp_path / "saved", image_col="img", question_col="q", answers_col="ans", split="val")
    assert item.id == "0" and item.image == tmp_path / "saved" / "a.png" and item.answers == ("cat", "dog")


# --- tasks -----------------------------------------------------------------------------------------------


def test_task_registry():
    assert set(T.TASKS) == {"shapes-vqa", "shapes-vqa-hard", "vqav2", "textvqa", "gqa", "pope", "mme", "scienceqa"}
    assert all(t.metric in T.SCORERS for t in T.TASKS.values())
    assert T.get_task("gqa").prompt_template == "{question}\nAnswer the question using a single word or phrase."
    with pytest.raises(KeyError, match=r"unknown task .vqa. \(did you mean .vqav2.\?\); valid: \[.gqa., .mme., .pope., .scienceqa., .shapes-vqa., .shapes-vqa-hard., .textvqa., .vqav2.\]"):
        T.get_task("vqa")


def test_format_prompt(tmp_path):
    shapes_task, item = T.get_task("shapes-vqa"), next(R.read_shapes_vqa(FIX / "shapes"))
    assert T.format_prompt(shapes_task, item) == "What color is the square?"  # raw question
    sqa = list(R.read_scienceqa(FIX / "scienceqa_problems.json", tmp_path, split="test"))
    assert T.format_prompt(T.get_task("scienceqa"), sqa[0]) == (
        "Context: Sing, O goddess, the anger of Achilles.\nWhich figure of speech is used in this text?\n"
        "A. simile\nB. metaphor\nAnswer with the option's letter from the given choices directly.")
    assert T.format_prompt(T.get_task("scienceqa"), sqa[1]).startswith("Which animal's")  # empty hint: no context
    pope = next(R.read_pope(FIX / "pope.jsonl", tmp_path))
    assert T.format_prompt(T.get_task("pope"), pope) == "Is there a snowboard in the image? Please answer yes or no."


def test_score_dispatch(tmp_path):
    shapes_item = next(R.read_shapes_vqa(FIX / "shapes"))
    assert T.score(T.get_task("shapes-vqa"), "Green.", shapes_item) == 1.0
    assert T.score(T.get_task("shapes-vqa"), "blue", shapes_item) == 0.0
    tv = list(R.read_textvqa(FIX / "textvqa.json", tmp_path))
    assert T.score(T.get_task("textvqa"), "Dakota", tv[0]) == 1.0  # 5 of 10 humans
    assert T.score(T.get_task("textvqa"), "dakota digital", tv[0]) == pytest.approx(0.9)  # 3 of 10
    vqa = list(R.read_vqav2(FIX / "vqav2_questions.json", FIX / "vqav2_annotations.json", tmp_path))
    assert T.score(T.get_task("vqav2"), "two", vqa[0]) == pytest.approx(4 / 9)  # answers 2,2,3 (n=3)
    pope = list(R.read_pope(FIX / "pope.jsonl", tmp_path))
    assert T.score(T.get_task("pope"), "Yes, there is.", pope[0]) == 1.0
    assert T.score(T.get_task("pope"), "There is no dog.", pope[1]) == 1.0
    sqa = list(R.read_scienceqa(FIX / "scienceqa_problems.json", tmp_path, split="test"))
    assert T.score(T.get_task("scienceqa"), "(B)", sqa[0]) == 1.0
    assert T.score(T.get_task("scienceqa"), "simile", sqa[0]) == 0.0
    test_item = list(R.read_vqav2(FIX / "vqav2_questions.json", None, tmp_path))[0]
    with pytest.raises(ValueError, match="no ground-truth answers"):
        T.score(T.get_task("vqav2"), "2", test_item)


def test_seeded_subset():
    items = [R.EvalItem(str(i), None, "q", ("a",)) for i in range(20)]
    a, b = T.seeded_subset(items, 5, seed=3), T.seeded_subset(iter(items), 5, seed=3)
    assert a == b and len(a) == 5
    assert [int(i.id) for i in a] == sorted(int(i.id) for i in a)  # original order kept
    assert T.seeded_subset(items, 5, seed=4) != a
    assert T.seeded_subset(items, None, 0) == items and T.seeded_subset(items, 50, 0) == items
    assert T.seeded_subset(items, 0, 0) == []
    with pytest.raises(ValueError, match="limit"):
        T.seeded_subset(items, -1, 0)
