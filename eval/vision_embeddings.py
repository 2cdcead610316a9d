"""Image-embedding error of the vision tower + projector quantized by each method (docs/method.md#the-vision-tower).

    python eval/vision_embeddings.py --model toy-llava [--bits 3 4] [--calib 8] [--held 6] [--out X.json]

Every vision-tower and projector Linear at ``bits`` per channel (group_size -1), decoder kept; calibration on
``--calib`` image samples of the model's calibration sources; the error is measured on ``--held`` held-out
images (records calibration never draws, quantlab/eval/embeddings.py): relative error ``||q - f|| / ||f||`` and
mean cosine of the projector's outputs. AWQ rows put AWQ on the vision blocks' Linears (the projector has no
scale pair and gets the plain backend).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from quantlab.calib.data import CalibDataOptions, build_calibration_set
from quantlab.eval.embeddings import (
    compare_embeddings,
    held_out_images,
    image_embeddings,
)
from quantlab.models import Component, load_model
from quantlab.quant.apply import quantize
from quantlab.quant.scheme import QuantScheme

METHODS = {"RTN": ("rtn", False), "AWQ+RTN": ("rtn", True), "GPTQ": ("gptq", False), "AWQ+GPTQ": ("gptq", True)}


def plan_for(loaded, backend: str, bits: int, use_awq: bool) -> dict[str, QuantScheme]:
    plain = QuantScheme(backend=backend, bits=bits, group_size=-1)
    scaled = plain.model_copy(update={"args": {"awq": True}}) if use_awq else plain
    adapter = loaded.adapter
    plan = {n: scaled for n, _ in adapter.iter_linears(loaded.model, Component.VISION)}
    plan.update({n: plain for n, _ in adapter.iter_linears(loaded.model, Component.PROJECTOR)})
    return plan


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--calib", type=int, default=8, help="image calibration samples")
    ap.add_argument("--held", type=int, default=6, help="held-out images the error is measured on")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    opts = CalibDataOptions(num_samples=a.calib, alpha=1.0, seed=0)
    fp = load_model(a.model)
    held = held_out_images(opts, a.held)
    reference = image_embeddings(fp, held)
    rows = []
    for bits in a.bits:
        for label, (backend, use_awq) in METHODS.items():
            loaded = load_model(a.model)
            samples = build_calibration_set(loaded, opts).samples
            results = quantize(loaded, plan_for(loaded, backend, bits, use_awq), samples, progress=False)
            cmp = compare_embeddings(reference, image_embeddings(loaded, held))
            scaled = sum(getattr(r, "input_scales", None) is not None for r in results.values())
            rows.append({"bits": bits, "method": label, "rel_error": round(cmp.rel_error, 4),
                         "cosine_mean": round(cmp.cosine_mean, 5), "awq_scaled_linears": scaled})
            print(json.dumps(rows[-1]), flush=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"model": a.model, "calib": a.calib, "held": a.held, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
