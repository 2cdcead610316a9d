"""The streaming executor reproduces a full forward, block by block, on every family."""

from __future__ import annotations

import torch

from quantlab.calib.executor import CalibSample, decoder_logits, stream_decoder
from quantlab.models import get_adapter
from quantlab.models.load import LoadedModel
from tests.conftest import IMG, tiny_inputs


def _samples(family: str) -> list[CalibSample]:
    torch.manual_seed(1)
    full = tiny_inputs(family, batch=1)
    text_ids = torch.tensor([[1, 30, 31, 32, 33, 34]])
    text = {"input_ids": text_ids, "attention_mask": torch.ones_like(text_ids)}
    return [CalibSample("img", full, full["input_ids"][0] == IMG), CalibSample("txt", text, text_ids[0] == IMG)]


def test_stream_matches_full_forward_hidden_states(tiny_family):
    family, model = tiny_family
    loaded = LoadedModel(model, None, get_adapter(model), family)
    samples = _samples(family)
    seen: list[int] = []

    def stage(i, block, run):
        seen.append(i)
        return None

    with torch.no_grad():
        refs = []
        for s in samples:
            if hasattr(model.model, "rope_deltas"):
                model.model.rope_deltas = None
            refs.append(model(**s.inputs, output_hidden_states=True, use_cache=False))
    per_block: list[list[torch.Tensor]] = []

    def observe(i, block, run):
        outs = run()
        per_block.append(outs)
        return outs

    final = stream_decoder(loaded, samples, observe)
    n = model.config.text_config.num_hidden_layers
    assert len(per_block) == n
    for s, ref in enumerate(refs):
        # hidden_states[i + 1] is block i's output, except the last entry, which has the final norm applied
        for i in range(n - 1):
            torch.testing.assert_close(per_block[i][s], ref.hidden_states[i + 1], rtol=1e-5, atol=1e-5)
        logits = decoder_logits(loaded, [final[s]])[0]
        torch.testing.assert_close(logits, ref.logits, rtol=1e-5, atol=1e-5)
    stream_decoder(loaded, samples, stage)
    assert seen == list(range(n))


def test_stage_can_replace_weights_and_outputs_propagate(tiny_family):
    family, model = tiny_family
    loaded = LoadedModel(model, None, get_adapter(model), family)
    samples = _samples(family)
    base = stream_decoder(loaded, samples)

    def zero_mlp_of_block0(i, block, run):
        if i == 0:
            block.mlp.down_proj.weight.zero_()
        return None

    changed = stream_decoder(loaded, samples, zero_mlp_of_block0)
    assert not torch.allclose(base[0], changed[0])
    with torch.no_grad():
        if hasattr(model.model, "rope_deltas"):
            model.model.rope_deltas = None
        ref = model(**samples[0].inputs, use_cache=False).logits  # the model now holds the zeroed weight
    torch.testing.assert_close(decoder_logits(loaded, changed[:1])[0], ref, rtol=1e-5, atol=1e-5)


def test_streaming_from_disk_matches_in_memory(tiny_family, tmp_path):
    from quantlab.calib.weights import load_streaming

    family, model = tiny_family
    model.save_pretrained(tmp_path)
    loaded = LoadedModel(model, None, get_adapter(model), family)
    samples = _samples(family)
    ref = stream_decoder(loaded, samples)
    lazy, weights = load_streaming(tmp_path, with_processor=False)
    blocks = lazy.adapter.blocks(lazy.model)
    assert all(p.device.type == "meta" for p in blocks.parameters())
    materialised = []

    def check(i, block, run):
        materialised.append(sum(p.device.type != "meta" for p in blocks.parameters()))
        return None

    out = stream_decoder(lazy, samples, check, weights=weights)
    for a, b in zip(ref, out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    per_block = sum(1 for _ in blocks[0].parameters())
    assert materialised == [per_block] * len(blocks)  # exactly one block's parameters at a time
    assert all(p.device.type == "meta" for p in blocks.parameters())


def test_streaming_keeps_a_tied_head_one_tensor(tmp_path):
    from quantlab.calib.weights import load_streaming
    from tests.conftest import tiny_qwen2_5_vl

    model = tiny_qwen2_5_vl()
    model.config.tie_word_embeddings = model.config.text_config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    model.save_pretrained(tmp_path)
    lazy, weights = load_streaming(tmp_path, with_processor=False)
    assert lazy.model.lm_head.weight is lazy.model.get_input_embeddings().weight  # not a second copy
    samples = _samples("qwen2_5_vl")
    logits = decoder_logits(lazy, stream_decoder(lazy, samples, weights=weights))
    with torch.no_grad():
        for s, got in zip(samples, logits):
            model.model.rope_deltas = None
            torch.testing.assert_close(got, model(**s.inputs, use_cache=False).logits, rtol=1e-5, atol=1e-5)


def test_run_until_stops_each_pass_where_the_module_is_reached(tiny_family):
    """``run(until=[m])``: every sample's pass delivers m's input to the hooks registered before it, then
    stops; m itself and what follows do not run. A full ``run()`` afterwards is unaffected."""
    family, model = tiny_family
    loaded = LoadedModel(model, None, get_adapter(model), family)
    samples = _samples(family)
    seen = {"inputs": 0, "down_ran": 0, "o_ran": 0}
    outputs: dict[str, list] = {}

    def stage(i, block, run):
        if i == 0:
            outputs["full"] = run()
            pre = block.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("inputs", seen["inputs"] + 1))
            ran = block.mlp.down_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("down_ran", seen["down_ran"] + 1))
            o_ran = block.self_attn.o_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("o_ran", seen["o_ran"] + 1))
            outputs["until"] = run(until=[block.mlp.down_proj])
            pre.remove(), ran.remove(), o_ran.remove()
            outputs["again"] = run()
            return outputs["again"]
        return None

    stream_decoder(loaded, samples, stage)
    assert outputs["until"] == []
    assert seen == {"inputs": len(samples), "down_ran": 0, "o_ran": len(samples)}
    for a, b in zip(outputs["full"], outputs["again"]):
        assert torch.equal(a, b)
