"""Export to GGUF for llama.cpp: the language model and the vision encoder (``mmproj``), written with the
``gguf`` package (llama.cpp's own writer, ``gguf-py``).

    DIR/model.gguf     language model: hyperparameters, byte-level BPE vocabulary, chat template, tensors
    DIR/mmproj.gguf    vision encoder + projector (``clip`` architecture, read by llama.cpp's mtmd)

Per quantized Linear one tensor of the GGUF type its grid equals, bit for bit (``gguf_blocks``):
symmetric ``b ≤ 4`` bits -> Q4_0, symmetric ``b ≤ 8`` -> Q8_0 (groups of a multiple of 32 columns);
K-quant grids (``args["grid"]``, ``quantlab.quant.kquant``; bytes from ``kquant_ggml``) -> their own type.
Asymmetric grids are refused: Q4_1's fp16 offset ``m = −scale·z`` rounds for most groups. Every other
tensor is F16, and F32 where llama.cpp's converter writes F32 (1-D tensors, norms, biases, position
embeddings). Tensor names, keys and per-family rules: :mod:`quantlab.export.gguf_arch`;
``docs/formats.md#gguf``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from quantlab.export import gguf_blocks
from quantlab.export.gguf_arch import (
    GGUF_FAMILIES,
    PRE_TOKENIZERS,
    GGUFFamily,
    gguf_name,
    row_pieces,
)
from quantlab.export.io import model_tensors
from quantlab.export.spec import ExportFormat
from quantlab.models.adapter import ties_embeddings
from quantlab.models.load import LoadedModel
from quantlab.quant.layout import UINT8, Layout, TensorSpec
from quantlab.quant.registry import get_backend
from quantlab.quant.result import g_idx_is_trivial
from quantlab.quant.scheme import QuantScheme

T = gguf.GGMLQuantizationType
MODEL_FILE, MMPROJ_FILE = "model.gguf", "mmproj.gguf"
ASYM_REASON = ("asymmetric grids: Q4_1 stores m = -scale*z in fp16, which rounds unless scale*z fits fp16's "
               "11-bit significand (a 4-bit z needs up to 15 bits), so the export would change the weights; "
               "use sym=True")


def scheme_problem(backend: str, sym: bool, group_size: int, args: Mapping[str, Any]) -> str | None:
    """Why no GGUF type holds this grid on any Linear (None: one does); checked when the plan is made."""
    if args.get("grid"):
        return None if str(args["grid"]).upper() in T.__members__ else f"grid {args['grid']!r} is not a ggml type"
    if not get_backend(backend).uniform_grid:
        return f"{backend} codes are not a uniform grid; no GGUF type holds them (use native)"
    if not sym:
        return ASYM_REASON
    if args.get("act_order") and not args.get("static_groups"):
        return "act-order without static_groups: a column's group (g_idx) is not its 32-column block"
    if group_size != -1 and group_size % gguf_blocks.BLOCK:
        return f"group_size {group_size}: GGUF blocks hold {gguf_blocks.BLOCK} columns; use a multiple of 32"
    return None


def storage_type(backend: str, bits: int, sym: bool, group_size: int, args: Mapping[str, Any], in_f: int) -> T:
    """The GGUF type that holds this grid on a Linear with ``in_f`` inputs without loss.

    Raises:
        ValueError: the reason no GGUF type holds it.
    """
    why = scheme_problem(backend, sym, group_size, args)
    if why is not None:
        raise ValueError(why)
    if args.get("grid"):
        t = T[str(args["grid"]).upper()]
        block = gguf.GGML_QUANT_SIZES[t][0]
        if in_f % block:
            raise ValueError(f"{t.name} blocks hold {block} columns; in_features {in_f} is not a multiple")
        return t
    gguf_blocks.check_blocks(in_f, group_size)
    return T.Q4_0 if bits <= 4 else T.Q8_0


class GGUFFormat(ExportFormat):
    """The gguf format: refuses, when the plan is made, the grids no GGUF type holds (not only by shape)."""

    def problem(self, scheme: QuantScheme) -> str | None:
        return super().problem(scheme) or scheme_problem(scheme.backend, scheme.sym, scheme.group_size,
                                                         scheme.args)


def layout(out_f: int, in_f: int, scheme: QuantScheme, *, bias: bool, dtype_bytes: int) -> Layout:
    """The one GGUF tensor of a quantized Linear (``[out, in / block · type_size]`` bytes) and its F32 bias."""
    try:
        t = storage_type(scheme.backend, scheme.bits, scheme.sym, scheme.group_size, scheme.args, in_f)
    except ValueError as err:
        raise ValueError(f"gguf: Linear {out_f}x{in_f} (out x in), {scheme.label()}: {err}") from None
    block, type_size = gguf.GGML_QUANT_SIZES[t]
    lay = {"weight": TensorSpec((out_f, in_f // block * type_size), UINT8)}
    if bias:
        lay["bias"] = TensorSpec((out_f,), 4)  # 1-D tensors are F32 (convert_hf_to_gguf)
    return lay


def encode(name: str, r) -> tuple[T, np.ndarray]:
    """``(type, bytes [out, row bytes])`` of one result.

    Raises:
        ValueError: naming the module and why GGUF cannot hold it.
    """
    in_f = r.shape[1]
    try:
        t = storage_type(r.backend, r.bits, r.sym, r.group_size, r.args, in_f)
        if r.args.get("grid"):
            # K-quant grids bring their own encoder
            from quantlab.quant import kquant_ggml

            return T(kquant_ggml.ggml_type(r)), np.asarray(kquant_ggml.encode_blocks(r), dtype=np.uint8)
        if not g_idx_is_trivial(r.g_idx, in_f, r.group_size):
            raise ValueError("act-order g_idx: a column's group is not its 32-column block")
        scales = gguf_blocks.block_scales(r.scales.float().cpu().numpy(), in_f, r.group_size)
        codes = r.codes.cpu().numpy()
        return t, (gguf_blocks.q4_0 if t == T.Q4_0 else gguf_blocks.q8_0)(codes, scales, r.bits)
    except ValueError as err:
        raise ValueError(f"gguf export: {name}: {err}") from None


def family_of(loaded: LoadedModel) -> GGUFFamily:
    """The family's GGUF description; refuses families and configurations llama.cpp would run differently."""
    fam = GGUF_FAMILIES.get(loaded.adapter.family)
    if fam is None:
        raise ValueError(f"gguf export: no GGUF description for family {loaded.adapter.family!r} "
                         f"(quantlab/export/gguf_arch.py has {sorted(GGUF_FAMILIES)})")
    why = fam.refuse(loaded.model.config)
    if why is not None:
        raise ValueError(f"gguf export: {fam.family}: {why}")
    return fam


def dense_type(gname: str, ndim: int) -> type:
    """F16, or F32 where llama.cpp's converter writes F32 (``prepare_tensors``, ``tensor_force_quant``)."""
    if ".patch_embd." in gname:
        return np.float16
    f32 = (ndim <= 1 or gname.endswith("_norm.weight") or not gname.endswith(".weight")
           or ".position_embd." in gname)
    return np.float32 if f32 else np.float16


def _add_keys(w: gguf.GGUFWriter, keys: Mapping[str, Any]) -> None:
    for key, value in keys.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, list(value))


def text_keys(w: gguf.GGUFWriter, config) -> None:
    """The language model's hyperparameters (``conversion/base.py`` ``TextModel.set_gguf_parameters``)."""
    t = config.get_text_config()
    rope = dict(getattr(t, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"gguf export: rope_type {rope['rope_type']!r} is not written by quantlab's gguf exporter")
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    w.add_block_count(t.num_hidden_layers)
    w.add_context_length(t.max_position_embeddings)
    w.add_embedding_length(t.hidden_size)
    w.add_feed_forward_length(t.intermediate_size)
    w.add_head_count(t.num_attention_heads)
    w.add_head_count_kv(t.num_key_value_heads)
    w.add_layer_norm_rms_eps(t.rms_norm_eps)
    w.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_vocab_size(t.vocab_size)
    if "mrope_section" in rope:
        w.add_rope_dimension_sections((list(rope["mrope_section"]) + [0, 0, 0, 0])[:4])


def vocab_keys(w: gguf.GGUFWriter, processor, fam: GGUFFamily, vocab_size: int) -> None:
    """Byte-level BPE vocabulary as llama.cpp's converter writes it (``_set_vocab_gpt2``): tokens, types
    (added special tokens CONTROL), merges, special ids, whether BOS/EOS are added (as the HF tokenizer
    does), the chat template."""
    tok = processor.tokenizer
    data = json.loads(tok.backend_tokenizer.to_str())
    model, pre = data["model"], data.get("pre_tokenizer") or {}
    want = PRE_TOKENIZERS[fam.pre_tokenizer]
    if model["type"] != "BPE" or data.get("normalizer") or any(pre.get(k) != v for k, v in want.items()):
        raise ValueError(f"gguf export: the tokenizer is not a byte-level BPE with the {fam.pre_tokenizer!r} "
                         f"pre-tokenizer ({model['type']}, normalizer {data.get('normalizer')}, pre_tokenizer "
                         f"{pre}); llama.cpp would split text differently")
    tokens, types = [f"[PAD{i}]" for i in range(vocab_size)], [gguf.TokenType.UNUSED] * vocab_size
    for text, i in model["vocab"].items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for a in data.get("added_tokens", []):
        tokens[a["id"]] = a["content"]
        types[a["id"]] = gguf.TokenType.CONTROL if a["special"] else gguf.TokenType.USER_DEFINED
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(fam.pre_tokenizer)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    plain, full = tok("a", add_special_tokens=False).input_ids, tok("a").input_ids
    bos, eos = tok.bos_token_id, tok.eos_token_id
    add_bos = bos is not None and full[:1] == [bos] and len(full) > len(plain)
    add_eos = eos is not None and full[-1:] == [eos] and len(full) > len(plain) + add_bos
    if full != [bos] * add_bos + plain + [eos] * add_eos:
        raise ValueError(f"gguf export: the tokenizer adds tokens other than BOS/EOS ({full} for {plain})")
    for value, add in ((bos, w.add_bos_token_id), (eos, w.add_eos_token_id), (tok.unk_token_id, w.add_unk_token_id),
                       (tok.pad_token_id, w.add_pad_token_id)):
        if value is not None:
            add(value)
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(add_eos)
    template = getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None)
    if template:
        w.add_chat_template(template)


def write_gguf(loaded: LoadedModel, results: Mapping[str, object], out: Path, *, weights=None) -> None:
    """Write ``model.gguf`` + ``mmproj.gguf`` (``weights``: a streamed model's source, see ``io.model_tensors``)."""
    fam = family_of(loaded)
    encoded = {name: encode(name, r) for name, r in results.items()}  # refuse before writing anything
    config, adapter = loaded.model.config, loaded.adapter
    text_cfg = config.get_text_config()
    if loaded.processor is None:
        raise ValueError("gguf export: no processor loaded; the GGUF needs its tokenizer and image settings")
    text = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[fam.text_arch])
    mm = gguf.GGUFWriter(None, "clip")
    maps = {text: gguf.get_tensor_name_map(fam.text_arch, text_cfg.num_hidden_layers),
            mm: gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, 128)}  # block ids up to 128, as the converter
    for w, kind in ((text, gguf.GGUFType.MODEL), (mm, gguf.GGUFType.MMPROJ)):
        w.add_type(kind)
        w.add_string(gguf.Keys.General.QUANTIZED_BY, "quantlab")
    text_keys(text, config)
    vocab_keys(text, loaded.processor, fam, text_cfg.vocab_size)
    mm.add_clip_projector_type(fam.projector)
    _add_keys(mm, fam.vision_keys(config, loaded.processor.image_processor))

    def put(legacy: str, rows: int, data, raw: T | None = None) -> None:
        w = mm if legacy.startswith(fam.vision) else text
        for src, idx in row_pieces(fam, legacy, rows, text_cfg):
            gname = gguf_name(fam, src, maps[w])
            if gname is None:
                continue
            piece = data if idx is None else data[idx.numpy()]
            if raw is None:
                piece = piece.astype(dense_type(gname, piece.ndim))
            w.add_tensor(gname, np.ascontiguousarray(piece), raw_dtype=raw)

    tied = ties_embeddings(loaded.model.config)
    skip = {f"{n}.weight" for n in results} | ({f"{adapter.lm_head}.weight"} if tied else set())
    for name, t in model_tensors(loaded, lambda n: n in skip, weights, results):
        legacy, data = adapter.legacy_name(name), t.detach().float().cpu().numpy()
        if legacy == fam.temporal_patch:  # Conv3d [out, in, 2, p, p] -> two Conv2d, one per frame
            for suffix, frame in ((".weight", 0), (".weight.1", 1)):
                mm.add_tensor("v.patch_embd" + suffix, np.ascontiguousarray(data[:, :, frame].astype(np.float16)))
            continue
        put(legacy, data.shape[0] if data.ndim else 1, data)
    for name, (t_type, data) in encoded.items():
        put(adapter.legacy_name(name) + ".weight", data.shape[0], data, t_type)
    for w, file in ((text, MODEL_FILE), (mm, MMPROJ_FILE)):
        w.write_header_to_file(path=out / file)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    # The processor beside the GGUF files: quantlab templates evaluation prompts with it (--engine llama-cpp).
    loaded.processor.save_pretrained(out)


def dense_element_bytes(legacy: str, ndim: int, dtype_bytes: int) -> int:
    """Bytes per element of an unquantized tensor in the GGUF files, by its hub-legacy name (the cost model's
    view of :func:`dense_type`): 0 for what a family drops, F32 for 1-D tensors and position embeddings,
    else F16."""
    if any(legacy in fam.drop for fam in GGUF_FAMILIES.values()):
        return 0
    return 4 if ndim <= 1 or "position_embedding" in legacy else 2


FORMAT = GGUFFormat(
    name="gguf", write=write_gguf, layout=layout, uniform_only=True, k_grids=True, in_process=False, vision=True,
    dense_element_bytes=dense_element_bytes,
    load_snippet=("```python\n# pip install llama-cpp-python (with mtmd: the multimodal library)\n"
                  "# llama-mtmd-cli -m {repo}/model.gguf --mmproj {repo}/mmproj.gguf --image IMAGE -p PROMPT\n```"),
)
