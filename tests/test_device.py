"""The compute-device path: device-clean on the CPU (audited), identical results, clear errors, and CUDA.

Without a GPU, the audit stands in for one: the default device is set to ``meta`` and every torch call
is checked for arguments on different devices. A tensor that quantlab creates without naming a device
then lands on ``meta`` and meets the CPU activations or weights it is combined with, which is exactly
the mistake that breaks a CUDA run (a CPU tensor meeting CUDA activations).
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from quantlab.calib import executor
from quantlab.calib.collect import calibrate
from quantlab.calib.weights import load_streaming
from quantlab.core.device import resolve_device
from quantlab.models import Component
from quantlab.plan.sensitivity import measure_damage, units_of
from quantlab.quant.apply import quantize
from quantlab.quant.scheme import QuantScheme
from tests.test_apply import _setup

SCHEMES = {"q_proj": QuantScheme(backend="gptq", bits=3, group_size=32),
           "k_proj": QuantScheme(backend="gptq", bits=3, group_size=32),
           "v_proj": QuantScheme(backend="gptq", bits=3, group_size=32),
           "o_proj": QuantScheme(backend="gptq", bits=4, group_size=32, args={"act_order": True}),
           "gate_proj": QuantScheme(backend="billm", bits=1, group_size=32),
           "up_proj": QuantScheme(backend="billm", bits=1, group_size=32),
           "down_proj": QuantScheme(backend="rtn", bits=2, group_size=32)}


class MixedDevices(AssertionError):
    pass


class DeviceAudit(TorchFunctionMode):
    """Fails any torch call whose tensor arguments are on more than one device (0-d CPU scalars aside)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = tree_flatten((args, kwargs))[0]
        devices = {t.device for t in leaves if isinstance(t, torch.Tensor)
                   and not (t.dim() == 0 and t.device.type == "cpu")}
        if len(devices) > 1:
            raise MixedDevices(f"{getattr(func, '__name__', func)}: tensors on {sorted(map(str, devices))}")
        return func(*args, **kwargs)


def _plan(loaded):
    return {n: SCHEMES[n.rsplit(".", 1)[-1]] for n, _ in loaded.adapter.iter_linears(loaded.model, Component.DECODER)}


def _run(setup, device):
    loaded, samples = setup
    stats = calibrate(loaded, samples, hessians=True, progress=False, device=device, entropy_k=4)
    blocks: dict[int, list[str]] = {}
    for n, _ in loaded.adapter.iter_linears(loaded.model, Component.DECODER):
        blocks.setdefault(loaded.adapter.block_index(n), []).append(n)
    units = units_of(blocks, [("x",)])[:3]
    damage = measure_damage(loaded, samples, units, [SCHEMES["q_proj"], SCHEMES["gate_proj"]], stats.hessians,
                            progress=False, device=device)
    results = quantize(loaded, _plan(loaded), samples, progress=False, device=device)
    return stats, damage, results, loaded


def _assert_same(a, b):
    (sa, da, ra, la), (sb, db, rb, lb) = a, b
    assert json.dumps(sa.table(), sort_keys=True) == json.dumps(sb.table(), sort_keys=True)  # NaN-safe
    ta, tb = sa._tensors(), sb._tensors()  # every stored tensor: Hessians, per-channel statistics
    assert ta.keys() == tb.keys()
    for name, t in ta.items():
        assert tb[name].device.type == "cpu" and torch.equal(t, tb[name]), name
    assert da == db
    for name, r in ra.items():
        assert torch.equal(r.codes, rb[name].codes) and torch.equal(r.dequantized, rb[name].dequantized), name
    for (n, p), (_, q) in zip(la.model.named_parameters(), lb.model.named_parameters()):
        assert p.device.type == "cpu" and torch.equal(p, q), n


@pytest.fixture
def capture_on_host(monkeypatch):
    """The model's own forward up to block 0 (transformers code) runs on the host in a real run too; the
    audit is about what quantlab does with the blocks, their activations and the solvers."""
    real_capture = executor.capture_calls

    def on_host(*args, **kwargs):
        with torch.device("cpu"):
            return real_capture(*args, **kwargs)

    monkeypatch.setattr(executor, "capture_calls", on_host)


@contextmanager
def audited():
    torch.set_default_device("meta")
    try:
        with DeviceAudit():
            yield
    finally:
        torch.set_default_device(None)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_device_path_is_device_clean_and_identical(family, capture_on_host):
    reference = _run(_setup(family), None)
    setup = _setup(family)  # built before the audit: the model and samples are the user's, on the CPU
    with audited():
        result = _run(setup, "cpu")
    _assert_same(reference, result)
    for r in result[2].values():
        assert r.codes.device.type == "cpu" and r.dequantized.device.type == "cpu"


def test_streamed_weights_with_a_device_are_device_clean(tmp_path, capture_on_host):
    loaded, samples = _setup("llava")
    loaded.model.save_pretrained(tmp_path)
    plan = _plan(loaded)
    ref_stats = calibrate(loaded, samples, hessians=True, progress=False, entropy_k=4)
    ref = quantize(loaded, plan, samples, progress=False)
    lazy, weights = load_streaming(tmp_path, with_processor=False)
    with audited():
        stats = calibrate(lazy, samples, hessians=True, progress=False, entropy_k=4, weights=weights, device="cpu")
        results = quantize(lazy, plan, samples, progress=False, weights=weights, device="cpu")
    for name, h in ref_stats.hessians.items():
        assert torch.equal(stats.hessians[name], h), name
    for name, r in ref.items():
        assert torch.equal(results[name].codes, r.codes), name
    assert all(p.device.type == "meta" for p in lazy.adapter.blocks(lazy.model).parameters())


def test_audit_catches_a_tensor_created_on_the_default_device():
    with audited(), pytest.raises((MixedDevices, RuntimeError)):
        torch.ones(3, device="cpu") * torch.zeros(3)  # the second factor lands on meta


@pytest.mark.parametrize("value, message", [
    ("banana", "not a torch device"),
    ("mps", "cpu or cuda only"),
    pytest.param("cuda", "CUDA is not available", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_bad_device_is_refused_with_its_name(value, message):
    with pytest.raises(ValueError, match=message) as err:
        resolve_device(value)
    assert repr(value) in str(err.value)
    loaded, samples = _setup()
    with pytest.raises(ValueError, match=message):
        calibrate(loaded, samples, progress=False, device=value)


def test_no_device_means_where_the_weights_are():
    assert resolve_device(None) is None
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_cuda_matches_cpu(family):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    (sc, dc, rc, lc), (sg, dg, rg, lg) = _run(_setup(family), None), _run(_setup(family), "cuda")
    for name, h in sc.hessians.items():
        torch.testing.assert_close(sg.hessians[name], h, rtol=1e-4, atol=1e-5)
    for (unit, label), v in dc.items():
        assert dg[unit, label] == pytest.approx(v, rel=0.05, abs=1e-6)
    for name, r in rc.items():
        g = rg[name]
        assert g.codes.device.type == "cpu"
        # Accumulation order differs between devices, so a few codes on rounding boundaries may flip.
        assert (g.codes == r.codes).float().mean() > 0.98, name
        assert g.error == pytest.approx(r.error, rel=0.1, abs=1e-4), name
    for (n, p), (_, q) in zip(lc.model.named_parameters(), lg.model.named_parameters()):
        assert q.device.type == "cpu", n


@pytest.mark.parametrize("stored, device, flags, expected", [
    (torch.bfloat16, None, frozenset({"avx2", "fma"}), torch.float32),  # emulated bf16 matmuls: float32
    (torch.bfloat16, None, frozenset({"avx512_bf16"}), torch.bfloat16),
    (torch.bfloat16, None, frozenset({"amx_bf16"}), torch.bfloat16),
    (torch.float16, None, frozenset({"avx512_bf16"}), torch.float32),
    (torch.float16, "cpu", frozenset({"avx512_fp16"}), torch.float16),
    (torch.bfloat16, "cuda", frozenset(), torch.bfloat16),  # the accelerator has the instructions
    (torch.float32, None, frozenset(), torch.float32),
])
def test_compute_dtype_is_float32_where_the_cpu_emulates_16_bit(stored, device, flags, expected):
    from quantlab.core.device import compute_dtype

    assert compute_dtype(stored, device, flags) == expected


@pytest.mark.parametrize("flags, expected", [(frozenset({"avx2"}), torch.float32),
                                             (frozenset({"avx512_bf16"}), torch.bfloat16)])
def test_a_bf16_checkpoint_streams_in_the_compute_dtype(tmp_path, monkeypatch, flags, expected):
    """A bf16 checkpoint streamed on a CPU without bf16 computes in float32: its blocks are float32 copies,
    the embedding stays a bf16 view of the file whose lookups are cast, and the quantized results equal
    those of the same checkpoint loaded whole in float32 (computing in float32 on the stored bf16 values)."""
    from transformers import AutoModelForImageTextToText

    import quantlab.core.device as device_mod
    from quantlab.calib.weights import stream_model
    from quantlab.models.load import LoadedModel

    monkeypatch.setattr(device_mod, "cpu_flags", lambda: flags)
    loaded, samples = _setup("llava")
    loaded.model.to(torch.bfloat16).save_pretrained(tmp_path)
    lazy, weights = stream_model(tmp_path, with_processor=False)
    assert weights.dtype == expected and lazy.model.model.multi_modal_projector.linear_1.weight.dtype == expected
    embed = lazy.model.get_input_embeddings()
    dtypes = []
    embed.register_forward_hook(lambda m, a, o: dtypes.append((m.weight.dtype, o.dtype)))
    plan = _plan(loaded)
    results = quantize(lazy, plan, samples, progress=False, weights=weights)
    assert dtypes and set(dtypes) == {(torch.bfloat16, expected)}
    whole = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=expected).eval()
    ref = quantize(LoadedModel(whole, None, lazy.adapter, str(tmp_path)), plan, samples, progress=False)
    for name, r in ref.items():
        assert torch.equal(results[name].codes, r.codes), name
