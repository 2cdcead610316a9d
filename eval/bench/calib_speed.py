"""Calibration overhead: ``calibrate(...)`` (LUQ entropy on) vs a plain forward over the same samples.

Usage: ``.venv/bin/python eval/bench/calib_speed.py [--model toy-llava] [--n 64] [--threads 1] [--out DIR]``

The model is the trained toy (``quantlab/assets/<model>``) when it exists, otherwise ``build_toy`` with
random weights. Samples are shapes-VQA calibration questions with their image, built with the toy's own
processor (one sample per forward, batch of one), plus ``--text`` text-only captions. Both timings run
in this process with the same thread count; each is the best of ``--repeat`` runs after one warm-up.
Prints the per-block entropy table and ``ratio=<calibrate/forward>`` (goal: <= 1.5).

``--config ../shared/configs/llava-1.5-7b-hf.json --layers 2 --vision-layers 2`` measures the same on
the real architecture's block sizes instead (random weights, fp32, decoder and vision tower cut to the
given depths; each sample is one random 336x336 image = 576 image tokens plus ``--text-tokens`` random
text tokens), where a block's forward has the real per-token cost.

Observed on the 2-core shared CPU (random-weight toy-llava, 1 thread, ~29 tokens per sample; the load
from other jobs moves each figure by up to 2x): ``--n 64`` 2.75–3.05, ``--n 256`` 2.17–2.86,
``--n 256 --modalities all`` 1.79–1.99, ``--n 256 --modalities all --no-linears`` 1.46–1.63. The toy's
forward is ~0.4 MFLOP per token and block, so the memory-bound per-token statistics (~0.5x forward) and
the 3 k-means per block (k=100 on up to 4096 tokens, a fixed cost) weigh far more than on a real model,
where a block's forward is ~1000x more work per token.

At real block sizes (2026-11-29, 2 threads, nothing else running): ``--config
../shared/configs/llava-1.5-7b-hf.json --n 8 --layers 4 --vision-layers 4 --repeat 1`` (5,000 tokens,
LUQ entropy on image/text/all + every Linear's statistics): forward 39.4 s, calibrate 43.7 s (k-means
6.3 s), ratio 1.11. The trained toy the same day: ``--n 64 --text 64 --threads 2`` ratio 2.82.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from accelerate.utils import send_to_device

from quantlab.calib.collect import CollectOptions, calibrate
from quantlab.calib.executor import CalibSample
from quantlab.data import shapes
from quantlab.core.device import placed, resolve_device
from quantlab.models import get_adapter
from quantlab.models.inputs import build_inputs
from quantlab.models.load import ALIASES, LoadedModel, load_model
from quantlab.toys.build import build_toy


def load_toy(name: str) -> tuple[LoadedModel, str]:
    """The trained toy if it is installed, else the randomly initialised architecture."""
    if Path(ALIASES.get(name, "")).is_dir():
        return load_model(name), "trained"
    model, processor = build_toy(name)
    return LoadedModel(model, processor, get_adapter(model), name), "random weights"


def full_size(config_path: Path, layers: int, vision_layers: int) -> tuple[LoadedModel, str]:
    """A real LLaVA architecture from its config.json, random fp32 weights, cut to a few blocks."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    data = json.loads(config_path.read_text())
    config = AutoConfig.for_model(**data)
    if config.model_type != "llava":
        raise SystemExit(f"{config_path}: --config supports LLaVA configs (got model_type={config.model_type!r})")
    config.text_config.num_hidden_layers = layers
    config.vision_config.num_hidden_layers = vision_layers
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32).eval()
    return LoadedModel(model, None, get_adapter(model), config_path.stem), f"random weights, {layers} blocks"


def synthetic_samples(loaded: LoadedModel, n: int, text_tokens: int) -> list[CalibSample]:
    """Random image (336x336 -> 576 image tokens) + random text ids, as the LLaVA processor lays them out."""
    cfg = loaded.config
    image_id = loaded.adapter.image_token_id(cfg)
    side = cfg.vision_config.image_size
    n_img = (side // cfg.vision_config.patch_size) ** 2
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        text = torch.randint(3, 32000, (text_tokens,), generator=g)
        ids = torch.cat([torch.tensor([1]), torch.full((n_img,), image_id), text]).unsqueeze(0)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                  "pixel_values": torch.randn(1, 3, side, side, generator=g)}
        out.append(CalibSample(f"synthetic-{i}", inputs, ids[0] == image_id))
    return out


def shapes_samples(loaded: LoadedModel, n_image: int, n_text: int) -> list[CalibSample]:
    """Batch-of-one samples: shapes-VQA questions with their image, and text-only captions."""
    image_id = loaded.adapter.image_token_id(loaded.config)
    out = []
    for s in shapes.iter_samples("calibration", n_image):
        inputs = build_inputs(loaded.processor, [s.question], [s.render()])
        out.append(CalibSample(s.id, inputs, inputs["input_ids"][0] == image_id))
    for s in shapes.iter_samples("calibration", n_text, start=50_000):
        inputs = build_inputs(loaded.processor, [s.caption()], [None])
        out.append(CalibSample(s.id + "-caption", inputs, inputs["input_ids"][0] == image_id))
    return out


@torch.no_grad()
def plain_forward(loaded: LoadedModel, samples: list[CalibSample]) -> None:
    """Every sample through the model, inputs moved to wherever the model is."""
    model = loaded.model
    device = next(model.parameters()).device
    for s in samples:
        if hasattr(getattr(model, "model", None), "rope_deltas"):
            model.model.rope_deltas = None
        model(**send_to_device(s.inputs, device), use_cache=False)


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times)


def resident_forward_time(loaded: LoadedModel, samples: list[CalibSample], repeat: int, device: str | None) -> float:
    """The baseline: a plain forward with the whole model on ``device`` (None: where it is)."""
    with placed([loaded.model], resolve_device(device)):
        if device is not None:
            plain_forward(loaded, samples[:2])  # warm-up on the device
        return best_of(lambda: plain_forward(loaded, samples), repeat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="toy-llava")
    ap.add_argument("--n", type=int, default=64, help="image+text samples")
    ap.add_argument("--text", type=int, default=0, help="extra text-only samples")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--n-init", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--modalities", default="image,text,all", help="modalities that get a k-means entropy")
    ap.add_argument("--no-linears", action="store_true", help="LUQ tensor only (no per-Linear statistics)")
    ap.add_argument("--out", type=Path, default=None, help="also save the artifact and entropy plot here")
    ap.add_argument("--config", type=Path, default=None, help="a real LLaVA config.json (full-size blocks)")
    ap.add_argument("--layers", type=int, default=2, help="--config: decoder blocks")
    ap.add_argument("--vision-layers", type=int, default=2, help="--config: vision blocks")
    ap.add_argument("--text-tokens", type=int, default=48, help="--config: text tokens per sample")
    ap.add_argument("--device", default=None, help="compute device (e.g. cuda): calibrate streams one block at a "
                    "time to it; the forward baseline holds the whole model there")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.config is not None:
        loaded, kind = full_size(args.config, args.layers, args.vision_layers)
        samples = synthetic_samples(loaded, args.n, args.text_tokens)
        args.model = args.config.name
    else:
        loaded, kind = load_toy(args.model)
        samples = shapes_samples(loaded, args.n, args.text)
    n_tokens = sum(s.image_mask.numel() for s in samples)
    n_img = sum(int(s.image_mask.sum()) for s in samples)
    opts = CollectOptions(entropy_k=args.k, kmeans_n_init=args.n_init, max_tokens=args.max_tokens,
                          linears=not args.no_linears, entropy_modalities=tuple(args.modalities.split(",")))
    print(f"model={args.model} ({kind}) samples={len(samples)} tokens={n_tokens} (image {n_img}) "
          f"threads={args.threads} k={args.k} n_init={args.n_init} max_tokens={args.max_tokens} "
          f"linears={opts.linears} entropy_modalities={','.join(opts.entropy_modalities)} device={args.device}")

    run_cal = lambda: calibrate(loaded, samples, options=opts, progress=False, device=args.device)  # noqa: E731
    plain_forward(loaded, samples[:2])  # warm-up
    stats = run_cal()
    t_fwd = resident_forward_time(loaded, samples, args.repeat, args.device)
    t_cal = best_of(run_cal, args.repeat)
    t_ent = 0.0
    if opts.entropy:
        no_ent = CollectOptions(**{**opts.to_dict(), "entropy": False})
        t_ent = t_cal - best_of(lambda: calibrate(loaded, samples, options=no_ent, progress=False,
                                                  device=args.device), args.repeat)

    print(f"\n{'block':>5} {'H_all':>7} {'H_image':>7} {'H_text':>7} {'hist':>6} {'var':>9} {'kurt':>8} "
          f"{'absmax':>8} {'outl':>5}")
    fmt = lambda v: f"{v:>7.4f}" if v is not None else f"{'-':>7}"  # noqa: E731
    for r in stats.table():
        print(f"{r['block']:>5} {fmt(r['H_all'])} {fmt(r['H_image'])} {fmt(r['H_text'])} {r['hist_all']:>6.3f} "
              f"{r['variance']:>9.4g} {r['kurtosis']:>8.3g} {r['absmax']:>8.4g} {r['outliers']:>5.3f}")
    if args.out is not None:
        from quantlab.calib.plot import plot_entropy

        stats.save(args.out, overwrite=True)
        plot_entropy(stats, args.out / "entropy.png")
        print(f"wrote {args.out}")
    print(f"\nforward={t_fwd:.3f}s calibrate={t_cal:.3f}s (k-means entropy {t_ent:.3f}s)")
    print(f"ratio={t_cal / t_fwd:.2f}")


if __name__ == "__main__":
    main()
