"""Memory measures: safetensors tensor bytes, the cost-model wrapper, run-time RSS, and fits() arithmetic."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from quantlab.eval.memory import (
    GIB,
    MemoryReport,
    disk_bytes,
    fits,
    measure_runtime,
    memory_report,
    predicted_bytes,
    safetensors_tensor_bytes,
)
from quantlab.models.load import get_adapter
from quantlab.plan.context import activation_bytes, kv_cache_bytes
from quantlab.plan.cost import model_size
from quantlab.toys.build import build_toy
from tests.conftest import tiny_llava


def test_disk_bytes_of_saved_model_is_sum_of_tensor_nbytes(tmp_path):
    model = tiny_llava()
    model.save_pretrained(tmp_path / "m")
    size = disk_bytes(tmp_path / "m")
    expected = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert size.tensor_bytes == expected and size.n_safetensors == 1
    files = [p for p in (tmp_path / "m").rglob("*") if p.is_file()]
    assert size.total_file_bytes == sum(p.stat().st_size for p in files) > size.safetensors_file_bytes > expected


def test_disk_bytes_mixed_dtypes_odd_shapes_and_shards(tmp_path):
    a = {"w": torch.zeros(3, 5, dtype=torch.float16), "b": torch.zeros(7, dtype=torch.int8)}
    b = {"c": torch.zeros(2, 3, 1, dtype=torch.bfloat16), "d": torch.zeros(1, dtype=torch.int64)}
    save_file(a, str(tmp_path / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    (tmp_path / "sub").mkdir()
    save_file(b, str(tmp_path / "sub" / "x.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    size = disk_bytes(tmp_path)
    assert size.tensor_bytes == 30 + 7 + 12 + 8 and size.n_safetensors == 2
    assert safetensors_tensor_bytes(tmp_path / "sub" / "x.safetensors") == 20
    assert size.total_file_bytes == size.safetensors_file_bytes + 2


def test_disk_bytes_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        disk_bytes(tmp_path / "nope")
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(ValueError, match="bad.safetensors"):
        disk_bytes(tmp_path)


def test_predicted_bytes_is_model_size_total():
    model = tiny_llava()
    adapter = get_adapter(model)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert predicted_bytes(model, adapter, {}, "fp") == params
    assert predicted_bytes(model, adapter, {}, "fp", dtype_bytes=2) == model_size(model, adapter, {}, "fp",
                                                                                   dtype_bytes=2).total_bytes


def test_fits_arithmetic_and_max_images():
    config = tiny_llava().config
    kv = kv_cache_bytes(config, images=2, text_tokens=40)
    act = activation_bytes(config, images=2, text_tokens=40)
    weights = GIB // 1024 - kv - act  # exactly 1 MiB in all
    f = fits(config, 1 / 1024, 2, 40, weights)
    assert f["fits"] and f["headroom_bytes"] == 0 and f["total_bytes"] == weights + kv + act
    assert (f["kv_cache_bytes"], f["activation_bytes"], f["budget_bytes"]) == (kv, act, GIB // 1024)
    assert not fits(config, 1 / 1024, 2, 40, weights + 1)["fits"]
    k = f["max_images"]
    assert k >= 2
    assert fits(config, 1 / 1024, k, 40, weights)["fits"] and not fits(config, 1 / 1024, k + 1, 40, weights)["fits"]
    assert fits(config, 1 / 1024, 0, 40, GIB)["max_images"] == -1
    with pytest.raises(ValueError):
        fits(config, 0, 1, 1, 1)


def test_memory_report_table_and_round_trip(tmp_path):
    model = tiny_llava()
    model.save_pretrained(tmp_path)
    r = memory_report("baseline", predicted=123 * 2**20, directory=tmp_path,
                      fits_result=fits(model.config, 1.0, 3, 64, 10**6))
    assert r.disk_tensor_bytes == disk_bytes(tmp_path).tensor_bytes and r.runtime_peak_bytes is None
    text = r.table()
    assert "memory: baseline" in text and "123.00 MiB" in text and "fits in 1 GiB with 3 image(s)" in text
    assert MemoryReport.from_dict(r.to_dict()) == r


@pytest.mark.slow
def test_runtime_rss_of_saved_toy(tmp_path):
    model, processor = build_toy("toy-llava")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    rt = measure_runtime(tmp_path, generate=True)
    assert 50 * 2**20 < rt.import_rss <= rt.loaded_rss <= rt.peak_rss < 8 * GIB
    # The child's own peak, not the parent's: Linux carries ru_maxrss across fork + exec, so a parent
    # holding a large tensor (as the pipeline holds whole models) used to show up as the child's peak.
    big = torch.ones(1536 * 2**20 // 4)  # 1.5 GiB alive in this process while the child runs
    again = measure_runtime(tmp_path, generate=True)
    assert big.numel() and again.peak_rss < 1.5 * GIB
    assert abs(again.peak_rss - rt.peak_rss) < 64 * 2**20, (rt, again)
    assert rt.device_peak is None  # nothing measured on a device unless one is asked for


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runtime_device_peak_on_cuda():
    rt = measure_runtime("toy-llava", device="cuda")
    assert rt.device_peak is not None and 4 * 2**20 < rt.device_peak < 2 * GIB  # fp32 weights are 8.8 MiB
