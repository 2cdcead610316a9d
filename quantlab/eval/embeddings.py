"""The image-embedding check: how far a quantized vision tower + projector moved the embeddings the decoder sees.

After a plan quantizes vision or projector Linears, the run feeds held-out images through the full-precision
and the quantized model and compares the projector's outputs (one embedding per image token): mean and
minimum cosine similarity per token, and the relative error ``||q - f|| / ||f||`` over all tokens. A recipe
threshold (``eval.vision_check.min_cosine``) makes the run refuse a plan below it (docs/recipes.md).

Held-out images come from the recipe's calibration image sources, past every record calibration could
have drawn: calibration takes its seeded choice of ``n`` records from a source's first ``4 n``
(``quantlab.calib.data._take``), so records ``4 n .. 4 n + k`` are never calibration images.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from PIL import Image

from quantlab.calib.data import CalibDataOptions, RawSample, iter_image_source
from quantlab.models.inputs import build_inputs, encode_images
from quantlab.models.load import LoadedModel


@dataclass(frozen=True)
class EmbeddingCheck:
    """The comparison of quantized and full-precision image embeddings (JSON through :meth:`to_dict`)."""

    n_images: int
    n_tokens: int
    cosine_mean: float
    cosine_min: float
    rel_error: float
    min_cosine: float | None = None  # the recipe's threshold on ``cosine_mean``; None: reported only

    @property
    def passed(self) -> bool:
        return self.min_cosine is None or self.cosine_mean >= self.min_cosine

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def compare_embeddings(fp: torch.Tensor, quantized: torch.Tensor, min_cosine: float | None = None,
                       n_images: int = 0) -> EmbeddingCheck:
    """Cosine per token row and the overall relative error of ``quantized`` against ``fp`` ``(tokens, width)``."""
    if fp.shape != quantized.shape:
        raise ValueError(f"image embeddings differ in shape: {tuple(fp.shape)} vs {tuple(quantized.shape)}")
    fp, quantized = fp.double(), quantized.double()
    cos = torch.nn.functional.cosine_similarity(fp, quantized, dim=-1)
    rel = (quantized - fp).norm() / fp.norm().clamp_min(1e-30)
    return EmbeddingCheck(n_images=n_images, n_tokens=fp.shape[0], cosine_mean=float(cos.mean()),
                          cosine_min=float(cos.min()), rel_error=float(rel), min_cosine=min_cosine)


def held_out_images(opts: CalibDataOptions, n: int) -> list[RawSample]:
    """Up to ``n`` image records of the calibration image sources that calibration never draws (module doc)."""
    n_img = round(opts.alpha * opts.num_samples)
    out: list[RawSample] = []
    for src in opts.image_sources:
        records = list(iter_image_source(src, 4 * n_img + n, opts.seed))
        out += records[4 * n_img:][: n - len(out)]
        if len(out) >= n:
            break
    return out


def _open(image) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.open(image).convert("RGB")


@torch.no_grad()
def image_embeddings(loaded: LoadedModel, records: list[RawSample]) -> torch.Tensor:
    """The image features (the projector's output, in the decoder's token order) for each record's image,
    concatenated ``(image tokens, width)``, float32."""
    model = loaded.model
    store: dict[str, torch.Tensor] = {}
    captured: list[torch.Tensor] = []
    hook = loaded.adapter.capture_image_features(model, store)
    try:
        for r in records:
            encode_images(model, build_inputs(loaded.processor, [r.prompt], [_open(r.image)]))
            captured.append(store["features"])
    finally:
        hook.remove()
    return torch.cat(captured).cpu()
