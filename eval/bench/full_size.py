"""The whole pipeline at full size: a random-weight Qwen2.5-VL-3B or LLaVA-1.5-7B through ``quantlab quantize
--stream``, with each stage's peak host memory against the model's bf16 bytes and its time per block.

Usage::

    .venv/bin/python eval/bench/full_size.py --model qwen2.5-vl-3b [--layers 36] [--recipe recipes/w4a16.yaml]
        [--samples 8] [--workdir /tmp/full_size] [--threads 2]

1. Writes a random bf16 checkpoint of the real architecture (the public config.json of the model, copied
   into ``CONFIGS`` below from the hub repos ``Qwen/Qwen2.5-VL-3B-Instruct`` / ``llava-hf/llava-1.5-7b-hf``) with
   ``calib_memory.write_random_checkpoint`` (N(0, 0.02) matrices, unit norms, zero biases) once per model,
   and a variant of ``--layers`` decoder layers that shares its shards.
2. No tokenizer or image processor of these models can be downloaded here, so the checkpoint gets the
   shipped toy's processor of the same family (tokenizer of 512 tokens) with the image processor set to
   the real vision tower's geometry (LLaVA: 336 px, patch 14; Qwen2.5-VL: patch 14, merge 2) and the
   config's special token ids set to that tokenizer's (``image_token_id`` etc.). Every other number is the
   real model's; the calibration samples are the recipe's (shapes-VQA images and text), as in a real run.
3. Runs ``quantlab quantize DIR --recipe R --out RUN --stream --set calibration.num_samples=S --set
   eval.tasks=[]`` in a child process (eval skipped: random weights) and reads each stage's peak RSS
   (``state.json``: ``peak_rss_bytes``, measured by the pipeline itself as the VmHWM of that stage) and
   its duration (run.log timestamps).

Prints one line per stage: ``peak=<GiB> ratio=<peak / bf16 bytes> seconds=<s> per_block=<s>``; the target
of issue 15 is ratio <= 0.35 for every stage, and flat in depth (compare ``--layers 18`` with 36).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calib_memory import make_variant, model_bytes, write_random_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "configs"
CONFIGS = {"qwen2.5-vl-3b": (SHARED / "qwen2.5-vl-3b-instruct.json", "toy-qwen2.5-vl"),
           "qwen2.5-vl-7b": (SHARED / "qwen2.5-vl-7b-instruct.json", "toy-qwen2.5-vl"),
           "llava-1.5-7b": (SHARED / "llava-1.5-7b-hf.json", "toy-llava")}
PROCESSOR_FILES = ("chat_template.jinja", "processor_config.json", "tokenizer.json", "tokenizer_config.json")
STAGES = ("calibrate", "plan", "quantize", "export")
GiB = 1 << 30


def attach_toy_processor(directory: Path, toy: str) -> None:
    """Give ``directory`` the toy's processor files, fitted to the checkpoint's vision geometry, and point
    the config's special token ids at that tokenizer (see the module docstring)."""
    src = ROOT / "quantlab" / "assets" / toy
    for name in PROCESSOR_FILES:
        shutil.copy(src / name, directory / name)
    config = json.loads((directory / "config.json").read_text())
    toy_config = json.loads((src / "config.json").read_text())
    proc = json.loads((directory / "processor_config.json").read_text())
    vision = config["vision_config"]
    if toy == "toy-llava":
        side = vision["image_size"]
        proc["image_processor"]["crop_size"] = {"height": side, "width": side}
        proc["image_processor"]["size"] = {"shortest_edge": side}
        proc["patch_size"] = vision["patch_size"]
        keys = ("image_token_index",)
    else:
        for part in ("image_processor", "video_processor"):
            proc[part]["patch_size"] = vision["patch_size"]
            proc[part]["merge_size"] = vision["spatial_merge_size"]
            proc[part]["temporal_patch_size"] = vision["temporal_patch_size"]
        keys = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    for key in keys:
        config[key] = toy_config[key]
        if key in config.get("text_config", {}):
            config["text_config"][key] = toy_config[key]
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        for part in (config, config.get("text_config", {})):
            if key in part:
                part[key] = toy_config.get(key, toy_config.get("text_config", {}).get(key))
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "processor_config.json").write_text(json.dumps(proc, indent=2) + "\n")
    gen = src / "generation_config.json"
    if gen.is_file():
        shutil.copy(gen, directory / "generation_config.json")


def checkpoint(model: str, layers: int | None, workdir: Path) -> Path:
    """The full checkpoint (written once) or a ``layers``-deep variant sharing its shards."""
    config_json, toy = CONFIGS[model]
    full = workdir / model
    if not (full / "model.safetensors.index.json").is_file():
        print(f"writing a random-weight {model} checkpoint to {full} ...", flush=True)
        info = write_random_checkpoint(config_json, full)
        print(f"  {info['bytes'] / GiB:.2f} GiB in {info['seconds']:.0f}s", flush=True)
    attach_toy_processor(full, toy)
    if layers is None:
        return full
    variant = workdir / f"{model}-{layers}l"
    make_variant(full, variant, layers)
    attach_toy_processor(variant, toy)
    return variant


def stage_seconds(run_log: Path) -> dict[str, float]:
    """Seconds between the ``[k/6] stage`` lines of run.log (the last stage ends at the log's last line)."""
    marks: list[tuple[str, datetime]] = []
    last = None
    for line in run_log.read_text().splitlines():
        try:
            when = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
        except ValueError:
            continue
        last = when
        for i, stage in enumerate(("calibrate", "plan", "quantize", "export", "eval", "report"), 1):
            if f"[{i}/6] {stage}" in line:
                marks.append((stage, when))
    out = {}
    for (stage, t0), (_, t1) in zip(marks, marks[1:] + [("end", last)]):
        out[stage] = (t1 - t0).total_seconds()
    return out


def block_intervals(run: Path) -> list[float]:
    """Seconds between consecutive quantized blocks (``RUN/quant/block_*.safetensors`` modification times):
    a per-block time that a resumed or briefly contended run still gives (take the median)."""
    times = sorted(p.stat().st_mtime for p in (run / "quant").glob("block_*.safetensors"))
    return [b - a for a, b in zip(times, times[1:])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(CONFIGS), default="qwen2.5-vl-3b")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: all)")
    ap.add_argument("--recipe", default="recipes/w4a16.yaml")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/full_size"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], help="extra recipe overrides, passed on")
    ap.add_argument("--resume", action="store_true", help="resume the run directory instead of starting over")
    a = ap.parse_args()
    directory = checkpoint(a.model, a.layers, a.workdir)
    total, block = model_bytes(directory)
    layers = json.loads((directory / "config.json").read_text())["text_config"]["num_hidden_layers"]
    run = a.workdir / "runs" / f"{directory.name}-{Path(a.recipe).stem}"
    cmd = [str(ROOT / ".venv" / "bin" / "quantlab"), "quantize", str(directory), "--recipe", a.recipe,
           "--out", str(run), "--stream", *([] if a.resume else ["--overwrite"]), "--set", f"calibration.num_samples={a.samples}",
           "--set", "eval.tasks=[]"]
    for s in a.set:
        cmd += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    print(" ".join(cmd), flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, check=False)
    wall = time.time() - t0
    if proc.returncode != 0:
        sys.exit(f"quantlab exited {proc.returncode} after {wall:.0f}s; see {run / 'run.log'}")
    state = json.loads((run / "state.json").read_text())
    seconds = stage_seconds(run / "run.log")
    print(f"{directory.name}: {layers} layers, bf16 bytes {total / GiB:.2f} GiB, one block {block / GiB:.3f} GiB, "
          f"{a.samples} samples, recipe {a.recipe}, wall {wall:.0f}s")
    nan = float("nan")
    for stage in STAGES:
        entry = state.get(stage, {})
        peak, fc = entry.get("peak_rss_bytes"), entry.get("forecast_host_bytes")
        s = seconds.get(stage)
        print(f"  {stage:9s} peak={peak / GiB if peak else nan:.2f} GiB ratio={peak / total if peak else nan:.3f} "
              f"forecast={fc / GiB if fc else nan:.2f} GiB measured/forecast={peak / fc if peak and fc else nan:.3f} "
              f"seconds={s if s is not None else nan:.0f} per_block={s / layers if s is not None else nan:.1f}",
              flush=True)
    gaps = sorted(block_intervals(run))
    if gaps:
        print(f"  quantize block intervals: median {gaps[len(gaps) // 2]:.1f}s, fastest {gaps[0]:.1f}s, "
              f"slowest {gaps[-1]:.1f}s over {len(gaps)}")
    exported = sorted(p.name for p in (run / "model").iterdir())
    print(f"  export: {len(exported)} files ({', '.join(exported[:4])}{', ...' if len(exported) > 4 else ''})")


if __name__ == "__main__":
    main()
