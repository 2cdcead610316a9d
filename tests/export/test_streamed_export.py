"""A model streamed from its safetensors (blocks on the meta device) quantizes and exports like one in memory."""

from __future__ import annotations

import hashlib

import pytest
import torch

from quantlab.calib.weights import load_streaming
from quantlab.export.compressed_tensors import write_compressed_tensors
from quantlab.export.native import write_native
from quantlab.models import Component
from quantlab.quant.apply import quantize
from quantlab.quant.scheme import QuantScheme
from tests.test_apply import _setup

PLAN = {"gptq": QuantScheme(backend="gptq", bits=4, group_size=32),
        "billm": QuantScheme(backend="billm", bits=1, group_size=32)}


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("family, backend, writer, files", [
    ("llava", "gptq", write_compressed_tensors, ["model.safetensors"]),
    ("qwen2_5_vl", "billm", write_native, ["model.safetensors", "quantized.safetensors"]),
])
def test_streamed_export_is_byte_identical(tmp_path, family, backend, writer, files):
    loaded, samples = _setup(family)
    loaded.model.save_pretrained(tmp_path / "ckpt")
    plan = {n: PLAN[backend] for n, _ in loaded.adapter.iter_linears(loaded.model, Component.DECODER)}
    lazy, weights = load_streaming(tmp_path / "ckpt", with_processor=False)
    streamed = quantize(lazy, plan, samples, weights=weights, progress=False)
    with pytest.raises(ValueError, match="meta device .* pass weights="):
        writer(lazy, streamed, tmp_path)
    for d in ("memory", "stream"):
        (tmp_path / d).mkdir()
    writer(lazy, streamed, tmp_path / "stream", weights=weights)
    in_memory = quantize(loaded, plan, samples, progress=False)
    writer(loaded, in_memory, tmp_path / "memory")
    for name, r in streamed.items():  # no dense copy kept, but it is rebuilt bit for bit
        assert r.dequantized.numel() == 0 and torch.equal(r.dequantize(), in_memory[name].dequantized), name
    for f in files:
        assert _sha(tmp_path / "stream" / f) == _sha(tmp_path / "memory" / f), f
