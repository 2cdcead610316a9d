"""Export to compressed-tensors ``pack-quantized`` (mixed precision through one config group per scheme).

Layout per quantized Linear (``docs/formats.md#compressed-tensors-pack-quantized``): ``weight_packed``
int32 ``[out, ceil(in*b/32)]`` (dense packing, compressed-tensors >= 0.18), ``weight_scale`` in the model
dtype ``[out, groups]``, ``weight_zero_point`` int32 ``[ceil(out*b/32), groups]`` only when asymmetric,
``weight_shape`` int64 ``[2]``. Tensor names are the hub-legacy names of the family (adapter data).

Targets and ignores are ``re:`` patterns anchored on the component marker (``language_model``,
``vision_tower``, ``visual``, ...) so that both transformers' names and vLLM's internal names match and
the vision tower's ``layers.N.self_attn.q_proj`` never collides with the decoder's.

Asymmetric schemes are refused: with transformers 5.24 and compressed-tensors 0.20, transformers builds
``weight_zero_point`` unpacked (``[out, groups]``) while the checkpoint stores it packed, so even
compressed-tensors' own asymmetric checkpoints fail to load (size mismatch). Use symmetric schemes, or the
native format.

Loading: plain ``AutoModelForImageTextToText.from_pretrained(dir)`` with the default settings. Do not pass
``dequantize=True`` (``run_compressed=False``) for mixed-precision checkpoints: transformers 5.x then
dequantizes every module with the first config group's scheme (docs/formats.md#loader-quirks).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from torch import nn

from quantlab.export.io import dense_tensors, write_model_dir
from quantlab.export.spec import ExportFormat
from quantlab.models.adapter import Adapter
from quantlab.models.load import LoadedModel
from quantlab.quant.layout import INT32, INT64, Layout, TensorSpec, n_groups
from quantlab.quant.pack import pack_int32
from quantlab.quant.registry import get_backend
from quantlab.quant.result import g_idx_is_trivial
from quantlab.quant.scheme import QuantScheme


def layout(out_f: int, in_f: int, scheme: QuantScheme, *, bias: bool, dtype_bytes: int) -> Layout:
    """The tensors one quantized Linear stores (see the module docstring); refuses what it cannot store."""
    where = f"compressed-tensors: Linear {out_f}x{in_f} (out x in): "
    if not get_backend(scheme.backend).uniform_grid:
        raise ValueError(f"{where}{scheme.backend} codes are not a uniform grid and cannot be stored "
                         "pack-quantized; use fmt='native'")
    g = n_groups(in_f, scheme.group_size, where=where)
    b = scheme.bits
    lay = {"weight_packed": TensorSpec((out_f, math.ceil(in_f * b / 32)), INT32),
           "weight_scale": TensorSpec((out_f, g), dtype_bytes)}
    if not scheme.sym:
        lay["weight_zero_point"] = TensorSpec((math.ceil(out_f * b / 32), g), INT32)
    lay["weight_shape"] = TensorSpec((2,), INT64)
    if bias:
        lay["bias"] = TensorSpec((out_f,), dtype_bytes)
    return lay


def target_pattern(adapter: Adapter, name: str) -> str:
    """A layout-agnostic ``re:`` target for module ``name`` (transformers 5.x name)."""
    for prefix in (adapter.decoder, adapter.projector, adapter.vision, adapter.lm_head):
        if name == prefix or name.startswith(prefix + "."):
            marker = prefix.rsplit(".", 1)[-1]
            rest = name[len(prefix):]
            return f"re:.*{re.escape(marker)}{'.*' + re.escape(rest) if rest else ''}$"
    return f"re:.*{re.escape(name)}$"


def quant_args(bits: int, group_size: int, sym: bool) -> QuantizationArgs:
    """compressed-tensors weight args for one scheme (group or channel strategy, no act-order index)."""
    if group_size == -1:
        return QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="channel")
    return QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="group", group_size=group_size)


def packed_tensors(result, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors one quantized Linear stores (names under ``prefix``)."""
    bits = result.bits
    if result.group_size != -1 and not g_idx_is_trivial(result.g_idx, result.codes.shape[1], result.group_size):
        raise ValueError(f"{prefix}: act-order without static groups needs a group index, which "
                         "compressed-tensors no longer stores; use static_groups=True or the gptq format")
    out = {
        f"{prefix}.weight_packed": pack_int32(result.codes, bits),
        f"{prefix}.weight_scale": result.scales.to(dtype).contiguous(),
        f"{prefix}.weight_shape": torch.tensor(list(result.codes.shape), dtype=torch.int64),
    }
    if not result.sym:
        out[f"{prefix}.weight_zero_point"] = pack_int32(result.zeros.round().to(torch.int64), bits, dim=0)
    return out


def quantization_config(adapter: Adapter, results: Mapping[str, object], linears: list[str]) -> dict:
    """``config.json["quantization_config"]``: one group per distinct (bits, group, sym), explicit ignores."""
    asym = sorted(n for n, r in results.items() if not r.sym)
    if asym:
        raise ValueError(f"compressed-tensors export: asymmetric schemes do not load in transformers 5.x with "
                         f"compressed-tensors 0.20 (packed zero points); modules {asym[:4]}{'...' if len(asym) > 4 else ''} "
                         "use sym=False. Re-plan them with symmetric schemes or export with format 'native'")
    groups: dict[tuple[int, int, bool], list[str]] = defaultdict(list)
    for name, r in results.items():
        groups[(r.bits, r.group_size, r.sym)].append(target_pattern(adapter, name))
    config_groups = {
        f"group_{i}": QuantizationScheme(targets=sorted(targets), weights=quant_args(*key))
        for i, (key, targets) in enumerate(sorted(groups.items()))
    }
    ignore = [target_pattern(adapter, n) for n in linears if n not in results]
    cfg = QuantizationConfig(config_groups=config_groups, ignore=ignore, format="pack-quantized",
                             quantization_status="compressed")
    return {"quant_method": "compressed-tensors", **cfg.model_dump(mode="json", exclude_none=False)}


def write_compressed_tensors(loaded: LoadedModel, results: Mapping[str, object], out: Path,
                             dtype: torch.dtype = torch.float16, *, weights=None) -> None:
    """Write model tensors, ``config.json`` with ``quantization_config``, processor and generation config.

    ``weights``: for a streamed model, where its meta-device tensors are read from (``load_streaming``).
    """
    linears = [n for n, m in loaded.model.named_modules() if isinstance(m, nn.Linear)]
    qcfg = quantization_config(loaded.adapter, results, linears)  # validates before anything is written
    def tensors():
        yield from dense_tensors(loaded, set(results), dtype, weights=weights, lazy=True, results=results)
        for name, r in results.items():
            yield from packed_tensors(r, loaded.adapter.legacy_name(name), dtype).items()

    write_model_dir(loaded, tensors(), qcfg, out, dtype)


FORMAT = ExportFormat(
    vision=True,
    name="compressed-tensors", write=write_compressed_tensors, layout=layout, uniform_only=True,
    load_snippet=("```python\nfrom transformers import AutoModelForImageTextToText, AutoProcessor\n"
        "model = AutoModelForImageTextToText.from_pretrained(\"{repo}\")   # default settings; do not pass "
        "dequantize=True for mixed precision\n"
        "# unpack now: generate() encodes images before the first forward, which would unpack them\n"
        "model.hf_quantizer.compressor.decompress_model(model)\n"
        "processor = AutoProcessor.from_pretrained(\"{repo}\")\n```\n\n"
        "vLLM: `vllm serve {repo}` (2/3-bit groups need vLLM's Humming kernels, CUDA)."),
)
