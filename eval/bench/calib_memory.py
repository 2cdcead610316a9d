"""Peak host memory of ``calibrate(...)`` on a streamed Qwen2.5-VL-3B (random bf16 weights on disk).

Usage::

    .venv/bin/python eval/bench/calib_memory.py [--workdir /tmp/calib_memory] [--layers 18,36] [--keep]
        [--stage calibrate|quantize]

1. Writes a random-weight checkpoint of the real architecture (``shared/configs/qwen2.5-vl-3b-instruct.json``,
   36 decoder layers) straight into safetensors shards under the hub-legacy tensor names that
   ``save_pretrained`` writes (``model.layers.*``, ``visual.*``; tied ``lm_head`` not stored), built from a
   meta-device skeleton one parameter at a time: N(0, 0.02) matrices, unit norms, zero biases. ~7.5 GB.
   Shallower variants (``--layers``) reuse the same shards with a config of fewer decoder layers.
2. For every depth, in a fresh subprocess: ``load_streaming(dir, dtype=bfloat16)``, hand-built samples
   (112x112 random-pixel images → grid (1, 8, 8) → 16 ``<|image_pad|>`` tokens; random text ids), then
   ``calibrate(...)`` with LUQ entropy and per-Linear statistics on (no Hessians). A sampler thread reads
   ``/proc/self/status`` every 10 ms (VmRSS, RssAnon, RssFile); ``VmHWM`` is the kernel's peak of the
   child's own address space (``ru_maxrss`` is printed too but inherits the parent's peak across exec).

Prints, per depth, ``peak_rss/model_bytes=<ratio>`` (target < 0.35; ``model_bytes`` = the variant's bf16
parameter bytes) and the peak of anonymous memory separately: RssFile counts the checkpoint's
memory-mapped pages the process touched (clean page cache the kernel can drop), RssAnon what it allocated.

Observed before the fix in ``weights.py`` (2-core shared CPU, 4 samples / 132 tokens; "open" = shard
handles kept open for the whole run, "closed" = a bench-side wrapper that closed them after every block,
removed since ``SafetensorsWeights.release`` does it):

| handles         | layers | model   | ru_maxrss | ratio | RssAnon peak | RssFile peak |
|-----------------|--------|---------|-----------|-------|--------------|--------------|
| open            | 18     | 4.41 GiB| 4.53 GiB  | 1.027 | 0.41 GiB     | 4.12 GiB     |
| open            | 36     | 6.99 GiB| 7.15 GiB  | 1.022 | 0.44 GiB     | 6.71 GiB     |
| closed / block  | 36     | 6.99 GiB| 2.16 GiB  | 0.309 | 0.42 GiB     | 1.74 GiB     |

``weights.py`` now copies every tensor out of the map and closes the handles after each block, so the
default run is the fixed one. Observed 2026-11-29 (default run, nothing else running): 18 layers
ru_maxrss 2.39 GiB (ratio 0.542), 36 layers 2.39 GiB (ratio **0.342**); 18 -> 36 layers +0 MiB peak RSS.
RssAnon was 1.50 GiB right after ``load_streaming`` (every non-block tensor, the 151936 x 2048 embedding
included, is now a copy rather than a mapped view) and 1.95 GiB at the peak; not broken down further.

Later the same day: ``load_streaming`` read the tied ``lm_head`` as a second copy of that embedding
(0.58 GiB) and kept the shards mapped until the first block; now the head is the embedding's tensor and
the shards are unmapped after the resident reads. Measured with ``VmHWM`` (the ``ru_maxrss`` above
turned out to carry the parent's peak, 2.27 GiB here, whenever the child stays below it; the earlier
figures were above it, so they stand): 18 layers 1.69 GiB (ratio 0.382), **36 layers 1.69 GiB (ratio
0.241)**, 18 -> 36 layers +2 MiB; RSS after ``load_streaming`` 1.04 GiB (was 2.27).

``--stage quantize`` (GPTQ W4 g128 on every decoder Linear, weights streamed, results kept for the
export; 2026-11-29, ``--layers 4,8``), before and after streamed results drop their dense copy:

| results          | layers | model    | peak (VmHWM) | results held | per extra block |
|------------------|--------|----------|--------------|--------------|-----------------|
| with dense copy  | 4 / 8  | 2.40 / 2.97 GiB | 4.93 / 5.93 GiB | 0.87 / 1.74 GiB | +257 MiB |
| codes + scales   | 4 / 8  | 2.40 / 2.97 GiB | 4.47 / 4.82 GiB | 0.30 / 0.59 GiB | +89 MiB  |

The depth-independent part (~4.1 GiB) is the resident tensors plus GPTQ's float32 workspace for the
widest Linear (``down_proj``, in_features 11008: Hessian, its Cholesky factors and inverse, ~0.5 GB each).
Freeing the first Cholesky factor before the second is taken (``inverse_hessian_cholesky``): 4 layers
4.47 -> 4.18 GiB, 8 layers 4.82 -> 4.52 GiB.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

CONFIG = Path(__file__).resolve().parents[2].parent / "shared" / "configs" / "qwen2.5-vl-3b-instruct.json"
GiB = 1 << 30


# --- checkpoint ------------------------------------------------------------------------------------

def skeleton(config):
    """Meta-device model of ``config``."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)


def _random_param(name: str, shape: torch.Size, g: torch.Generator) -> torch.Tensor:
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=torch.bfloat16)
    if len(shape) == 1:  # RMSNorm / LayerNorm weights
        return torch.ones(shape, dtype=torch.bfloat16)
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=g)


def write_random_checkpoint(config_json: Path, out: Path, shard_bytes: int = 2 * 10**9, seed: int = 0) -> dict:
    """Random bf16 checkpoint of ``config_json`` in ``out`` (sharded safetensors + index + config)."""
    from safetensors.torch import save_file

    from quantlab.models.load import get_adapter, load_config

    config = load_config(config_json)
    adapter = get_adapter(config)
    model = skeleton(config)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    g = torch.Generator().manual_seed(seed)
    params = list(model.named_parameters())  # tied lm_head is not listed (same as save_pretrained)
    weight_map, shard, size, n_shard, total = {}, {}, 0, 0, 0
    t0 = time.time()

    def flush() -> None:
        nonlocal shard, size, n_shard
        if shard:
            fname = f"model-{n_shard:05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
            print(f"  wrote {fname} ({size / 1e9:.2f} GB, {time.time() - t0:.0f}s)", flush=True)
            shard, size, n_shard = {}, 0, n_shard + 1

    for name, p in params:
        t = _random_param(name, p.shape, g)
        shard[adapter.legacy_name(name)] = t
        size += t.numel() * t.element_size()
        total += t.numel() * t.element_size()
        if size >= shard_bytes:
            flush()
    flush()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return {"bytes": total, "params": sum(p.numel() for _, p in params), "seconds": time.time() - t0}


def make_variant(src: Path, dst: Path, layers: int) -> None:
    """A checkpoint directory with ``layers`` decoder layers that reuses ``src``'s shards (symlinks)."""
    from quantlab.models.load import load_config

    dst.mkdir(parents=True, exist_ok=True)
    config = load_config(src)
    text = config.text_config
    if layers > text.num_hidden_layers:
        raise ValueError(f"{layers} layers requested; the checkpoint has {text.num_hidden_layers}")
    text.num_hidden_layers = layers
    if getattr(text, "layer_types", None) is not None:
        text.layer_types = list(text.layer_types)[:layers]
    config.save_pretrained(dst)
    for f in src.iterdir():
        if f.name.endswith(".safetensors") or f.name.endswith(".index.json"):
            link = dst / f.name
            if not link.exists():
                link.symlink_to(f.resolve())


def model_bytes(directory: Path) -> tuple[int, int]:
    """(bf16 bytes of all parameters, bf16 bytes of one decoder block) of the checkpoint's config."""
    from quantlab.models.load import get_adapter, load_config

    config = load_config(directory)
    model = skeleton(config)
    block = get_adapter(config).blocks(model)[0]
    return (sum(p.numel() * 2 for p in model.parameters()), sum(p.numel() * 2 for p in block.parameters()))


# --- measurement (child process) -------------------------------------------------------------------

def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0]) * 1024
    return out


class PeakSampler(threading.Thread):
    """Samples /proc/self/status every ``interval`` s and keeps the peak of each field."""

    def __init__(self, interval: float = 0.01):
        super().__init__(daemon=True)
        self.interval, self.peak, self._halt = interval, _status(), threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            for k, v in _status().items():
                self.peak[k] = max(self.peak.get(k, 0), v)
            time.sleep(self.interval)

    def stop(self) -> dict[str, int]:
        self._halt.set()
        self.join()
        return self.peak


def hand_samples(config, n_image: int, n_text: int, text_len: int, seed: int = 0):
    """Batch-of-one Qwen2.5-VL samples built by hand: one 112x112 image → grid (1, 8, 8), 16 image tokens."""
    from quantlab.calib.executor import CalibSample

    vc = config.vision_config
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor([[1, 8, 8]])  # 112 px / patch 14
    n_patches = int(grid.prod())
    n_img_tok = n_patches // vc.spatial_merge_size ** 2
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    img_id, vs, ve = config.image_token_id, config.vision_start_token_id, config.vision_end_token_id
    samples = []
    for i in range(n_image + n_text):
        words = torch.randint(1000, 150000, (text_len,), generator=g)
        if i < n_image:
            ids = torch.cat([words[:4], torch.tensor([vs] + [img_id] * n_img_tok + [ve]), words[4:]])[None]
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                      "pixel_values": torch.randn(n_patches, patch_dim, generator=g).to(torch.bfloat16),
                      "image_grid_thw": grid, "mm_token_type_ids": (ids == img_id).long()}
        else:
            ids = words[None]
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        samples.append(CalibSample(f"s{i}", inputs, ids[0] == img_id))
    return samples


def measure(directory: Path, n_image: int, n_text: int, text_len: int, threads: int,
            stage: str = "calibrate") -> dict:
    torch.set_num_threads(threads)
    sampler = PeakSampler()
    sampler.start()
    from quantlab.calib.collect import calibrate
    from quantlab.calib.weights import load_streaming

    after_import = _status()
    t0 = time.time()
    loaded, weights = load_streaming(directory, dtype=torch.bfloat16, with_processor=False)
    after_load = _status()
    t_load = time.time() - t0
    samples = hand_samples(loaded.config, n_image, n_text, text_len)
    t0 = time.time()
    results_bytes = None
    if stage == "quantize":  # GPTQ W4 g128 on every decoder Linear, weights streamed, results kept for export
        from quantlab.quant.apply import quantize
        from quantlab.models import Component
        from quantlab.quant.scheme import QuantScheme

        w4 = QuantScheme(backend="gptq", bits=4, group_size=128)
        plan = {n: w4 for n, _ in loaded.adapter.iter_linears(loaded.model, Component.DECODER)}
        results = quantize(loaded, plan, samples, weights=weights, progress=False)
        results_bytes = sum(t.numel() * t.element_size() for r in results.values()
                            for t in (r.codes, r.scales, r.zeros, r.g_idx, r.dequantized, *r.extra.values())
                            if t is not None)
        tokens = None
    else:
        stats = calibrate(loaded, samples, weights=weights, progress=False)
        tokens = stats.meta["tokens"]
    t_cal = time.time() - t0
    peak = sampler.stop()
    return {
        "dir": str(directory), "layers": loaded.config.text_config.num_hidden_layers,
        "stage": stage, "results_bytes": results_bytes,
        "tokens": tokens, "seconds_load": t_load, "seconds_calibrate": t_cal,
        "after_import": after_import, "after_load": after_load, "peak": peak,
        # VmHWM: the kernel's peak RSS of this process's own address space. ru_maxrss is not that: Linux
        # carries the parent's peak across fork/vfork + exec, so after the parent wrote the checkpoint it
        # reports the parent's size whenever the child stays below it.
        "peak_rss": _status()["VmHWM"],
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


# --- driver ----------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/calib_memory"))
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--layers", default="18,36", help="decoder depths to measure (<= the config's)")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--texts", type=int, default=2)
    ap.add_argument("--text-len", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint for the next run")
    ap.add_argument("--stage", choices=("calibrate", "quantize"), default="calibrate",
                    help="what to stream: calibration (statistics) or quantization (GPTQ W4 g128, results kept)")
    ap.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    if args.measure is not None:
        print("RESULT " + json.dumps(measure(args.measure, args.images, args.texts, args.text_len, args.threads,
                                             args.stage)))
        return

    full = args.workdir / "full"
    if not (full / "model.safetensors.index.json").is_file():
        free = shutil.disk_usage(args.workdir.parent if not args.workdir.exists() else args.workdir).free
        print(f"writing random checkpoint to {full} (free disk {free / 1e9:.0f} GB)", flush=True)
        info = write_random_checkpoint(args.config, full)
        print(f"checkpoint: {info['params']:,} params, {info['bytes'] / 1e9:.2f} GB in {info['seconds']:.0f}s")
    run_depths(args, full)
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


def run_depths(args, full: Path) -> None:
    results = []
    for layers in (int(v) for v in args.layers.split(",")):
        var = args.workdir / f"layers{layers}"
        make_variant(full, var, layers)
        total, block = model_bytes(var)
        cmd = [sys.executable, __file__, "--measure", str(var), "--images", str(args.images), "--texts",
               str(args.texts), "--text-len", str(args.text_len), "--threads", str(args.threads), "--stage", args.stage]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            raise SystemExit(f"measurement for {layers} layers failed (rc {proc.returncode})")
        r = json.loads(line[0][len("RESULT "):])
        r.update(model_bytes=total, block_bytes=block)
        results.append(r)
        p = r["peak"]
        print(f"\nlayers={layers} model_bytes={total / GiB:.2f} GiB block_bytes={block / 2**20:.0f} MiB "
              f"tokens={r['tokens']} load={r['seconds_load']:.1f}s {r['stage']}={r['seconds_calibrate']:.1f}s")
        if r["results_bytes"] is not None:
            print(f"  results held for export: {r['results_bytes'] / GiB:.2f} GiB "
                  f"({r['results_bytes'] / total:.3f} of the model's bf16 bytes)")
        print(f"  after import: rss {r['after_import']['VmRSS'] / GiB:.2f} GiB; after load_streaming: rss "
              f"{r['after_load']['VmRSS'] / GiB:.2f} GiB (anon {r['after_load']['RssAnon'] / GiB:.2f})")
        print(f"  peak: VmHWM {r['peak_rss'] / GiB:.2f} GiB, sampled VmRSS {p['VmRSS'] / GiB:.2f} GiB, "
              f"RssAnon {p['RssAnon'] / GiB:.2f} GiB, RssFile {p['RssFile'] / GiB:.2f} GiB "
              f"(ru_maxrss {r['ru_maxrss'] / GiB:.2f} GiB, inherits the parent's peak)")
        print(f"  peak_rss/model_bytes={r['peak_rss'] / total:.3f}  peak_anon/model_bytes={p['RssAnon'] / total:.3f}")
    if len(results) >= 2:
        a, b = results[0], results[-1]
        dl = b["layers"] - a["layers"]
        print(f"\ndepth {a['layers']} -> {b['layers']}: "
              f"peak rss {(b['peak_rss'] - a['peak_rss']) / 2**20:+.0f} MiB, "
              f"peak anon {(b['peak']['RssAnon'] - a['peak']['RssAnon']) / 2**20:+.0f} MiB "
              f"(one block = {a['block_bytes'] / 2**20:.0f} MiB; "
              f"{dl} more blocks = {dl * a['block_bytes'] / GiB:.2f} GiB)")


if __name__ == "__main__":
    main()
