"""Calibration data: a seeded mix of image+text and text-only samples, prepared by the model's processor.

Sources (``CalibSource.kind``):

| kind       | path                                   | what each record gives                                  |
|------------|----------------------------------------|---------------------------------------------------------|
| shapes     | none (generated) or a split directory  | image + question (image samples), caption (text samples)|
| shapes-hard | none (generated) or a split directory | the same, from shapes-VQA-hard (the hard toys' task)    |
| jsonl      | a ``.jsonl`` file                      | ``image`` (relative to the file) + ``prompt``/``text``  |
| folder     | a directory of images                  | image + a fixed prompt                                  |
| text       | a ``.txt`` (one sample per paragraph) or ``.jsonl`` with a ``text`` field | text only   |
| hf         | a ``datasets`` dir (save_to_disk) or parquet/jsonl files | columns set by ``image_column``/``text_column`` |

LUQ's ``alpha`` is the share of image+text samples: ``round(alpha * num_samples)`` come from image
sources, the rest from text sources. Everything is seeded: the same options give the same samples.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from quantlab.calib.executor import CalibSample
from quantlab.core.registry import Member, Registry
from quantlab.data.synthetic import SETS
from quantlab.models.inputs import build_inputs
from quantlab.models.load import LoadedModel

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}


class CalibSource(BaseModel):
    """One place calibration samples come from."""

    model_config = ConfigDict(extra="forbid")

    kind: str = Field(description="shapes | shapes-hard (built-in generators) | jsonl | folder (images) | text (one sample per "
                                  "line) | hf (a `datasets` dataset)")
    path: str | None = Field(default=None, description="file, folder or dataset name (every kind but shapes and shapes-hard)")
    prompt: str = Field(default="Describe the image.", description="prompt for images that come without one")
    image_column: str = Field(default="image", description="jsonl / hf: the image field")
    text_column: str = Field(default="text", description="jsonl / hf: the text field")


class CalibDataOptions(BaseModel):
    """How many samples, which mix, and the per-sample budgets."""

    model_config = ConfigDict(extra="forbid")

    num_samples: int = Field(default=64, ge=1, description="calibration samples in all (raise it for real models)")
    alpha: float = Field(default=0.5, ge=0.0, le=1.0, description="share of image+text samples (LUQ)")
    max_tokens: int = Field(default=512, ge=8, description="tokens per sample at most (longer ones are cut)")
    max_pixels: int = Field(default=448 * 448, ge=1, description="images larger than this are downscaled")
    seed: int = Field(default=0, description="seeds sampling and shuffling")
    image_sources: list[CalibSource] = Field(default_factory=lambda: [CalibSource(kind="shapes")],
                                             description="where image+text samples come from")
    text_sources: list[CalibSource] = Field(default_factory=lambda: [CalibSource(kind="shapes")],
                                            description="where text-only samples come from")


@dataclass
class CalibSet:
    """Prepared samples plus what was skipped and why (reported in the stats summary)."""

    samples: list[CalibSample]
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def n_image(self) -> int:
        return sum(s.has_image for s in self.samples)

    @property
    def n_text(self) -> int:
        return len(self.samples) - self.n_image


@dataclass(frozen=True)
class RawSample:
    id: str
    prompt: str
    image: Path | Image.Image | None


def _need(path: str | None, kind: str) -> Path:
    if not path:
        raise ValueError(f"calibration source kind {kind!r} needs a 'path'")
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"calibration source {kind!r}: {p} does not exist")
    return p


def _jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err


def _shapes_images(src: CalibSource, n: int, seed: int, set_name: str = "shapes-vqa") -> Iterator[RawSample]:
    if src.path:  # an on-disk split written by quantlab.data.synthetic.write_set_split
        yield from _jsonl_images(CalibSource(kind="jsonl", path=str(Path(src.path) / "questions.jsonl"),
                                             text_column="question"), n, seed)
        return
    for s in SETS.get(set_name).samples("calibration", n, start=seed * 100_000):
        yield RawSample(s.id, s.question, s.render())


def _jsonl_images(src: CalibSource, n: int, seed: int) -> Iterator[RawSample]:
    path = _need(src.path, "jsonl")
    for lineno, rec in _jsonl(path):
        if src.image_column not in rec:
            raise ValueError(f"{path}:{lineno}: missing key {src.image_column!r} (keys: {sorted(rec)})")
        prompt = rec.get(src.text_column) or rec.get("prompt") or rec.get("question") or rec.get("caption") or src.prompt
        yield RawSample(str(rec.get("id", f"{path.name}:{lineno}")), prompt, path.parent / rec[src.image_column])


def _folder_images(src: CalibSource, n: int, seed: int) -> Iterator[RawSample]:
    path = _need(src.path, "folder")
    for img in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        yield RawSample(str(img.relative_to(path)), src.prompt, img)


def _hf_images(src: CalibSource, n: int, seed: int) -> Iterator[RawSample]:
    for i, rec in enumerate(_hf_records(src)):
        yield RawSample(f"hf:{i}", str(rec.get(src.text_column) or src.prompt), rec[src.image_column])


def _shapes_texts(src: CalibSource, n: int, seed: int, set_name: str = "shapes-vqa") -> Iterator[RawSample]:
    for s in SETS.get(set_name).samples("calibration", n, start=seed * 100_000 + 50_000):
        yield RawSample(s.id + "-caption", s.caption(), None)


def _text_file(src: CalibSource, n: int, seed: int) -> Iterator[RawSample]:
    path = _need(src.path, "text")
    if path.suffix == ".jsonl":
        for lineno, rec in _jsonl(path):
            if src.text_column not in rec:
                raise ValueError(f"{path}:{lineno}: missing key {src.text_column!r}")
            yield RawSample(f"{path.name}:{lineno}", str(rec[src.text_column]), None)
    else:
        paras = [p.strip() for p in path.read_text().split("\n\n") if p.strip()]
        for i, p in enumerate(paras):
            yield RawSample(f"{path.name}:{i}", p, None)


def _hf_texts(src: CalibSource, n: int, seed: int) -> Iterator[RawSample]:
    for i, rec in enumerate(_hf_records(src)):
        yield RawSample(f"hf:{i}", str(rec[src.text_column]), None)


Reader = Callable[[CalibSource, int, int], Iterator[RawSample]]


class SourceKind(Member):
    """A kind of calibration source: how it yields image+text records and/or text-only records.

    Attributes:
        images: ``(source, n, seed) -> records`` with an image each, or None when the kind has no images.
        texts: ``(source, n, seed) -> records`` without images, or None.
        needs_path: the source's ``path`` must be given.
        local_path: a given ``path`` is a local file or folder that must exist (checked before any work);
            False for ``hf``, whose path may name a dataset.
    """

    images: Reader | None = None
    texts: Reader | None = None
    needs_path: bool = True
    local_path: bool = True


SOURCES: Registry[SourceKind] = Registry("calibration source kind")
for _kind in (SourceKind(name="shapes", images=_shapes_images, texts=_shapes_texts, needs_path=False),
              SourceKind(name="shapes-hard", images=partial(_shapes_images, set_name="shapes-vqa-hard"),
                         texts=partial(_shapes_texts, set_name="shapes-vqa-hard"), needs_path=False),
              SourceKind(name="jsonl", images=_jsonl_images),
              SourceKind(name="folder", images=_folder_images),
              SourceKind(name="text", texts=_text_file),
              SourceKind(name="hf", images=_hf_images, texts=_hf_texts, needs_path=False, local_path=False)):
    SOURCES.register(_kind)
IMAGE_SOURCE_KINDS = tuple(k.name for k in SOURCES.values() if k.images is not None)
TEXT_SOURCE_KINDS = tuple(k.name for k in SOURCES.values() if k.texts is not None)


def iter_image_source(src: CalibSource, n: int, seed: int) -> Iterator[RawSample]:
    """Up to ``n`` image+text records of one source."""
    kind = SOURCES.get(src.kind)
    if kind.images is None:
        raise ValueError(f"calibration source kind {src.kind!r} has no images; image kinds: {IMAGE_SOURCE_KINDS}")
    return kind.images(src, n, seed)


def iter_text_source(src: CalibSource, n: int, seed: int) -> Iterator[RawSample]:
    """Up to ``n`` text-only records of one source."""
    kind = SOURCES.get(src.kind)
    if kind.texts is None:
        raise ValueError(f"calibration source kind {src.kind!r} has no text records; text kinds: {TEXT_SOURCE_KINDS}")
    return kind.texts(src, n, seed)


def _hf_records(src: CalibSource) -> Iterator[dict]:
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("calibration source kind 'hf' needs `datasets`: pip install 'quantlab[eval]'") from err
    path = _need(src.path, "hf")
    if path.is_dir() and (path / "dataset_info.json").exists() or (path / "state.json").exists():
        ds = datasets.load_from_disk(str(path))
    else:
        files = [str(p) for p in ([path] if path.is_file() else sorted(path.glob("*")))]
        kind = "parquet" if files and files[0].endswith(".parquet") else "json"
        ds = datasets.load_dataset(kind, data_files=files, split="train")
    for col in (src.image_column, src.text_column):
        if col not in ds.column_names and col:
            log.debug("column %s not in %s", col, ds.column_names)
    yield from ds


def _open_image(img: Path | Image.Image, max_pixels: int) -> Image.Image:
    if isinstance(img, Image.Image):
        im = img
    else:
        with Image.open(img) as f:
            im = f.convert("RGB")
            im.load()
    if im.width * im.height > max_pixels:
        scale = (max_pixels / (im.width * im.height)) ** 0.5
        im = im.resize((max(1, int(im.width * scale)), max(1, int(im.height * scale))), Image.BICUBIC)
    return im.convert("RGB")


def _take(it: Iterator[RawSample], n: int, seed: int) -> list[RawSample]:
    """A seeded choice of ``n`` records from a stream (reads at most 4n records)."""
    pool = [r for _, r in zip(range(4 * n), it)]
    random.Random(seed).shuffle(pool)
    return pool[:n]


def _truncate(inputs: dict, mask, max_tokens: int) -> dict | None:
    """Cut text after the last image token to ``max_tokens``; None if that would cut an image."""
    seq = inputs["input_ids"].shape[1]
    if seq <= max_tokens:
        return inputs
    if mask.any() and int(mask.nonzero().max()) >= max_tokens:
        return None
    return {k: (v[:, :max_tokens] if v.dim() == 2 and v.shape[1] == seq and k != "pixel_values" else v)
            for k, v in inputs.items()}


def make_sample(loaded: LoadedModel, prompt: str, image: Image.Image | None = None, *, id: str = "sample",
                max_tokens: int | None = None) -> CalibSample | None:
    """One calibration sample from your own prompt (and image), through the model's processor and template.

    For people who script their own calibration: ``calibrate(loaded, [make_sample(loaded, p, img), ...])``.
    Returns None when truncating to ``max_tokens`` would cut into the image tokens.
    """
    inputs = build_inputs(loaded.processor, [prompt], [image])
    mask = loaded.adapter.image_mask(loaded.config, inputs["input_ids"])[0]
    if max_tokens is not None:
        inputs = _truncate(inputs, mask, max_tokens)
        if inputs is None:
            return None
    return CalibSample(id, inputs, mask[: inputs["input_ids"].shape[1]], {"has_image": image is not None})


def build_calibration_set(loaded: LoadedModel, opts: CalibDataOptions) -> CalibSet:
    """Prepare ``opts.num_samples`` samples (``alpha`` of them image+text) with the model's processor."""
    n_img = round(opts.alpha * opts.num_samples)
    n_txt = opts.num_samples - n_img
    skipped: dict[str, int] = {"unreadable_image": 0, "too_long": 0}
    raws: list[RawSample] = []
    for k, src in enumerate(opts.image_sources if n_img else []):
        raws += _take(iter_image_source(src, n_img, opts.seed), n_img - len(raws), opts.seed + k)
        if len(raws) >= n_img:
            break
    for k, src in enumerate(opts.text_sources if n_txt else []):
        got = [r for r in raws if r.image is None]
        raws += _take(iter_text_source(src, n_txt, opts.seed), n_txt - len(got), opts.seed + 100 + k)
    samples: list[CalibSample] = []
    for raw in raws:
        image = None
        if raw.image is not None:
            try:
                image = _open_image(raw.image, opts.max_pixels)
            except (OSError, UnidentifiedImageError, ValueError) as err:
                log.warning("calibration: skipping %s (unreadable image: %s)", raw.id, err)
                skipped["unreadable_image"] += 1
                continue
        sample = make_sample(loaded, raw.prompt, image, id=raw.id, max_tokens=opts.max_tokens)
        if sample is None:
            skipped["too_long"] += 1
            continue
        samples.append(sample)
    result = CalibSet(samples, skipped)
    if opts.alpha > 0 and result.n_image == 0:
        raise ValueError(
            f"calibration: alpha={opts.alpha} but no image sample survived "
            f"(skipped: {skipped}); check the image sources {[s.path or s.kind for s in opts.image_sources]}"
        )
    return result
