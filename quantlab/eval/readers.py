"""Readers for VQA benchmarks in their released on-disk formats (local paths only, no network).

Every reader checks its paths when called (``FileNotFoundError`` naming the path) and returns an iterator
of :class:`EvalItem`. Malformed annotations raise ``ValueError`` naming the file and the JSONL line or the
JSON key. Image files are never opened or checked: a missing image is the runner's failed item, not a
read error. Readers: ``read_vqav2``, ``read_textvqa``, ``read_gqa``, ``read_pope``, ``read_mme``,
``read_scienceqa``, ``read_shapes_vqa`` and ``read_hf_dataset`` (each docstring gives its layout).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantlab.eval.metrics import option_letter

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


@dataclass(frozen=True)
class EvalItem:
    """One benchmark question. ``answers`` holds every human/gold answer (a letter for multiple choice)."""

    id: str
    image: Path | None
    question: str
    answers: tuple[str, ...]
    question_type: str | None = None
    options: tuple[str, ...] | None = None
    extra: dict = field(default_factory=dict)


def _existing(path: str | Path, kind: str = "file") -> Path:
    """``Path(path)``, or ``FileNotFoundError`` naming it if it is not an existing file / directory."""
    p = Path(path)
    ok = p.is_dir() if kind == "directory" else p.is_file()
    if not ok:
        raise FileNotFoundError(f"{kind} not found: {p}")
    return p


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line_number, record)`` for every non-blank line; a bad line raises ``ValueError`` naming it."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {e.msg}") from e
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def _require(record: Any, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")


def _section(data: Any, key: str, path: Path) -> list:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise ValueError(f"{path}: expected a top-level key {key!r} holding a list")
    return data[key]


def _answer_strings(value: Any, where: str) -> tuple[str, ...]:
    """Answers given as a string, a list of strings, or a list of ``{"answer": ...}`` dicts."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)):
        try:
            return tuple(str(a["answer"]) if isinstance(a, Mapping) else str(a) for a in value)
        except KeyError:
            raise ValueError(f"{where}: answer dicts need an 'answer' key") from None
    raise ValueError(f"{where}: answers must be a string or a list, got {type(value).__name__}")


def read_vqav2(questions_json: str | Path, annotations_json: str | Path | None, image_dir: str | Path,
               split: str | None = None) -> Iterator[EvalItem]:
    """VQAv2 (or VQAv1) questions joined with their annotations.

    Args:
        questions_json: ``{"data_subtype": "val2014", "questions": [{image_id, question, question_id}]}``.
        annotations_json: ``{"annotations": [{question_id, answers: [{answer}], question_type, answer_type,
            multiple_choice_answer}]}``; ``None`` for test splits (items get no answers).
        image_dir: folder of ``COCO_{split}_{image_id:012d}.jpg`` images.
        split: image-name prefix such as ``"val2014"``; defaults to the questions file's ``data_subtype``.
    """
    qpath, image_dir = _existing(questions_json), _existing(image_dir, "directory")
    apath = None if annotations_json is None else _existing(annotations_json)
    qdata = _load_json(qpath)
    questions = _section(qdata, "questions", qpath)
    split = split or qdata.get("data_subtype")
    if not split:
        raise ValueError(f"{qpath}: no 'data_subtype' key; pass split= (e.g. 'val2014') for the image names")
    annotations: dict[Any, dict] = {}
    if apath is not None:
        for i, ann in enumerate(_section(_load_json(apath), "annotations", apath)):
            _require(ann, ("question_id", "answers"), f"{apath}: annotations[{i}]")
            annotations[ann["question_id"]] = ann
    return _iter_vqav2(questions, annotations, qpath, apath, image_dir, split)


def _iter_vqav2(questions: list, annotations: dict, qpath: Path, apath: Path | None, image_dir: Path,
                split: str) -> Iterator[EvalItem]:
    for i, q in enumerate(questions):
        _require(q, ("question_id", "image_id", "question"), f"{qpath}: questions[{i}]")
        ann: dict = {}
        if apath is not None:
            if q["question_id"] not in annotations:
                raise ValueError(f"{apath}: no annotation for question_id {q['question_id']}")
            ann = annotations[q["question_id"]]
        extra = {"image_id": q["image_id"], "answer_type": ann.get("answer_type"),
                 "multiple_choice_answer": ann.get("multiple_choice_answer")}
        yield EvalItem(str(q["question_id"]), image_dir / f"COCO_{split}_{int(q['image_id']):012d}.jpg",
                       q["question"], _answer_strings(ann.get("answers"), f"{apath}: question_id {q['question_id']}"),
                       ann.get("question_type"), None, extra)


def read_textvqa(json_path: str | Path, image_dir: str | Path) -> Iterator[EvalItem]:
    """TextVQA ``{"data": [{question_id, question, image_id, answers}]}`` with images ``{image_id}.jpg``.

    OCR tokens, when the file has them, are kept in ``extra["ocr_tokens"]``.
    """
    path, image_dir = _existing(json_path), _existing(image_dir, "directory")
    records = _section(_load_json(path), "data", path)
    return _iter_textvqa(records, path, image_dir)


def _iter_textvqa(records: list, path: Path, image_dir: Path) -> Iterator[EvalItem]:
    for i, r in enumerate(records):
        where = f"{path}: data[{i}]"
        _require(r, ("question_id", "question", "image_id"), where)
        extra = {"image_id": r["image_id"], "ocr_tokens": r.get("ocr_tokens")}
        yield EvalItem(str(r["question_id"]), image_dir / f"{r['image_id']}.jpg", r["question"],
                       _answer_strings(r.get("answers"), where), r.get("question_type"), None, extra)


def read_gqa(questions_json: str | Path, image_dir: str | Path) -> Iterator[EvalItem]:
    """GQA ``{question_id: {imageId, question, answer, ...}}`` with images ``{imageId}.jpg``.

    ``question_type`` is ``types["structural"]`` when present; ``fullAnswer`` and ``types`` go to ``extra``.
    """
    path, image_dir = _existing(questions_json), _existing(image_dir, "directory")
    data = _load_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object mapping question ids to questions")
    return _iter_gqa(data, path, image_dir)


def _iter_gqa(data: dict, path: Path, image_dir: Path) -> Iterator[EvalItem]:
    for qid, r in data.items():
        _require(r, ("imageId", "question"), f"{path}: key {qid!r}")
        types = r.get("types") or {}
        extra = {"image_id": r["imageId"], "full_answer": r.get("fullAnswer"), "types": types}
        yield EvalItem(str(qid), image_dir / f"{r['imageId']}.jpg", r["question"],
                       _answer_strings(r.get("answer"), f"{path}: key {qid!r}"), types.get("structural"), None, extra)


def read_pope(jsonl: str | Path, image_dir: str | Path) -> Iterator[EvalItem]:
    """POPE JSONL lines ``{question_id, image, text, label}``; ``question_type`` is ``category`` if given."""
    path, image_dir = _existing(jsonl), _existing(image_dir, "directory")
    return _iter_pope(path, image_dir)


def _iter_pope(path: Path, image_dir: Path) -> Iterator[EvalItem]:
    for lineno, r in _iter_jsonl(path):
        _require(r, ("question_id", "image", "text", "label"), f"{path}:{lineno}")
        yield EvalItem(str(r["question_id"]), image_dir / r["image"], r["text"], (str(r["label"]),),
                       r.get("category"), None, {})


def _mme_question_files(subtask_dir: Path) -> list[tuple[Path, Path]]:
    """``(txt_file, folder_holding_its_image)`` pairs for one MME subtask folder (either layout)."""
    qa_dir = subtask_dir / "questions_answers_YN"
    if qa_dir.is_dir():
        return [(t, subtask_dir / "images") for t in sorted(qa_dir.glob("*.txt"))]
    return [(t, subtask_dir) for t in sorted(subtask_dir.glob("*.txt"))]


def _mme_image(folder: Path, stem: str) -> Path:
    """The image named ``stem`` in ``folder`` whatever its suffix; ``stem.jpg`` if there is none."""
    for suffix in IMAGE_SUFFIXES:
        for candidate in (folder / f"{stem}{suffix}", folder / f"{stem}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    return folder / f"{stem}.jpg"


def read_mme(root: str | Path) -> Iterator[EvalItem]:
    """MME: one folder per subtask, each ``.txt`` (named after its image) holding ``question\\tanswer`` lines.

    Items get ``question_type`` = subtask and ``extra = {"subtask", "image_id"}`` (what
    :func:`quantlab.eval.metrics.mme_score` groups by). Folders without question files are skipped.
    """
    root = _existing(root, "directory")
    subtasks = [(d.name, _mme_question_files(d)) for d in sorted(root.iterdir())
                if d.is_dir() and not d.name.startswith(".")]
    subtasks = [(name, files) for name, files in subtasks if files]
    if not subtasks:
        raise ValueError(f"{root}: no MME subtask folders with question .txt files found")
    return _iter_mme(subtasks)


def _iter_mme(subtasks: list[tuple[str, list[tuple[Path, Path]]]]) -> Iterator[EvalItem]:
    for name, files in subtasks:
        for txt, image_folder in files:
            image = _mme_image(image_folder, txt.stem)
            for lineno, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                parts = line.split("\t")
                if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
                    raise ValueError(f"{txt}:{lineno}: expected 'question<TAB>answer', got {line!r}")
                yield EvalItem(f"{name}/{txt.stem}/{lineno}", image, parts[0].strip(), (parts[1].strip(),), name,
                               None, {"subtask": name, "image_id": txt.stem})


def read_scienceqa(problems_json: str | Path, image_root: str | Path, split: str | None = None
                   ) -> Iterator[EvalItem]:
    """ScienceQA ``problems.json`` (``{pid: {question, choices, answer, image, split, hint, ...}}``).

    ``answers`` is the gold letter, ``options`` the choices; the image (if any) is
    ``image_root/{split}/{pid}/{image}``; ``extra`` keeps ``hint``, ``answer_index``, ``subject`` and ``split``.
    ``split`` (e.g. ``"test"``) keeps only that split.
    """
    path, image_root = _existing(problems_json), _existing(image_root, "directory")
    data = _load_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object mapping problem ids to problems")
    return _iter_scienceqa(data, path, image_root, split)


def _iter_scienceqa(data: dict, path: Path, image_root: Path, split: str | None) -> Iterator[EvalItem]:
    for pid, r in data.items():
        where = f"{path}: key {pid!r}"
        _require(r, ("question", "choices", "answer", "split"), where)
        if split is not None and r["split"] != split:
            continue
        choices = r["choices"]
        if not isinstance(choices, list) or not isinstance(r["answer"], int) or not 0 <= r["answer"] < len(choices):
            raise ValueError(f"{where}: 'answer' must index into the 'choices' list")
        image = image_root / r["split"] / str(pid) / r["image"] if r.get("image") else None
        extra = {"hint": r.get("hint") or "", "answer_index": r["answer"], "subject": r.get("subject"),
                 "split": r["split"]}
        yield EvalItem(str(pid), image, r["question"], (option_letter(r["answer"]),), r.get("subject"),
                       tuple(str(c) for c in choices), extra)


def read_shapes_vqa(split_dir: str | Path) -> Iterator[EvalItem]:
    """A shapes-VQA split written by :func:`quantlab.data.shapes.write_split` (``questions.jsonl`` + images).

    ``extra`` keeps ``caption`` and ``objects``.
    """
    split_dir = _existing(split_dir, "directory")
    return _iter_shapes(_existing(split_dir / "questions.jsonl"), split_dir)


def _iter_shapes(path: Path, split_dir: Path) -> Iterator[EvalItem]:
    for lineno, r in _iter_jsonl(path):
        where = f"{path}:{lineno}"
        _require(r, ("question_id", "image", "question", "answer"), where)
        answers = _answer_strings(r.get("answers") or r["answer"], where)
        yield EvalItem(str(r["question_id"]), split_dir / r["image"], r["question"], answers,
                       r.get("question_type"), None, {"caption": r.get("caption"), "objects": r.get("objects")})


def _load_hf(path: Path, split: str | None, image_col: str) -> Any:
    try:
        import datasets
    except ImportError as e:
        raise ImportError("read_hf_dataset needs the 'datasets' package: pip install 'quantlab[eval]'") from e
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        ds = datasets.load_from_disk(str(path))
    else:
        files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
        kind = "parquet" if files and files[0].suffix == ".parquet" else "json"
        if not files or (kind == "json" and files[0].suffix not in (".json", ".jsonl")):
            raise ValueError(f"{path}: not a saved dataset, a .parquet/.json/.jsonl file, or a folder of parquet")
        ds = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{path} holds splits {sorted(ds)}; pass split= one of them")
        ds = ds[split]
    if isinstance(ds.features.get(image_col), datasets.Image):  # keep bytes/path, do not decode with PIL
        ds = ds.cast_column(image_col, datasets.Image(decode=False))
    return ds


def read_hf_dataset(path: str | Path, *, image_col: str, question_col: str, answers_col: str,
                    id_col: str | None = None, split: str | None = None) -> Iterator[EvalItem]:
    """Items from a Hugging Face ``datasets`` dataset on disk (``save_to_disk``) or parquet / JSON(L) files.

    ``image_col`` may hold a path string (relative paths resolve against the dataset folder) or an
    ``Image`` feature: an image stored by path becomes ``image``; one stored only as bytes gives
    ``image=None`` and ``extra["image_bytes"]``. ``answers_col`` may hold a string, a list of strings or a
    list of ``{"answer": ...}`` dicts. Without ``id_col`` the row index is the id.

    Raises:
        ImportError: if ``datasets`` is not installed (``pip install 'quantlab[eval]'``).
        ValueError: if a named column is missing, or ``split`` is needed and not given.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset path not found: {path}")
    ds = _load_hf(path, split, image_col)
    missing = [c for c in (image_col, question_col, answers_col, id_col) if c is not None and c not in ds.column_names]
    if missing:
        raise ValueError(f"{path}: column(s) {missing} not found; available: {ds.column_names}")
    base = path if path.is_dir() else path.parent
    return _iter_hf(ds, base, image_col, question_col, answers_col, id_col)


def _iter_hf(ds: Any, base: Path, image_col: str, question_col: str, answers_col: str,
             id_col: str | None) -> Iterator[EvalItem]:
    for i, row in enumerate(ds):
        value, extra = row[image_col], {}
        if isinstance(value, Mapping):  # an undecoded Image feature: {"bytes", "path"}
            if value.get("bytes") is not None:
                extra = {"image_bytes": value["bytes"], "image_name": value.get("path")}
                value = None
            else:
                value = value.get("path")
        image = None if not value else (Path(value) if Path(value).is_absolute() else base / value)
        item_id = str(row[id_col]) if id_col else str(i)
        yield EvalItem(item_id, image, str(row[question_col]),
                       _answer_strings(row[answers_col], f"{base}: row {i}"), None, None, extra)
