"""quantlab's native format, for schemes no third-party format holds (BiLLM binarization).

    DIR/config.json               the model config (no quantization_config: transformers would reject it)
    DIR/model.safetensors         every tensor except quantized Linear weights (transformers 5.x names)
    DIR/quantized.safetensors     per quantized Linear: codes, scales, zeros, g_idx, backend extras
                                  (``<module>|<field>``), scalars as JSON metadata (see results_io)
    DIR/quantlab.json             {"format": "quantlab-native", "modules": [...], "backends": {...}}
    + processor and generation config

Load with :func:`load_native`; the result is a regular transformers model holding the dequantized
(fake-quant) weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from quantlab.core.errors import problems_error
from quantlab.export.io import model_tensors, write_json
from quantlab.export.safetensors_stream import SafetensorsWriter
from quantlab.export.spec import ExportFormat
from quantlab.models.adapter import ties_embeddings
from quantlab.models.load import LoadedModel, get_adapter, load_config, processor_class
from quantlab.models.processors import load_processor
from quantlab.quant.layout import FP16, INT32, Layout, TensorSpec, n_groups
from quantlab.quant.pack import pack_int32, unpack_int32
from quantlab.quant.registry import get_backend
from quantlab.quant.result import QuantResult, g_idx_is_trivial
from quantlab.quant.scheme import QuantScheme

MARKER = "quantlab.json"


def layout(out_f: int, in_f: int, scheme: QuantScheme, *, bias: bool, dtype_bytes: int) -> Layout:
    """What :func:`encode` stores for one Linear: a backend's own codec layout if it has one (BiLLM's bit
    planes), else packed codes, fp16 scales and (asymmetric) packed zero points. A non-trivial act-order
    ``g_idx`` (int32 ``[in]``) is stored too; a plan cannot know it in advance and does not count it."""
    codec = get_backend(scheme.backend).native
    if codec is not None:
        return codec.layout(out_f, in_f, scheme, bias=bias, dtype_bytes=dtype_bytes)
    g = n_groups(in_f, scheme.group_size, where=f"native: Linear {out_f}x{in_f} (out x in): ")
    b = scheme.bits
    lay = {"codes_packed": TensorSpec((out_f, math.ceil(in_f * b / 32)), INT32),
           "scales": TensorSpec((out_f, g), FP16)}
    if not scheme.sym:
        lay["zeros_packed"] = TensorSpec((math.ceil(out_f * b / 32), g), INT32)
    if bias:
        lay["bias"] = TensorSpec((out_f,), dtype_bytes)
    return lay


def encode(r) -> dict[str, torch.Tensor]:
    """What one result stores on disk: bit-packed codes, fp16 scales (and means), packed zeros, g_idx."""

    codec = get_backend(r.backend).native
    if codec is not None:  # codes of the backend's own kind (BiLLM's bit planes)
        return codec.encode(r)
    out = {"scales": r.scales.to(torch.float16)}
    out["codes_packed"] = pack_int32(r.codes, r.bits)
    if r.zeros is not None:
        out["zeros_packed"] = pack_int32(r.zeros.round().to(torch.int64), r.bits, dim=0)
    if not g_idx_is_trivial(r.g_idx, r.codes.shape[1], r.group_size):
        out["g_idx"] = r.g_idx.to(torch.int32)
    return out


def decode(sc: dict, t: dict[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype):
    """Rebuild a QuantResult (with its dequantized weight) from :func:`encode`'s tensors."""
    out_f, in_f = shape
    fields = {k: v for k, v in sc.items() if k in {"backend", "args", "bits", "group_size", "sym",
                                                   "bits_per_weight", "error"}}
    codec = get_backend(sc["backend"]).native
    if codec is not None:
        return codec.decode(fields, t, shape, dtype)
    codes = unpack_int32(t["codes_packed"], sc["bits"], in_f).to(torch.uint8)
    zeros = unpack_int32(t["zeros_packed"], sc["bits"], out_f, dim=0).float() if "zeros_packed" in t else None
    r = QuantResult(**fields, codes=codes, scales=t["scales"].float(), zeros=zeros, g_idx=t.get("g_idx"),
                    dequantized=torch.empty(shape, dtype=dtype))
    return dataclasses.replace(r, dequantized=r.dequantize())


def write_native(loaded: LoadedModel, results: Mapping[str, object], out: Path,
                 dtype: torch.dtype = torch.float16, *, weights=None) -> None:
    """Write a native checkpoint (``weights``: a streamed model's source, see ``io.model_tensors``)."""
    model = loaded.model
    # both files are written a tensor at a time (a streamed model's export holds one tensor, one result)
    with SafetensorsWriter(out / "model.safetensors", {"format": "pt"}) as w:
        for n, t in model_tensors(loaded, lambda n: n.rpartition(".")[0] in results and n.endswith(".weight"),
                                  weights, results):
            w.add(n, t, dtype if t.is_floating_point() else None)
    scalars = {}
    with SafetensorsWriter(out / "quantized.safetensors") as w:
        for name, r in results.items():
            for k, v in encode(r).items():
                w.add(f"{name}|{k}", v)
            scalars[name] = {"backend": r.backend, "args": r.args, "bits": r.bits, "group_size": r.group_size,
                             "sym": r.sym, "bits_per_weight": r.bits_per_weight, "error": r.error,
                             "shape": list(r.codes.shape)}
        w.metadata = {"quantlab_native": json.dumps(scalars)}
    config = model.config.to_dict()
    config["dtype"] = str(dtype).removeprefix("torch.")
    write_json(out / "config.json", config)
    write_json(out / MARKER, {"format": "quantlab-native", "version": 1, "modules": sorted(results),
                              "backends": {n: r.backend for n, r in results.items()}})
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    if loaded.processor is not None:
        loaded.processor.save_pretrained(out)


def read_native_results(directory: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, object]:
    """The quantization results stored in a native checkpoint.

    Raises:
        UserError: a module of ``quantlab.json`` without its tensors, a tensor of no module, or tensors
            that do not decode to the recorded shape (each named).
    """
    from safetensors import safe_open

    directory = Path(directory)
    with safe_open(str(directory / "quantized.safetensors"), framework="pt") as f:
        scalars = json.loads(f.metadata()["quantlab_native"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    listed = json.loads((directory / MARKER).read_text()).get("modules", list(scalars))
    problems = [f"missing: {n} (listed in {MARKER}, no tensors in quantized.safetensors)" for n in listed
                if n not in scalars]
    problems += [f"unexpected: {k}" for k in sorted(tensors) if k.split("|", 1)[0] not in scalars]
    out = {}
    for name, sc in scalars.items():
        mine = {k.split("|", 1)[1]: v for k, v in tensors.items() if k.split("|", 1)[0] == name}
        try:
            out[name] = decode(sc, mine, tuple(sc["shape"]), dtype)
        except KeyError as err:
            problems.append(f"missing: {name}|{err.args[0]}")
        except (RuntimeError, ValueError, IndexError) as err:
            problems.append(f"wrong shape: {name}: its tensors do not decode to {tuple(sc['shape'])} ({err})")
    if problems:
        raise problems_error(f"{directory}: quantized.safetensors does not match {MARKER}", problems,
                             "restore the checkpoint, or export it again (quantlab export RUN)")
    return out


def load_native(directory: str | Path, *, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Open a quantlab native checkpoint (``quantlab.json``; BiLLM layers): the model with dequantized weights,
    its processor and adapter. One of quantlab's four loaders (see :mod:`quantlab.export.open`)."""
    from transformers import AutoModelForImageTextToText


    directory = Path(directory)
    if not (directory / MARKER).is_file():
        raise FileNotFoundError(f"{directory}: no {MARKER}; not a quantlab native checkpoint")
    config = load_config(directory)
    model = AutoModelForImageTextToText.from_config(config, dtype=dtype).eval()
    state = {k: v.to(dtype) if v.is_floating_point() else v
             for k, v in load_file(str(directory / "model.safetensors")).items()}
    for name, r in read_native_results(directory, dtype).items():
        state[f"{name}.weight"] = r.dequantized.to(dtype)
    expected = model.state_dict()
    wrong = [f"wrong shape: {k}: checkpoint {tuple(v.shape)}, config {tuple(expected[k].shape)}"
             for k, v in sorted(state.items()) if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise problems_error(f"{directory}: the checkpoint's tensors do not match its config.json", wrong,
                             "restore the checkpoint, or export it again (quantlab export RUN)")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight") or not ties_embeddings(config)]
    if missing or unexpected:
        raise problems_error(f"{directory}: the checkpoint's tensors do not match its config.json",
                             [f"missing: {k}" for k in missing] + [f"unexpected: {k}" for k in unexpected],
                             "restore the checkpoint, or export it again (quantlab export RUN)")
    if ties_embeddings(config):
        model.tie_weights()
    has_processor = any((directory / f).is_file() for f in ("processor_config.json", "preprocessor_config.json"))
    processor = load_processor(directory, processor_class(directory)) if has_processor else None
    return LoadedModel(model, processor, get_adapter(config), str(directory))


FORMAT = ExportFormat(
    vision=True,
    name="native", write=write_native, layout=layout, uniform_only=False,
    load_snippet=("```python\nimport quantlab\nloaded = quantlab.load_native(\"{repo}\")   # BiLLM layers are dequantized "
        "on load\n```"),
)
