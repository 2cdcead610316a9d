"""Native format: BiLLM and GPTQ layers round-trip bit-exactly; size on disk matches the cost model."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from quantlab.export.io import write_dir_atomic
from quantlab.export.native import load_native, read_native_results, write_native
from quantlab.plan.cost import linear_bytes
from quantlab.quant.apply import quantize
from quantlab.quant.scheme import QuantScheme
from tests.test_apply import _plan, _setup


def test_native_round_trip_and_logits(tmp_path):
    loaded, samples = _setup("llava")
    plan = _plan(loaded, QuantScheme(backend="gptq", bits=3, group_size=32))
    billm = QuantScheme(backend="billm", bits=1, group_size=64)
    plan.update({n: billm for n in plan if ".layers.0." in n})
    results = quantize(loaded, plan, samples, progress=False)
    write_dir_atomic(tmp_path / "m", lambda d: write_native(loaded, results, d))
    back = read_native_results(tmp_path / "m")
    for n, r in results.items():
        assert torch.equal(back[n].dequantized, r.dequantized), n
        assert torch.equal(back[n].codes, r.codes), n
    stored = load_file(str(tmp_path / "m" / "quantized.safetensors"))
    packed = sum(t.numel() * t.element_size() for t in stored.values())
    modules = dict(loaded.model.named_modules())
    predicted = sum(linear_bytes(modules[n].out_features, modules[n].in_features, plan[n], "native", bias=False)
                    for n in results)
    assert abs(packed - predicted) <= 0.01 * predicted, (packed, predicted)
    # the checkpoint stores non-quantized tensors in fp16: round the in-memory model's copies the same way
    with torch.no_grad():
        for n, p in loaded.model.named_parameters():
            if n.rpartition(".")[0] not in results:
                p.copy_(p.half().float())
    reloaded = load_native(tmp_path / "m")
    x = samples[0].inputs
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(**x).logits, loaded.model(**x).logits, rtol=0, atol=1e-6)
