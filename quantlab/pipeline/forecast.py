"""Memory forecast: each stage's peak host memory (and compute-device memory) from the model's config, the
recipe and the flags, made before any stage starts.

A stage's host peak is the sum of the terms below (bytes); ``n`` calibration samples of at most ``T`` tokens,
``d`` the width of the residual stream, ``b`` the bytes of the dtype the stages compute in (the loader's;
streamed: :func:`quantlab.calib.weights.stream_dtype`), ``w_k`` the width of the block's ``k``-th distinct
Linear input:

| term          | stages            | what                                                                         |
|---------------|-------------------|------------------------------------------------------------------------------|
| ``process``   | all               | this process's RSS when the forecast is made, plus the libraries the stages import later |
| ``weights``   | all               | in memory: every parameter; ``--stream``: the resident tensors (embeddings, norms, projector, an untied head) plus the largest decoder or vision block |
| ``samples``   | calibrate, quantize | the hidden states entering and leaving a block for every sample: ``2·N·d·b`` (``N`` tokens in all) |
| ``block``     | calibrate, quantize | inside a block, the distinct Linear inputs held: calibrate stashes each until it has a window of ``W = min(flush_tokens + T, N)`` rows, then concatenates and sums it while the inputs after it hold ``W - T`` rows (``max_k (2·W·w_k + (W - T)·Σ_{j>k} w_j)·b``); quantize one sample's (``T·Σ widths·b``, and the widest in float32) |
| ``stats``     | calibrate         | the token reservoirs of one block (float32 rows of LUQ's tensor and of each distinct Linear input, up to the cap of image and of text tokens each), a flush's copies and, when collected, every Linear's Hessian of every block (they are held until the stats are written) |
| ``solver``    | quantize          | the largest Linear solve: its Hessian (``in²·4``, factored in place; a second copy on a device; one more for q/k/v and gate/up, which share one) and :data:`SOLVER_BYTES_PER_WEIGHT` per weight (float32 weight and solution, uint8 codes) |
| ``codes``     | quantize, export  | ``--stream``: one block's codes (uint8, a byte per weight): the block's finished Linears while the next solves, the block the export packs; in memory: every Linear's codes and dense weight |
| ``tensor``    | export            | ``--stream``: the largest tensor read from the checkpoint (a mapped view whose pages all become resident as it is written; the shards are written a slice at a time), counted instead of ``codes`` when larger: the dense tensors are written before the quantized blocks |

With ``--device``, blocks, activations and solves move to the device: ``solver``, ``samples`` and
``block`` are counted there instead of on the host.

``T`` is the longest of a few calibration samples built from the recipe's sources with the model's processor
(image tokens follow the processor and ``max_pixels``), capped by ``max_tokens``; the recipe's cap alone when
no processor can be read. Measured against
them: eval/bench/full_size.py (3B and 7B) and ``tests/test_forecast.py`` (toys); the run records both in
``state.json`` and the run log.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from quantlab.calib.weights import stream_dtype
from quantlab.core.errors import UserError
from quantlab.core.host_memory import current_rss, heap_trimmer
from quantlab.models.adapter import Component
from quantlab.models.load import LoadedModel, checkpoint_dtype, load_dtype
from quantlab.pipeline.stages import stats_options
from quantlab.quant.steps import sequential_steps

GiB = 1 << 30
# gptq_solve's working set per weight of the Linear: the transposed float32 weight and solution (8), the
# codes (1, and 1 more while they are transposed back), and the sliced temporaries: measured 10-12 bytes at
# 2048x11008 and 11008x2048 (eval/RESULTS.md, "Full-size streamed pipeline")
SOLVER_BYTES_PER_WEIGHT = 12
LIBRARIES = 96 << 20  # what the stages import and keep after the forecast (image plugins, k-means, plotting,
# statistics): 0.03 GiB measured on the toys, 0.09-0.12 GiB at 3B and 7B
PROBE_SAMPLES = 4  # samples built to measure a sample's length
MOMENT_CHUNK = 1 << 22  # values per chunk of the statistics' moment sums (quantlab.calib.stats.Moments.of)


@dataclass(frozen=True)
class StageForecast:
    """One stage's forecast peak: host bytes (this process's RSS), device bytes (None: no device), terms."""

    stage: str
    host: int
    device: int | None = None
    terms: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"stage": self.stage, "host_bytes": self.host, "device_bytes": self.device, "terms": self.terms}


def _dtype_bytes(model_name: str, model: nn.Module, *, stream: bool, device: str | None) -> tuple[int, int]:
    """``(compute, stored)`` bytes per value: what the stages hold blocks and activations in (the loader's
    dtype; a streamed model's :func:`~quantlab.calib.weights.stream_dtype`) and what the checkpoint stores."""
    compute = stream_dtype(model_name, device) if stream else load_dtype(model_name)
    return compute.itemsize, checkpoint_dtype(model.config).itemsize


def _weights(skeleton: LoadedModel, b: int, stream: bool) -> tuple[int, int]:
    """``(resident, block)`` bytes: all parameters and nothing streamed, or (streamed) the parameters
    that stay in memory and the largest block, which the block-by-block stages hold besides them."""
    model, adapter = skeleton.model, skeleton.adapter
    params = {id(p): p for p in model.parameters()}  # a tied head counts once
    if not stream:
        return sum(p.numel() for p in params.values()) * b, 0
    # blocks, the token embedding and the head are read when they run (load_streaming); the embedding as a
    # view of the mapped file, of which a lookup touches only its rows
    streamed = tuple(m + "." for m in (adapter.decoder_blocks, adapter.vision_blocks, adapter.embed_tokens,
                                       adapter.lm_head))
    resident = {id(p): p for n, p in model.named_parameters() if not n.startswith(streamed)}
    largest = max(sum(p.numel() for p in blk.parameters())
                  for comp in (Component.DECODER, Component.VISION) for blk in adapter.blocks(model, comp))
    return sum(p.numel() for p in resident.values()) * b, largest * b


def _block_steps(skeleton: LoadedModel) -> list[list[nn.Linear]]:
    """The first decoder block's Linears in quantize's steps (a fused group, q/k/v or gate/up, is one)."""
    adapter = skeleton.adapter
    block = adapter.blocks(skeleton.model)[0]
    # full names, as quantize groups them (a fused group's names are matched after a dot)
    named = {f"{adapter.decoder_blocks}.0.{n}": m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    return [[named[n] for n in step] for step in sequential_steps(list(named), adapter.fused_groups)]


def _input_widths(skeleton: LoadedModel) -> list[int]:
    """One width per tensor the block's Linears read: a fused group (q/k/v, gate/up) reads one."""
    return [step[0].in_features for step in _block_steps(skeleton)]


@dataclass(frozen=True)
class TokenEstimate:
    """Tokens of the recipe's calibration samples, from a probe: the longest sample (``T``) and the mean
    image and text tokens per sample (over image and text-only samples alike)."""

    longest: int
    image_per_sample: float
    text_per_sample: float


def sample_tokens(model_name: str, skeleton: LoadedModel, recipe) -> TokenEstimate:
    """Token counts of :data:`PROBE_SAMPLES` calibration samples of the recipe (capped by ``max_tokens``);
    without a processor or data, every sample is taken to be ``max_tokens`` text tokens long."""
    from quantlab.calib.data import build_calibration_set
    from quantlab.models.load import processor_class, resolve
    from quantlab.models.processors import load_processor

    cal = recipe.calibration
    try:
        path = Path(resolve(model_name))
        probe = LoadedModel(skeleton.model, load_processor(path, processor_class(path)), skeleton.adapter,
                            skeleton.source)
        samples = build_calibration_set(probe, cal.model_copy(update={"num_samples": min(PROBE_SAMPLES,
                                                                                          cal.num_samples)})).samples
        lengths = [min(cal.max_tokens, s.inputs["input_ids"].shape[1]) for s in samples]
        images = [int(s.image_mask.sum()) for s in samples]
        return TokenEstimate(max(lengths), sum(images) / len(samples),
                             sum(n - i for n, i in zip(lengths, images)) / len(samples))
    except Exception:  # noqa: BLE001 - no processor, unreadable data: the cap is the bound
        return TokenEstimate(cal.max_tokens, 0.0, float(cal.max_tokens))


def forecast_run(skeleton: LoadedModel, model_name: str, recipe, *, stream: bool, device: str | None,
                 base_rss: int | None = None) -> list[StageForecast]:
    """The forecast of calibrate, plan, quantize and export (and eval, when the recipe has tasks)."""
    model = skeleton.model
    b, stored_b = _dtype_bytes(model_name, model, stream=stream, device=device)
    if base_rss is None:
        heap_trimmer()()  # as each stage's measured peak starts after a trim (host_memory.measured_peak)
    process = (current_rss() if base_rss is None else base_rss) or 0
    process += LIBRARIES
    weights, one_block = _weights(skeleton, b, stream)
    cal = recipe.calibration
    probe = sample_tokens(model_name, skeleton, recipe)
    n, T = cal.num_samples, probe.longest
    text = model.config.get_text_config()
    d = text.hidden_size
    steps = _block_steps(skeleton)
    linears = [m for step in steps for m in step]
    n_blocks = len(skeleton.adapter.blocks(model))
    on_device = device is not None and torch.device(device).type != "cpu"
    # the tensors the Linears read (q/k/v share one, gate/up another): their inputs are kept for every sample
    widths = _input_widths(skeleton)
    total = max(T, round(n * (probe.image_per_sample + probe.text_per_sample)))  # tokens of all samples
    samples = 2 * total * d * b
    opts = stats_options(recipe)
    # calibrate: the hooks keep references to each distinct Linear input until it has gathered a window of
    # rows, which is then concatenated (a copy) and summed (a flush); the inputs read later in the block
    # hold the rows of the window's earlier samples meanwhile (all of them when one flush at the end takes
    # every token). quantize: one sample's inputs at a time (the Hessian hook sums them, in float32).
    window = min(opts.flush_tokens + T, total)
    others = window if total <= opts.flush_tokens else window - T
    block_calibrate = max(2 * window * w + others * sum(widths[k + 1:]) for k, w in enumerate(widths)) * b
    block_quantize = T * sum(widths) * b + T * max(widths) * 4
    image_tokens, text_tokens = n * probe.image_per_sample, n * probe.text_per_sample

    def kept(cap: int) -> int:  # a reservoir keeps up to ``cap`` image and ``cap`` text rows (float32)
        return int(min(cap, image_tokens) + min(cap, text_tokens))

    # LUQ's tensor is the first Linear input (q/k/v read it too); every other distinct input has its own
    reservoir = 4 * (kept(opts.max_tokens) * d + kept(opts.linear_max_tokens) * sum(widths[1:]))
    # a flush's moments: float32 temporaries, five of MOMENT_CHUNK values (its copy is in ``block``)
    flush = 5 * 4 * min(MOMENT_CHUNK, window * max(widths))
    hessians = n_blocks * sum(m.in_features ** 2 * 4 for m in linears) if opts.hessians else 0
    # the solve holds the Linear's Hessian (factored in place on the CPU; torch keeps one workspace copy
    # elsewhere) and its working set; the largest such sum over the block's Linears
    # a step's Linears (q/k/v) share one Hessian: all but the last solve a copy while it is kept
    copies = 1 if not on_device else 2
    solver = max(m.in_features * m.out_features * SOLVER_BYTES_PER_WEIGHT
                 + (copies + (len(step) > 1)) * m.in_features ** 2 * 4
                 for step in steps for m in step)
    block_codes = sum(m.in_features * m.out_features for m in linears)  # uint8 until packed
    # streamed: one block's codes (the rest are on disk); in memory: every result, codes and dense weight
    codes = block_codes if stream else n_blocks * block_codes * (1 + b)
    largest = max(p.numel() for p in model.parameters()) * stored_b  # read as stored (a mapped view)

    def stage(name: str, host_terms: dict[str, int], device_terms: dict[str, int] | None = None) -> StageForecast:
        if not on_device:
            return StageForecast(name, sum(host_terms.values()), None, host_terms)
        device_terms = device_terms or {}
        return StageForecast(name, sum(host_terms.values()), sum(device_terms.values()),
                             host_terms | {f"device.{k}": v for k, v in device_terms.items()})

    common = {"process": process, "weights": weights}
    resident = {"block_weights": one_block} if one_block else {}
    work = {"samples": samples, "block": block_calibrate} | resident
    qwork = {"samples": samples, "block": block_quantize} | resident
    out = [
        stage("calibrate", common | ({} if on_device else work) | {"stats": reservoir + flush + hessians},
              work | {"weights": weights if not stream else 0}),
        stage("plan", common),
        stage("quantize", common | {"codes": codes} | ({} if on_device else qwork | {"solver": solver}),
              qwork | {"solver": solver}),
        # streamed: the dense tensors are written first (one mapped at a time), then the blocks' packed codes
        stage("export", common | ({"tensor": largest} if stream and largest > codes else {"codes": codes})),
    ]
    if recipe.eval.tasks:
        # evaluation loads the whole model in the loader's dtype, streamed or not
        full = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        full *= load_dtype(model_name).itemsize
        out.append(stage("eval", common | {"model": full}))
    return out


def host_budget() -> int | None:
    """What this process may grow to: its RSS now plus the machine's available memory (/proc/meminfo)."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    except OSError:
        return None
    return (current_rss() or 0) + info.get("MemAvailable", info.get("MemFree", 0))


def format_forecast(forecasts: list[StageForecast], budget: int | None) -> str:
    """A small table: stage, host peak, device peak, the two largest terms."""
    lines = ["memory forecast (peak of each stage):"]
    for f in forecasts:
        top = sorted(((v, k) for k, v in f.terms.items() if not k.startswith("device.")), reverse=True)[:3]
        dev = "" if f.device is None else f", device {f.device / GiB:.2f} GiB"
        lines.append(f"  {f.stage:9s} host {f.host / GiB:6.2f} GiB{dev}  ("
                     + ", ".join(f"{k} {v / GiB:.2f}" for v, k in top) + ")")
    if budget is not None:
        lines.append(f"  this machine: {budget / GiB:.2f} GiB available to this process")
    return "\n".join(lines)


def over_budget(forecasts: list[StageForecast], budget: int | None) -> list[StageForecast]:
    """The stages whose host forecast exceeds ``budget`` (none when the budget is unknown)."""
    return [] if budget is None else [f for f in forecasts if f.host > budget]


def remedies(forecasts: list[StageForecast], *, stream: bool, device: str | None, recipe) -> list[str]:
    """What would bring the largest stage down, largest effect first."""
    worst = max(forecasts, key=lambda f: f.host)
    out = []
    if not stream and worst.terms.get("weights", 0) > 0.3 * worst.host:
        out.append("--stream (read one block at a time from the checkpoint)")
    if worst.terms.get("samples", 0) + worst.terms.get("block", 0) > 0.2 * worst.host:
        out.append(f"fewer calibration samples or tokens (--set calibration.num_samples=..., now "
                   f"{recipe.calibration.num_samples}; calibration.max_tokens, now {recipe.calibration.max_tokens})")
        out.append(f"smaller images (--set calibration.max_pixels=..., now {recipe.calibration.max_pixels})")
    if device is None and worst.terms.get("solver", 0) > 0:
        out.append("--device cuda (the solves and activations move to the accelerator)")
    if worst.stage == "eval":
        out.append("--set 'eval.tasks=[]' (evaluation loads the whole model)")
    return out or ["a machine with more memory"]


def check_forecast(skeleton: LoadedModel, model_name: str, recipe, *, stream: bool, device: str | None
                   ) -> list[StageForecast]:
    """The run's forecast; :class:`UserError` (before anything is written) when a stage will not fit."""
    forecasts = forecast_run(skeleton, model_name, recipe, stream=stream, device=device)
    budget = host_budget()
    over = over_budget(forecasts, budget)
    if over:
        worst = max(over, key=lambda f: f.host)
        raise UserError(f"memory: {model_name} with recipe {recipe.name!r} is forecast to need "
                        f"{worst.host / GiB:.2f} GiB in the {worst.stage} stage, and this machine has "
                        f"{budget / GiB:.2f} GiB available\n{format_forecast(forecasts, budget)}",
                        "try " + "; or ".join(remedies(forecasts, stream=stream, device=device, recipe=recipe)))
    return forecasts
