"""Export to the GPTQ v1 checkpoint format (``sym=True``, ``desc_act=False``).

Tensor names are transformers 5's module names (``model.language_model.layers…``), the layout GPTQModel
writes and the only one its loader accepts; transformers 5 and vLLM map it as well. Per quantized Linear
(``docs/formats.md#gptq-v1``): ``qweight`` int32 ``[in*b/32, out]``,
``qzeros`` int32 ``[groups, out*b/32]`` holding ``z - 1`` (v1), ``scales`` fp16 ``[groups, out]``,
``g_idx`` int32 ``[in]``. Packing is the dense little-endian bitstream (the "10-1-10-1-10" 3-bit layout
is the same stream), i.e. compressed-tensors' packing transposed.

A uniform plan loads through transformers + optimum + gptqmodel. A mixed plan writes GPTQModel's
``dynamic`` rules with explicit ``+:``/``-:`` prefixes (GPTQModel and vLLM honour them; optimum, hence
transformers, applies one global scheme and cannot load mixed-bit GPTQ).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from quantlab.export.io import dense_tensors, write_json, write_model_dir
from quantlab.export.spec import ExportFormat
from quantlab.models.load import LoadedModel
from quantlab.quant.layout import FP16, INT32, Layout, TensorSpec, n_groups
from quantlab.quant.pack import pack_gptq_qweight, pack_gptq_qzeros
from quantlab.quant.registry import get_backend
from quantlab.quant.scheme import QuantScheme

GPTQ_BITS = (2, 3, 4, 8)


def layout(out_f: int, in_f: int, scheme: QuantScheme, *, bias: bool, dtype_bytes: int) -> Layout:
    """qweight / qzeros / scales / g_idx of one quantized Linear; refuses what GPTQ v1 cannot store."""
    where = f"gptq: Linear {out_f}x{in_f} (out x in): "
    if not get_backend(scheme.backend).uniform_grid:
        raise ValueError(f"{where}{scheme.backend} codes cannot be stored in GPTQ tensors; use fmt='native'")
    if scheme.bits not in GPTQ_BITS:
        raise ValueError(f"{where}{scheme.bits}-bit is not a GPTQ width; GPTQ stores bits in {GPTQ_BITS}")
    if in_f % 32 or out_f % 32:
        raise ValueError(f"{where}GPTQ packing needs in_features % 32 == 0 (qweight) and "
                         "out_features % 32 == 0 (qzeros); keep this Linear in fp or use compressed-tensors")
    g = n_groups(in_f, scheme.group_size, where=where)
    b = scheme.bits
    lay = {"qweight": TensorSpec((in_f * b // 32, out_f), INT32),
           "qzeros": TensorSpec((g, out_f * b // 32), INT32),
           "scales": TensorSpec((g, out_f), FP16),
           "g_idx": TensorSpec((in_f,), INT32)}
    if bias:
        lay["bias"] = TensorSpec((out_f,), FP16)
    return lay


def check_result(name: str, r) -> None:
    """Refuse what GPTQ v1 cannot hold, naming the module and the reason."""
    out, cols = r.codes.shape
    reasons = []
    if r.bits not in GPTQ_BITS:
        reasons.append(f"bits={r.bits} (GPTQ takes {GPTQ_BITS})")
    if not r.sym:
        reasons.append("asymmetric (v1 cannot store zero point 0; use sym=True)")
    if cols % 32 or out % 32:
        reasons.append(f"shape {out}x{cols} (packing needs in % 32 == 0 and out % 32 == 0)")
    if reasons:
        raise ValueError(f"gptq export: {name}: " + "; ".join(reasons))


def gptq_tensors(r, prefix: str) -> dict[str, torch.Tensor]:
    """qweight / qzeros / scales / g_idx for one quantized Linear."""
    out, cols = r.codes.shape
    groups = r.scales.shape[1]
    g = cols if r.group_size == -1 else r.group_size
    g_idx = r.g_idx.to(torch.int32) if r.g_idx is not None else (torch.arange(cols) // g).to(torch.int32)
    zeros = torch.full((out, groups), 1 << (r.bits - 1), dtype=torch.int32)  # symmetric: z = 2^(b-1)
    return {
        f"{prefix}.qweight": pack_gptq_qweight(r.codes, r.bits),
        f"{prefix}.qzeros": pack_gptq_qzeros(zeros, r.bits),  # v1 stores z - 1
        f"{prefix}.scales": r.scales.T.to(torch.float16).contiguous(),
        f"{prefix}.g_idx": g_idx.contiguous(),
    }


def _module_regex(name: str) -> str:
    """A pattern matching a decoder module in transformers', GPTQModel's and vLLM's naming."""
    m = re.search(r"layers\.(\d+)\.(.+)$", name)
    if not m:
        return ".*" + re.escape(name) + ".*"
    return rf".*layers\.{m.group(1)}\.{re.escape(m.group(2))}.*"


def gptq_config(results: Mapping[str, object], linears: list[str], component_of) -> dict:
    """``quantization_config``: the most common scheme globally, ``dynamic`` overrides for the others."""
    schemes = Counter((r.bits, r.group_size) for r in results.values())
    static = all(r.args.get("static_groups", False) for r in results.values())  # informational (GPTQModel's meta)
    (bits, group), _ = schemes.most_common(1)[0]
    dynamic: dict[str, dict] = {"-:.*(visual|vision_tower|multi_modal_projector).*": {}, "-:.*lm_head.*": {}}
    for name in linears:
        if name not in results and component_of(name).value == "decoder":
            dynamic[f"-:{_module_regex(name)}"] = {}
    for name, r in results.items():
        if (r.bits, r.group_size) != (bits, group):
            dynamic[f"+:{_module_regex(name)}"] = {"bits": r.bits, "group_size": r.group_size}
    cfg = {"bits": bits, "group_size": group, "desc_act": False, "sym": True, "lm_head": False,
           "quant_method": "gptq", "method": "gptq", "format": "gptq", "checkpoint_format": "gptq",
           "pack_dtype": "int32", "true_sequential": True,
           "meta": {"quantizer": ["quantlab"], "static_groups": static, "true_sequential": True}}
    if len(dynamic) > 2 or any(k.startswith("+:") for k in dynamic):
        cfg["dynamic"] = dynamic
    return cfg


def write_gptq(loaded: LoadedModel, results: Mapping[str, object], out: Path,
               dtype: torch.dtype = torch.float16, *, weights=None) -> None:
    """Write a GPTQ v1 checkpoint (tensors, config.json + quantize_config.json, processor).

    ``weights``: for a streamed model, where its meta-device tensors are read from (``load_streaming``).
    """
    for name, r in results.items():
        check_result(name, r)
    linears = [n for n, m in loaded.model.named_modules() if isinstance(m, nn.Linear)]
    qcfg = gptq_config(results, linears, loaded.adapter.component_of)
    # transformers 5's module names, as GPTQModel itself writes them: its loader checks ``qweight`` names
    # literally and rejects the hub-legacy layout; transformers 5 and vLLM accept both (docs/formats.md#loader-quirks).
    def tensors():
        yield from dense_tensors(loaded, set(results), dtype, legacy_names=False, weights=weights, lazy=True,
                                 results=results)
        for name, r in results.items():
            yield from gptq_tensors(r, loaded.adapter.checkpoint_name(name)).items()

    write_model_dir(loaded, tensors(), qcfg, out, dtype)
    write_json(out / "quantize_config.json", qcfg)


FORMAT = ExportFormat(
    name="gptq", write=write_gptq, layout=layout, uniform_only=True, bits=GPTQ_BITS, loader_package="gptqmodel",
    load_snippet=("```python\n# pip install optimum gptqmodel\nfrom transformers import AutoModelForImageTextToText\n"
        "model = AutoModelForImageTextToText.from_pretrained(\"{repo}\", device_map=\"auto\")\n```\n\n"
        "Mixed-bit GPTQ (a `dynamic` section in the config) loads in GPTQModel and vLLM, not through optimum."),
)
