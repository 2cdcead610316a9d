"""A model streamed from its safetensors (blocks on the meta device) quantizes and exports like one in memory."""

from __future__ import annotations

import hashlib

import pytest
import torch

from quantlab.calib.weights import load_streaming
from quantlab.export.compressed_tensors import write_compressed_tensors
from quantlab.export.native import write_native
from quantlab.models import Component
from quantlab.quant.apply import quantize, saved_results
from quantlab.quant.results_io import (
    BlockResults,
    load_results,
    read_input_scales,
    save_results,
)
from quantlab.quant.scheme import QuantScheme
from tests.test_apply import _setup

PLAN = {"gptq": QuantScheme(backend="gptq", bits=4, group_size=32),
        "billm": QuantScheme(backend="billm", bits=1, group_size=32),
        # AWQ folds its scales into the norms: the streamed export reads those from the checkpoint and folds them
        "gptq-awq": QuantScheme(backend="gptq", bits=4, group_size=32, args={"awq": True}),
        "rtn-awq": QuantScheme(backend="rtn", bits=3, group_size=32, args={"awq": True})}


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("family, backend, writer, files", [
    ("llava", "gptq", write_compressed_tensors, ["model.safetensors.index.json", "model-00002-of-00006.safetensors"]),
    ("qwen2_5_vl", "billm", write_native, ["model.safetensors", "quantized.safetensors"]),
    ("llava", "gptq-awq", write_compressed_tensors, ["model.safetensors.index.json"]),
    ("qwen2_5_vl", "rtn-awq", write_compressed_tensors, ["model.safetensors.index.json"]),
])
def test_streamed_export_is_byte_identical(tmp_path, family, backend, writer, files, monkeypatch):
    """Streamed, each block's results saved and dropped, then read back by the export one block at a time;
    the shards (small here, so there are several) equal the in-memory export's byte for byte."""
    import quantlab.export.io as io

    monkeypatch.setattr(io, "SHARD_BYTES", 64 << 10)
    loaded, samples = _setup(family)
    loaded.model.save_pretrained(tmp_path / "ckpt")
    plan = {n: PLAN[backend] for n, _ in loaded.adapter.iter_linears(loaded.model, Component.DECODER)}
    lazy, weights = load_streaming(tmp_path / "ckpt", with_processor=False)
    blocks = tmp_path / "blocks"
    blocks.mkdir()
    streamed = quantize(lazy, plan, samples, weights=weights, progress=False,
                        save_block=lambda i, r: save_results(blocks / f"{i}.safetensors", r, with_dequantized=False),
                        reread_block=lambda i: load_results(blocks / f"{i}.safetensors", dequantized=False),
                        reread_scales=lambda i: read_input_scales(blocks / f"{i}.safetensors"))
    assert isinstance(streamed, BlockResults) and len(streamed) == len(plan)
    # every block saved: the results again, from disk, with no pass through the decoder
    again = saved_results(lazy, plan, lambda i: load_results(blocks / f"{i}.safetensors", dequantized=False))
    assert sorted(again) == sorted(streamed)
    assert all(torch.equal(again[n].codes, streamed[n].codes) and torch.equal(again[n].scales, streamed[n].scales)
               for n in plan)
    with pytest.raises(ValueError, match="meta device .* pass weights="):
        writer(lazy, streamed, tmp_path)
    for d in ("memory", "stream", "again"):
        (tmp_path / d).mkdir()
    writer(lazy, streamed, tmp_path / "stream", weights=weights)
    writer(lazy, again, tmp_path / "again", weights=weights)  # AWQ's scales read from whole blocks
    in_memory = quantize(loaded, plan, samples, progress=False)
    writer(loaded, in_memory, tmp_path / "memory")
    for name, r in streamed.items():  # no dense copy kept, but it is rebuilt bit for bit
        assert r.dequantized.numel() == 0 and torch.equal(r.dequantize(), in_memory[name].dequantized), name
    # config.json differs in provenance only (the in-memory model was built here, the streamed one read
    # from ckpt/: _name_or_path, sub-config dtypes); the tensors and the shard index must not
    written = sorted(f.name for f in (tmp_path / "memory").iterdir() if "safetensors" in f.name)
    assert written == sorted(f.name for f in (tmp_path / "stream").iterdir() if "safetensors" in f.name)
    assert set(files) <= set(written)
    for f in written:
        assert _sha(tmp_path / "stream" / f) == _sha(tmp_path / "memory" / f), f
        assert _sha(tmp_path / "again" / f) == _sha(tmp_path / "memory" / f), f
