"""Does a full-size export open? transformers builds the quantized model from the export's config on the meta
device, compressed-tensors decodes one decoder block's packed tensors, and that block's output is compared
with quantlab's fake-quant block.

Usage::

    .venv/bin/python eval/bench/full_size_open.py RUN [--block 0] [--tokens 64]

``RUN`` is a run directory of eval/bench/full_size.py (``RUN/model`` a compressed-tensors export,
``RUN/quant/block_*.safetensors`` quantlab's own results, ``RUN/recipe.yaml`` and ``state.json`` naming the
source checkpoint). Checks, printing one line each and exiting 1 on any failure:

1. ``AutoModelForImageTextToText.from_config`` on the meta device plus compressed-tensors'
   ``apply_quantization_config`` (what transformers' compressed-tensors quantizer does before loading
   weights) gives every quantized Linear of the plan its planned bits and group size, and every
   compressed parameter it registers has the shape of the tensor in the export's shards (headers only).
2. Block ``--block``: compressed-tensors' ``PackedQuantizationCompressor.decompress`` of each Linear's packed
   tensors equals quantlab's weight (the float32 product of ``RUN/quant``'s codes and stored scales, rounded
   to the export's dtype) exactly, and the block's output on random hidden states with the decoded weights equals the output with
   quantlab's weights (the block's other tensors read from the source checkpoint), to 1e-5 relative, and
   the output with the in-memory fake-quant block's weights (the model's dtype, e.g. bf16, while the export
   holds fp16) to 1e-2.

Nothing but block ``--block`` is ever materialised: memory stays at one block.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open


def shard_of(export: Path) -> dict[str, Path]:
    """tensor name -> shard file of an export (sharded or single-file)."""
    index = export / "model.safetensors.index.json"
    if index.is_file():
        return {k: export / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    single = export / "model.safetensors"
    with safe_open(str(single), "pt") as f:
        return {k: single for k in f.keys()}


def header_shape(path: Path, name: str) -> tuple[int, ...]:
    with safe_open(str(path), "pt") as f:
        return tuple(f.get_slice(name).get_shape())


def read(path: Path, name: str) -> torch.Tensor:
    with safe_open(str(path), "pt") as f:
        return f.get_tensor(name)


def positions(model, config, hidden: torch.Tensor):
    """Rotary embeddings for ``T`` text positions (Qwen2.5-VL: the three mrope rows equal)."""
    lm = model.model.language_model
    T = hidden.shape[1]
    pos = torch.arange(T)[None]
    if getattr(config, "model_type", "") in ("qwen2_5_vl", "qwen2_vl"):
        pos = pos.expand(3, 1, T)
    return pos, lm.rotary_emb(hidden, pos)


def main() -> None:
    from accelerate import init_empty_weights
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from transformers import AutoConfig, AutoModelForImageTextToText

    from quantlab.calib.weights import SafetensorsWeights
    from quantlab.models.load import get_adapter
    from quantlab.quant.results_io import load_results

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--block", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args()
    export, failures = a.run / "model", []
    source = Path(json.loads((a.run / "state.json").read_text())["_model"])
    config = AutoConfig.from_pretrained(export)
    dtype = getattr(torch, str(config.dtype).removeprefix("torch."))
    qcfg = QuantizationConfig.model_validate(config.quantization_config)
    with init_empty_weights(include_buffers=False):  # rotary inv_freq stays real
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    apply_quantization_config(model, qcfg, run_compressed=True, show_progress=False)
    adapter = get_adapter(config)
    shards = shard_of(export)
    plan = {}
    for f in sorted((a.run / "quant").glob("block_*.safetensors")):
        plan.update(load_results(f, dequantized=False))
    checked = 0
    for name, r in plan.items():
        module = model.get_submodule(name)
        scheme = getattr(module, "quantization_scheme", None)
        got = None if scheme is None else (scheme.weights.num_bits, scheme.weights.group_size or -1)
        if got != (r.bits, r.group_size):
            failures.append(f"{name}: transformers/compressed-tensors scheme {got}, planned {(r.bits, r.group_size)}")
            continue
        legacy = adapter.legacy_name(name)
        # what compressed-tensors' packer makes of this module's (meta) weight and scale: the tensor names
        # and shapes its loader will look for in the checkpoint
        meta_state = {p: t for p, t in module.named_parameters(recurse=False) if p in ("weight", "weight_scale")}
        expected = {k: tuple(v.shape) for k, v in PackedQuantizationCompressor.compress(meta_state, scheme).items()
                    if v is not None}
        for pname, shape in expected.items():
            key = f"{legacy}.{pname}"
            if key not in shards:
                failures.append(f"{key}: expected by compressed-tensors, not in the export")
            elif shape != header_shape(shards[key], key) and pname != "weight_shape":
                failures.append(f"{key}: compressed-tensors expects {shape}, export holds {header_shape(shards[key], key)}")
        checked += not any(f.startswith(legacy + ".") for f in failures)
    print(f"1. meta model from the export: {checked}/{len(plan)} planned Linears with the planned scheme and "
          f"tensor shapes ({len(failures)} problems)")

    # 2. one block, decoded by compressed-tensors vs quantlab's fake-quant weights
    prefix = f"{adapter.decoder_blocks}.{a.block}."
    block = adapter.blocks(model)[a.block]
    ours = load_results(a.run / "quant" / f"block_{a.block:03d}.safetensors")
    weights = SafetensorsWeights(source, adapter, dtype, {})
    exact = 0
    decoded, mine_all = {}, {}
    for name, module in list(block.named_modules()):
        full = prefix + name
        if full not in ours:
            continue
        legacy = adapter.legacy_name(full)
        state = {p: read(shards[f"{legacy}.{p}"], f"{legacy}.{p}")
                 for p in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
                 if f"{legacy}.{p}" in shards}
        dense = PackedQuantizationCompressor.decompress(state, module.quantization_scheme)["weight"].to(dtype)
        r = ours[full]  # quantlab's weight: the exact float32 product of codes and stored scales, in the export dtype
        zero = 1 << (r.bits - 1) if r.zeros is None else r.zeros.repeat_interleave(r.group_size, dim=1)
        mine = ((r.codes.float() - zero) * r.scales.float().repeat_interleave(r.group_size, dim=1)).to(dtype)
        exact += torch.equal(dense, mine)
        if not torch.equal(dense, mine):
            failures.append(f"{full}: decoded weight differs from quantlab's (max {(dense - mine).abs().max():.3g})")
        decoded[full] = dense
        mine_all[full] = mine
    print(f"2a. block {a.block}: {exact}/{len(decoded)} Linears decode to quantlab's weights bit for bit")
    # the block in full precision from the source checkpoint, then each set of Linear weights swapped in
    with init_empty_weights(include_buffers=False):
        fp = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(source), dtype=dtype)
    fp_block = adapter.blocks(fp)[a.block]
    weights.load(fp_block, f"{adapter.decoder_blocks}.{a.block}")
    torch.manual_seed(0)
    hidden = torch.randn(1, a.tokens, config.get_text_config().hidden_size, dtype=dtype)
    pos, pe = positions(fp, fp.config, hidden)
    outs = {}
    model_dtype = ours[next(iter(ours))].dequantized.dtype  # what the in-memory fake-quant model holds
    fake = {k: v.dequantized.to(model_dtype).to(dtype) for k, v in ours.items()}
    for label, source_weights in (("compressed-tensors", decoded), ("quantlab", mine_all), ("fake-quant", fake)):
        with torch.no_grad():
            for full, w in source_weights.items():
                fp_block.get_submodule(full[len(prefix):]).weight.copy_(w)
            out = fp_block(hidden, attention_mask=None, position_ids=pos, position_embeddings=pe)
        outs[label] = (out[0] if isinstance(out, tuple) else out).float()
    rel = ((outs["compressed-tensors"] - outs["quantlab"]).norm() / outs["quantlab"].norm()).item()
    if not rel <= 1e-5:
        failures.append(f"block {a.block} output: relative difference {rel:.3g} > 1e-5")
    print(f"2b. block {a.block} output, decoded vs quantlab weights: relative difference {rel:.3g}")
    rel_fake = ((outs["compressed-tensors"] - outs["fake-quant"]).norm() / outs["fake-quant"].norm()).item()
    if not rel_fake <= 1e-2:
        failures.append(f"block {a.block} output vs the in-memory fake-quant block: {rel_fake:.3g} > 1e-2")
    print(f"2c. block {a.block} output, decoded vs quantlab's in-memory fake-quant block ({model_dtype}, weights "
          f"rounded to it; the export stores {dtype}): relative difference {rel_fake:.3g}")
    for f in failures[:20]:
        print("  FAIL", f)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
