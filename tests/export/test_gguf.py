"""GGUF export: quantized tensors dequantize (with the ``gguf`` package) to quantlab's weights bit for bit,
every other tensor is the model's fp16 weight under llama.cpp's name, the cost model predicts each
quantized tensor's bytes, and what GGUF cannot hold is refused with the reason."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize

from quantlab.calib.data import CalibDataOptions, build_calibration_set
from quantlab.export import gguf_blocks
from quantlab.export.formats import get_format
from quantlab.export.gguf import encode, family_of, layout, write_gguf
from quantlab.models import Component, get_adapter, load_model
from quantlab.models.load import LoadedModel
from quantlab.plan.cost import linear_bytes
from quantlab.quant import quantize_weight
from quantlab.quant.apply import quantize
from quantlab.quant.scheme import QuantScheme
from quantlab.quant.steps import as_stored
from tests.conftest import TINY_BUILDERS

# quantlab module suffix -> llama.cpp tensor (llama-arch.cpp / gguf-py TENSOR_NAMES), written out here
# independently of the exporter's tables
TEXT = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down"}
DENSE = {  # GGUF file, GGUF name -> transformers 5 parameter
    "toy-llava": [("model", "token_embd.weight", "model.language_model.embed_tokens.weight"),
                  ("model", "output.weight", "lm_head.weight"),
                  ("model", "output_norm.weight", "model.language_model.norm.weight"),
                  ("model", "blk.3.ffn_norm.weight", "model.language_model.layers.3.post_attention_layernorm.weight"),
                  ("mmproj", "v.class_embd", "model.vision_tower.embeddings.class_embedding"),
                  ("mmproj", "v.patch_embd.weight", "model.vision_tower.embeddings.patch_embedding.weight"),
                  ("mmproj", "v.position_embd.weight", "model.vision_tower.embeddings.position_embedding.weight"),
                  ("mmproj", "v.pre_ln.weight", "model.vision_tower.pre_layrnorm.weight"),
                  ("mmproj", "v.blk.1.ffn_up.weight", "model.vision_tower.encoder.layers.1.mlp.fc1.weight"),
                  ("mmproj", "v.blk.1.ffn_down.bias", "model.vision_tower.encoder.layers.1.mlp.fc2.bias"),
                  ("mmproj", "v.blk.2.attn_q.weight", "model.vision_tower.encoder.layers.2.self_attn.q_proj.weight"),
                  ("mmproj", "mm.0.weight", "model.multi_modal_projector.linear_1.weight"),
                  ("mmproj", "mm.2.bias", "model.multi_modal_projector.linear_2.bias")],
    "toy-qwen2.5-vl": [("model", "token_embd.weight", "model.language_model.embed_tokens.weight"),
                       ("model", "output.weight", "lm_head.weight"),
                       ("model", "blk.0.attn_q.bias", "model.language_model.layers.0.self_attn.q_proj.bias"),
                       ("mmproj", "v.blk.0.ln1.weight", "model.visual.blocks.0.norm1.weight"),
                       ("mmproj", "v.blk.2.ffn_gate.weight", "model.visual.blocks.2.mlp.gate_proj.weight"),
                       ("mmproj", "v.post_ln.weight", "model.visual.merger.ln_q.weight"),
                       ("mmproj", "mm.0.weight", "model.visual.merger.mlp.0.weight"),
                       ("mmproj", "mm.2.bias", "model.visual.merger.mlp.2.bias")],
}


def _rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's rotary row order for Llama q/k (convert_hf_to_gguf ``LlamaModel.permute``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _as_torch(t) -> torch.Tensor:
    """A GGUF tensor as float32 in numpy's (row-major, ``[out, in]``) shape."""
    return torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))


@pytest.fixture(scope="module", params=["toy-llava", "toy-qwen2.5-vl"])
def exported(request, tmp_path_factory):
    """A toy quantized with GPTQ g32, W4 in even decoder blocks and W8 in odd ones, written as GGUF."""
    toy = request.param
    torch.manual_seed(0)
    loaded = load_model(toy)
    dense = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    samples = build_calibration_set(loaded, CalibDataOptions(num_samples=2, alpha=0.5)).samples
    plan = {n: QuantScheme(backend="gptq", bits=8 if loaded.adapter.block_index(n) % 2 else 4, group_size=32)
            for n, _ in loaded.adapter.iter_linears(loaded.model, Component.DECODER)}
    results = quantize(loaded, plan, samples, progress=False)
    out = tmp_path_factory.mktemp(toy)
    write_gguf(loaded, results, out)
    return toy, loaded, dense, plan, results, _tensors(out / "model.gguf"), _tensors(out / "mmproj.gguf"), out


def test_quantized_tensors_are_quantlabs_weights_bit_for_bit(exported):
    _, loaded, _, plan, results, text, _, _ = exported
    cfg = loaded.model.config.get_text_config()
    llama = loaded.adapter.family == "llava"
    for name, r in results.items():
        block, suffix = name.split(".layers.", 1)[1].split(".", 1)
        t = text[f"blk.{block}.{TEXT[suffix]}.weight"]
        assert t.tensor_type == (gguf.GGMLQuantizationType.Q4_0 if r.bits == 4 else gguf.GGMLQuantizationType.Q8_0)
        ours = r.dequantized.float()
        if llama and suffix in ("self_attn.q_proj", "self_attn.k_proj"):
            ours = _rope_rows(ours, cfg.num_attention_heads if "q_proj" in suffix else cfg.num_key_value_heads)
        assert torch.equal(_as_torch(t), ours), name
        assert t.n_bytes == linear_bytes(*r.shape, plan[name], "gguf", bias=False), name


def test_other_tensors_are_the_fp16_weights(exported):
    toy, _, dense, _, _, text, mmproj, _ = exported
    files = {"model": text, "mmproj": mmproj}
    for file, gname, hf in DENSE[toy]:
        t = files[file][gname]
        assert torch.equal(_as_torch(t).reshape(dense[hf].shape), dense[hf].half().float()), gname
        assert t.tensor_type == (gguf.GGMLQuantizationType.F32 if dense[hf].dim() <= 1 or "position" in gname
                                 else gguf.GGMLQuantizationType.F16), gname
    assert "v.post_ln.weight" not in mmproj or toy != "toy-llava"  # LLaVA reads CLIP's state before it
    if toy == "toy-qwen2.5-vl":  # Conv3d patch embedding -> two Conv2d, one per temporal frame
        conv = dense["model.visual.patch_embed.proj.weight"].half().float()
        assert torch.equal(_as_torch(mmproj["v.patch_embd.weight"]).reshape(conv[:, :, 0].shape), conv[:, :, 0])
        assert torch.equal(_as_torch(mmproj["v.patch_embd.weight.1"]).reshape(conv[:, :, 1].shape), conv[:, :, 1])
        qkv = dense["model.visual.blocks.1.attn.qkv.weight"].half().float()
        for i, p in enumerate("qkv"):  # fused [q; k; v] -> three tensors
            assert torch.equal(_as_torch(mmproj[f"v.blk.1.attn_{p}.weight"]), qkv.chunk(3)[i])


def test_vocabulary_and_keys_are_llama_cpps(exported):
    toy, loaded, *_, out = exported
    fields = {k: f.contents() for k, f in gguf.GGUFReader(out / "model.gguf").fields.items() if not k.startswith("GGUF")}
    mm = {k: f.contents() for k, f in gguf.GGUFReader(out / "mmproj.gguf").fields.items() if not k.startswith("GGUF")}
    tok, cfg = loaded.processor.tokenizer, loaded.model.config
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.tokens"][:len(tok)] == [tok.convert_ids_to_tokens(i) for i in range(len(tok))]
    assert len(fields["tokenizer.ggml.tokens"]) == cfg.get_text_config().vocab_size
    assert fields["tokenizer.ggml.add_bos_token"] is False  # the toys' tokenizers add no BOS (HF post-processor)
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert fields["tokenizer.chat_template"] == loaded.processor.chat_template
    if toy == "toy-llava":
        assert fields["general.architecture"] == "llama" and mm["clip.projector_type"] == "mlp"
        assert mm["clip.vision.feature_layer"] == [3] and mm["clip.use_gelu"] is False  # quick_gelu
    else:
        assert fields["general.architecture"] == "qwen2vl"
        assert fields["qwen2vl.rope.dimension_sections"] == [4, 6, 6, 0]
        assert mm["clip.projector_type"] == "qwen2.5vl_merger" and mm["clip.vision.n_wa_pattern"] == 3
        assert mm["clip.vision.window_size"] == 32


def test_layout_refuses_what_gguf_cannot_hold():
    fmt = get_format("gguf")
    w4 = QuantScheme(backend="gptq", bits=4, group_size=32)
    assert linear_bytes(128, 384, w4, "gguf", bias=False) == 128 * 384 // 32 * 18
    assert linear_bytes(128, 384, w4.model_copy(update={"bits": 8}), "gguf", bias=True) == 128 * 12 * 34 + 4 * 128
    assert linear_bytes(128, 256, w4.model_copy(update={"group_size": -1}), "gguf", bias=False) == 128 * 8 * 18
    with pytest.raises(ValueError, match=r"gguf: Linear 128x384.*asymmetric grids: Q4_1 stores m = -scale\*z in fp16"):
        layout(128, 384, w4.model_copy(update={"sym": False}), bias=False, dtype_bytes=2)
    with pytest.raises(ValueError, match=r"group_size 16: GGUF blocks hold 32 columns"):
        layout(128, 384, w4.model_copy(update={"group_size": 16}), bias=False, dtype_bytes=2)
    with pytest.raises(ValueError, match="in_features % 32 == 0"):
        layout(128, 228, w4.model_copy(update={"group_size": -1}), bias=False, dtype_bytes=2)
    with pytest.raises(ValueError, match="act-order without static_groups"):
        layout(128, 384, w4.model_copy(update={"args": {"act_order": True}}), bias=False, dtype_bytes=2)
    assert "not a uniform grid" in fmt.problem(QuantScheme(backend="billm", bits=1, group_size=128))
    # shape-independent refusals come before calibration (plan checks), not as a per-Linear shape fallback
    assert "asymmetric grids" in fmt.problem(w4.model_copy(update={"sym": False}))
    assert fmt.problem(w4) is None and fmt.problem(w4.model_copy(update={"bits": 8, "group_size": 128})) is None


@pytest.mark.parametrize(("grid", "bits", "group", "sym"), [("q4_k", 4, 32, False), ("q6_k", 6, 16, True)])
def test_k_quant_results_go_through_their_own_encoder(grid, bits, group, sym):
    torch.manual_seed(0)
    scheme = QuantScheme(backend="rtn", bits=bits, group_size=group, sym=sym, args={"grid": grid})
    r = quantize_weight(torch.randn(64, 512), scheme)
    t, data = encode("k", r)
    assert t == gguf.GGMLQuantizationType[grid.upper()]
    assert torch.equal(torch.from_numpy(np.array(dequantize(data, t))), r.dequantized.float())
    assert data.nbytes == linear_bytes(64, 512, scheme, "gguf", bias=False)
    assert get_format("gguf").problem(scheme) is None
    with pytest.raises(ValueError, match="Q4_K blocks hold 256 columns; in_features 384"):
        layout(128, 384, scheme.model_copy(update={"args": {"grid": "q4_k"}}), bias=False, dtype_bytes=2)


def test_a_result_gguf_cannot_hold_is_refused_naming_the_module():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    asym = as_stored(quantize_weight(w, QuantScheme(backend="rtn", bits=4, group_size=32, sym=False)))
    with pytest.raises(ValueError, match=r"gguf export: model.layers.0.mlp.up_proj: asymmetric grids"):
        encode("model.layers.0.mlp.up_proj", asym)
    g16 = as_stored(quantize_weight(w, QuantScheme(backend="rtn", bits=4, group_size=16)))
    with pytest.raises(ValueError, match=r"gguf export: blk: group_size 16: GGUF blocks hold 32 columns"):
        encode("blk", g16)
    tiny = TINY_BUILDERS["qwen2_vl"]()
    with pytest.raises(ValueError, match=r"no GGUF description for family 'qwen2_vl'"):
        family_of(LoadedModel(tiny, None, get_adapter(tiny), "tiny"))


def test_q4_1_is_lossless_only_where_its_fp16_offset_is_exact():
    """Why asymmetric grids are refused: on a toy layer most groups' ``-scale*z`` is not an fp16 number."""
    loaded = load_model("toy-llava")
    w = loaded.model.get_submodule("model.language_model.layers.0.mlp.up_proj").weight.data
    r = as_stored(quantize_weight(w, QuantScheme(backend="rtn", bits=4, group_size=32, sym=False)))
    scales, zeros = r.scales.numpy(), r.zeros.numpy()
    exact = gguf_blocks.q4_1_exact(scales, zeros)
    assert 0 < exact.mean() < 0.5  # measured: 0.40 on this layer, 0.39 over the decoder (RTN, g32)
    rows = np.flatnonzero(exact.all(axis=1))
    with pytest.raises(ValueError, match="Q4_1 would round m"):
        gguf_blocks.q4_1(r.codes.numpy(), scales, zeros)
    if len(rows):  # the rows whose every block is exact do come back bit for bit
        data = gguf_blocks.q4_1(r.codes.numpy()[rows], scales[rows], zeros[rows])
        back = dequantize(data, gguf.GGMLQuantizationType.Q4_1)
        assert torch.equal(torch.from_numpy(np.array(back)), r.dequantized[rows].float())
