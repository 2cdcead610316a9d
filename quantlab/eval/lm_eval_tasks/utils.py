"""lm-evaluation-harness (0.4.x) hooks for ``shapes_vqa.yaml`` and ``shapes_vqa_hard.yaml``: a local
shapes-VQA (or shapes-VQA-hard) split as a multimodal task.

The prompt and the metric are quantlab's own (:data:`quantlab.eval.tasks.TASKS` ``["shapes-vqa"]``: the raw
question, exact match with case and punctuation ignored), so ``lm_eval`` and ``quantlab eval`` score the
same answers the same way. The image goes first (``<image>`` placeholder); with ``--apply_chat_template``
lm-eval turns it into an image entry of the chat message and the model's own template places it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image

from quantlab.data.synthetic import SETS, write_set_split
from quantlab.eval.metrics import anls, exact_match
from quantlab.eval.readers import read_shapes_vqa

ENV_VAR = "QUANTLAB_SHAPES_VQA_DIR"
HARD_ENV_VAR = "QUANTLAB_SHAPES_VQA_HARD_DIR"
DEFAULT_N = 200


def split_records(split_dir: str | Path) -> list[dict[str, Any]]:
    """One flat record per question of a split (image as an absolute path); malformed lines raise ValueError."""
    return [{"question_id": it.id, "image": str(Path(it.image).resolve()), "question": it.question,
             "answer": it.answers[0], "answers": list(it.answers), "question_type": it.question_type or ""}
            for it in read_shapes_vqa(split_dir)]


def _load(set_name: str, env_var: str, split_dir: str | None, n: int):
    import datasets

    split_dir = split_dir or os.environ.get(env_var)
    if not split_dir:
        split_dir = write_set_split(tempfile.mkdtemp(prefix=f"{set_name}-"), set_name, "test", int(n))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(split_records(split_dir))})


def load_split(split_dir: str | None = None, n: int = DEFAULT_N, **_metadata: Any):
    """``custom_dataset`` hook: ``{"test": Dataset}`` from ``split_dir``, ``$QUANTLAB_SHAPES_VQA_DIR``, or
    ``n`` freshly generated test items. lm-eval passes the task metadata (``version``, ...) as keywords."""
    return _load("shapes-vqa", ENV_VAR, split_dir, n)


def load_hard_split(split_dir: str | None = None, n: int = DEFAULT_N, **_metadata: Any):
    """``custom_dataset`` hook of ``shapes_vqa_hard``: as :func:`load_split`, from
    ``$QUANTLAB_SHAPES_VQA_HARD_DIR`` or generated shapes-VQA-hard test items."""
    return _load("shapes-vqa-hard", HARD_ENV_VAR, split_dir, n)


def doc_to_image(doc: dict[str, Any]) -> list[Image.Image]:
    """The document's image, decoded and converted to RGB."""
    with Image.open(doc["image"]) as im:
        return [im.convert("RGB")]


def doc_to_text(doc: dict[str, Any]) -> str:
    """``<image>`` followed by the raw question (quantlab's shapes-vqa prompt)."""
    return f"<image>{doc['question']}"


def _scores(set_name: str, doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    member = SETS.get(set_name)
    prediction = results[0].strip()
    score = exact_match(prediction, doc["answers"])
    out = {"exact_match": score}
    if doc["question_type"] in member.question_types:
        out[f"exact_match_{doc['question_type']}"] = score
    if doc["question_type"] in member.text_types:
        out["anls_text"] = anls(prediction, doc["answers"])
    return out


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """Exact match overall and under ``exact_match_<question_type>`` (only for the document's own type)."""
    return _scores("shapes-vqa", doc, results)


def process_hard_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """As :func:`process_results` over shapes-VQA-hard's types; text questions add ``anls_text``."""
    return _scores("shapes-vqa-hard", doc, results)
