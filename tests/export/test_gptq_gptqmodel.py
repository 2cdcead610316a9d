"""A GPTQ export loads in transformers + optimum + gptqmodel 7.6.0 (isolated venv) and matches our logits.

gptqmodel 7.6.0 pins numpy 2.2.6 and 7.7.0 needs CUDA torch 2.14.1 (docs/formats.md#loader-quirks),
so it lives in its own venv. The test is skipped, with the reason, when that venv cannot be built.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from quantlab.export.gptq import write_gptq
from quantlab.export.io import write_dir_atomic
from quantlab.quant.apply import quantize
from quantlab.quant.scheme import QuantScheme
from tests.test_apply import _plan, _setup

VENV = Path(os.environ.get("QUANTLAB_GPTQMODEL_VENV", "/tmp/quantlab-gptqmodel-venv"))
CHILD = textwrap.dedent("""
    import os, sys, torch
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], device_map="cpu", dtype=torch.float16).eval()
    kinds = sorted({type(m).__name__ for m in model.modules() if "QuantLinear" in type(m).__name__ or "Aten" in type(m).__name__})
    inputs = load_file(sys.argv[2])
    with torch.no_grad():
        logits = model(**inputs).logits.float()
    save_file({"logits": logits.contiguous()}, sys.argv[3])
    print("KERNELS", kinds)
""")


def _venv_python() -> Path:
    py = VENV / "bin" / "python"
    if py.is_file():
        probe = subprocess.run([str(py), "-c", "import gptqmodel, optimum"], capture_output=True, timeout=120)
        if probe.returncode != 0:
            pytest.skip(f"the gptqmodel venv at {VENV} is incomplete (delete it to rebuild): "
                        f"{probe.stderr.decode()[-300:]}")
        return py
    try:
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, capture_output=True, timeout=120)
        pip = [str(py), "-m", "pip", "install", "-q"]
        subprocess.run(pip + ["torch==2.13.0"], check=True, capture_output=True, timeout=300)
        subprocess.run(pip + ["gptqmodel==7.6.0", "optimum", "transformers>=5.23,<5.25"], check=True,
                       capture_output=True, timeout=600)
    except (subprocess.SubprocessError, OSError) as err:
        pytest.skip(f"cannot build the gptqmodel venv at {VENV}: {err}")
    return py


def _export_and_load(py: Path, child: str, loaded, plan, samples, tmp_path: Path):
    """Quantize by ``plan``, export GPTQ, run ``child`` in the gptqmodel venv on the first sample.

    Returns the child's stdout, its logits, and ours (the fp16 fake-quant model on the same inputs).
    """
    from safetensors.torch import load_file, save_file

    results = quantize(loaded, plan, samples, progress=False)
    out = write_dir_atomic(tmp_path / "gptq", lambda d: write_gptq(loaded, results, d))
    inputs = samples[0].inputs
    save_file(inputs, str(tmp_path / "in.safetensors"))
    (tmp_path / "child.py").write_text(child)
    proc = subprocess.run([str(py), str(tmp_path / "child.py"), str(out), str(tmp_path / "in.safetensors"),
                           str(tmp_path / "out.safetensors")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = load_file(str(tmp_path / "out.safetensors"))["logits"]
    with torch.no_grad():
        ours = loaded.model.half()(**inputs).logits.float()
    return proc.stdout, theirs, ours


@pytest.mark.slow
def test_uniform_gptq_export_loads_in_gptqmodel(tmp_path):
    py = _venv_python()
    loaded, samples = _setup("llava")
    plan = _plan(loaded, QuantScheme(backend="gptq", bits=4, group_size=32))
    stdout, theirs, ours = _export_and_load(py, CHILD, loaded, plan, samples, tmp_path)
    assert "KERNELS" in stdout and "[]" not in stdout.split("KERNELS", 1)[1].splitlines()[0]
    torch.testing.assert_close(theirs, ours, rtol=0, atol=2e-2)  # fp16 kernels vs fp16 dequantized matmul


DYNAMIC_CHILD = textwrap.dedent("""
    import json, os, sys, torch
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from safetensors.torch import load_file, save_file
    from gptqmodel import GPTQModel
    m = GPTQModel.load(sys.argv[1], device="cpu", dtype=torch.float16)
    bits = {n: int(mod.bits) for n, mod in m.model.named_modules() if hasattr(mod, "qweight")}
    with torch.no_grad():
        logits = m.model(**load_file(sys.argv[2])).logits.float()
    save_file({"logits": logits.contiguous()}, sys.argv[3])
    print("BITS", json.dumps(bits))
""")


@pytest.mark.slow
def test_mixed_gptq_export_loads_in_gptqmodel_with_dynamic_bits(tmp_path):
    """A mixed 4/8-bit plan on toy-qwen2.5-vl: GPTQModel's own loader honours the ``dynamic`` rules."""
    import json

    from quantlab.calib.data import CalibDataOptions, build_calibration_set
    from quantlab.models import Component, load_model
    from quantlab.models.load import ASSETS

    if not (ASSETS / "toy-qwen2.5-vl" / "model.safetensors").is_file():
        pytest.skip("toy-qwen2.5-vl is not built (make toys)")  # GPTQModel needs a real tokenizer
    py = _venv_python()
    loaded = load_model("toy-qwen2.5-vl")
    samples = build_calibration_set(loaded, CalibDataOptions(num_samples=8, alpha=0.5)).samples
    plan = {n: QuantScheme(backend="gptq", bits=8 if loaded.adapter.block_index(n) == 1 else 4, group_size=128)
            for n, _ in loaded.adapter.iter_linears(loaded.model, Component.DECODER)}
    stdout, theirs, ours = _export_and_load(py, DYNAMIC_CHILD, loaded, plan, samples, tmp_path)
    bits = json.loads(stdout.split("BITS", 1)[1].splitlines()[0])
    assert bits == {n: s.bits for n, s in plan.items()}
    # fp16 kernels (TorchAten) vs fp16 dequantized matmuls: logits up to ~12 agree within 0.1
    torch.testing.assert_close(theirs, ours, rtol=0, atol=0.1)
    # and the same next tokens, but where our top two logits are closer than the fp16 kernels' spread
    top2 = ours.topk(2, dim=-1).values
    differ = theirs.argmax(-1) != ours.argmax(-1)
    assert bool((top2[..., 0] - top2[..., 1])[differ].lt(0.2).all()), "a next token differs at no near-tie"
    assert int(differ.sum()) <= 1, f"{int(differ.sum())} of {differ.numel()} next tokens differ"
