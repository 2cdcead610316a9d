"""compressed-tensors export: transformers (in a process that never imports quantlab) loads it and
reproduces the in-memory fake-quant logits."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from quantlab.export.compressed_tensors import target_pattern, write_compressed_tensors
from quantlab.export.io import write_dir_atomic
from quantlab.models import Component, get_adapter
from quantlab.models.load import LoadedModel
from tests.conftest import tiny_inputs

LOADER = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageTextToText
    assert not any(m.startswith("quantlab") for m in sys.modules)
    model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
    inputs = load_file(sys.argv[2])
    with torch.no_grad():
        logits = model(**inputs).logits
    assert not any(m.startswith("quantlab") for m in sys.modules)
    save_file({"logits": logits.contiguous()}, sys.argv[3])
""")


def transformers_logits(checkpoint, inputs: dict[str, torch.Tensor], tmp_path) -> torch.Tensor:
    """The logits transformers computes for ``inputs`` from ``checkpoint``, in another process that never
    imports quantlab (:data:`LOADER`)."""
    from safetensors.torch import load_file, save_file

    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    (tmp_path / "load.py").write_text(LOADER)
    subprocess.run([sys.executable, str(tmp_path / "load.py"), str(checkpoint), str(tmp_path / "inputs.safetensors"),
                    str(tmp_path / "logits.safetensors")], check=True, capture_output=True, cwd=tmp_path)
    return load_file(str(tmp_path / "logits.safetensors"))["logits"]


def rtn_result(w: torch.Tensor, bits: int, group: int, sym: bool):
    """Plain round-to-nearest with fp16-representable scales (a reference independent of quantlab.quant)."""
    out, cols = w.shape
    g = cols if group == -1 else group
    wg = w.reshape(out, cols // g, g)
    maxq = 2**bits - 1
    if sym:
        scale = (2 * wg.abs().amax(-1) / maxq).clamp_min(1e-8).half().float()
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        scale = ((hi - lo) / maxq).clamp_min(1e-8).half().float()
        zero = torch.round(-lo / scale)
    codes = torch.clamp(torch.round(wg / scale[..., None]) + zero[..., None], 0, maxq)
    deq = ((codes - zero[..., None]) * scale[..., None]).reshape(out, cols)
    return SimpleNamespace(bits=bits, group_size=group, sym=sym, codes=codes.reshape(out, cols).to(torch.uint8),
                           scales=scale, zeros=None if sym else zero, g_idx=None, dequantized=deq)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_mixed_precision_checkpoint_loads_in_transformers(family, tmp_path):
    out = _export_and_load(family, tmp_path)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not any(k.startswith("model.language_model") for k in keys)  # hub-legacy names only


def test_sharded_checkpoint_loads_in_transformers(tmp_path, monkeypatch):
    """Shards of at most 64 KiB: the index names every tensor once, and transformers loads the same model."""
    import quantlab.export.io as io

    monkeypatch.setattr(io, "SHARD_BYTES", 64 << 10)
    out = _export_and_load("llava", tmp_path)
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 3 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    names = {}
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
            names.update({k: shard.name for k in f.keys()})
            big = [s for s in sizes if math.prod(s) * 2 > 64 << 10]
            assert len(sizes) == 1 or not big  # a tensor over the limit gets a shard of its own
    assert index["weight_map"] == names


def _export_and_load(family, tmp_path):
    """A mixed-precision RTN export of a tiny model; transformers' logits from it equal the fake-quant model's."""
    from tests.conftest import TINY_BUILDERS

    model = TINY_BUILDERS[family]()
    adapter = get_adapter(model)
    schemes = [(4, 32, True), (2, 64, True), (3, 32, True), (8, -1, True), (4, 64, True)]
    results = {}
    for k, (name, mod) in enumerate(adapter.iter_linears(model, Component.DECODER)):
        if "o_proj" in name:
            continue  # left in full precision: must appear in `ignore`
        r = rtn_result(mod.weight.data, *schemes[k % len(schemes)])
        mod.weight.data.copy_(r.dequantized)
        results[name] = r
    quantized = {f"{n}.weight" for n in results}
    with torch.no_grad():  # the in-memory fake-quant model, every other tensor rounded as stored (fp16)
        for n, p in model.named_parameters():
            if n not in quantized:
                p.copy_(p.half().float())
    loaded = LoadedModel(model, None, adapter, family)
    out = write_dir_atomic(tmp_path / "ckpt", lambda d: write_compressed_tensors(loaded, results, d))
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized" and len(cfg["config_groups"]) == len(schemes)
    torch.manual_seed(0)
    inputs = tiny_inputs(family, batch=1)
    theirs = transformers_logits(out, inputs, tmp_path)
    with torch.no_grad():
        ours = model(**inputs).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    return out


def test_targets_never_cross_components():
    a = get_adapter(SimpleNamespace(model_type="llava"))
    pat = target_pattern(a, "model.language_model.layers.0.self_attn.q_proj")
    import re

    rx = pat.removeprefix("re:")
    assert re.match(rx, "model.language_model.layers.0.self_attn.q_proj")  # transformers 5.x
    assert re.match(rx, "language_model.model.layers.0.self_attn.q_proj")  # vLLM / hub legacy
    assert not re.match(rx, "model.vision_tower.encoder.layers.0.self_attn.q_proj")
    assert not re.match(rx, "model.language_model.layers.10.self_attn.q_proj")


def test_refuses_to_overwrite(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        write_dir_atomic(tmp_path / "x", lambda d: None)
    assert (tmp_path / "x").is_dir()


def test_asymmetric_is_refused_with_module_names(tmp_path):
    from tests.conftest import tiny_llava

    model = tiny_llava()
    adapter = get_adapter(model)
    name, mod = next(adapter.iter_linears(model, Component.DECODER))
    results = {name: rtn_result(mod.weight.data, 4, 32, False)}
    loaded = LoadedModel(model, None, adapter, "llava")
    with pytest.raises(ValueError, match=r"asymmetric.*q_proj"):
        write_dir_atomic(tmp_path / "ckpt", lambda d: write_compressed_tensors(loaded, results, d))
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("name", ["toy-llava", "toy-qwen2.5-vl"])
def test_trained_toy_mixed_plan_round_trip(name, tmp_path):
    """quantlab's GPTQ with 2/3/4/8 bits across the decoder of a shipped toy; transformers reproduces it."""
    from quantlab.calib.data import CalibDataOptions, build_calibration_set
    from quantlab.models import load_model
    from quantlab.models.load import ASSETS
    from quantlab.quant.apply import quantize
    from quantlab.quant.scheme import QuantScheme

    if not (ASSETS / name / "model.safetensors").is_file():
        pytest.skip(f"{name} is not built (make toys)")
    loaded = load_model(name)
    calib = build_calibration_set(loaded, CalibDataOptions(num_samples=8, alpha=0.5))
    bits = [(2, 64), (3, 128), (4, 128), (8, 128)]
    plan = {n: QuantScheme(backend="gptq", bits=bits[loaded.adapter.block_index(n) % 4][0],
                           group_size=bits[loaded.adapter.block_index(n) % 4][1])
            for n, _ in loaded.adapter.iter_linears(loaded.model, Component.DECODER)}
    results = quantize(loaded, plan, calib.samples, progress=False)
    out = write_dir_atomic(tmp_path / "ckpt", lambda d: write_compressed_tensors(loaded, results, d))
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert sorted(g["weights"]["num_bits"] for g in cfg["config_groups"].values()) == [2, 3, 4, 8]
    inputs = next(s for s in calib.samples if s.has_image).inputs
    theirs = transformers_logits(out, inputs, tmp_path)
    with torch.no_grad():
        ours = loaded.model(**inputs).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


@pytest.mark.parametrize("where", ["top", "text", "none"])
def test_a_tied_head_is_written_once(where):
    """Qwen2.5-VL keeps ``tie_word_embeddings`` on the top-level config, LLaVA on the text config: either
    way a tied head is not written again beside the embedding (0.6 GB at 3B)."""
    from quantlab.export.io import dense_tensors
    from quantlab.models.adapter import ties_embeddings
    from tests.conftest import tiny_qwen2_5_vl

    model = tiny_qwen2_5_vl()
    model.config.tie_word_embeddings = where == "top"
    model.config.text_config.tie_word_embeddings = where == "text"
    names = [n for n, *_ in dense_tensors(LoadedModel(model, None, get_adapter(model), "t"), set(), torch.float16)]
    assert ties_embeddings(model.config) == (where != "none")
    assert ("lm_head.weight" in names) == (where == "none") and "model.embed_tokens.weight" in names


GENERATE = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
    model.hf_quantizer.compressor.decompress_model(model)   # the model card's line
    inputs = load_file(sys.argv[2])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    save_file({"logits": torch.stack(out.logits).contiguous()}, sys.argv[3])
""")


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_quantized_vision_tower_generates_in_transformers_and_quantlab(family, tmp_path):
    """Vision Linears at W8 and decoder Linears at W4: transformers' generate (which encodes the images before
    the forward that would unpack the weights) runs with the model card's snippet in another process, and
    quantlab's loader, and both reproduce the in-memory fake-quant model's logits (docs/formats.md)."""
    from quantlab.models import load_model
    from tests.conftest import TINY_BUILDERS

    model = TINY_BUILDERS[family]()
    adapter = get_adapter(model)
    results = {}
    for component, bits in ((Component.VISION, 8), (Component.DECODER, 4)):
        for name, mod in adapter.iter_linears(model, component):
            r = rtn_result(mod.weight.data, bits, -1, True)
            mod.weight.data.copy_(r.dequantized)
            results[name] = r
    assert any(adapter.component_of(n) is Component.VISION for n in results)
    quantized = {f"{n}.weight" for n in results}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n not in quantized:
                p.copy_(p.half().float())
    loaded = LoadedModel(model, None, adapter, family)
    out = write_dir_atomic(tmp_path / "ckpt", lambda d: write_compressed_tensors(loaded, results, d))
    torch.manual_seed(0)
    inputs = tiny_inputs(family, batch=1)
    kwargs = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ours = torch.stack(model.eval().generate(**inputs, **kwargs).logits)
        reopened = load_model(out, dtype=torch.float32, with_processor=False).model
        theirs_here = torch.stack(reopened.generate(**inputs, **kwargs).logits)
    torch.testing.assert_close(theirs_here, ours, rtol=0, atol=1e-4)

    from safetensors.torch import load_file, save_file

    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    (tmp_path / "generate.py").write_text(GENERATE)
    subprocess.run([sys.executable, str(tmp_path / "generate.py"), str(out), str(tmp_path / "inputs.safetensors"),
                    str(tmp_path / "logits.safetensors")], check=True, capture_output=True, cwd=tmp_path)
    torch.testing.assert_close(load_file(str(tmp_path / "logits.safetensors"))["logits"], ours, rtol=0, atol=1e-4)
