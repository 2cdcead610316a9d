"""A GPTQ export loads in transformers + optimum + gptqmodel 7.6.0 (isolated venv) and matches our logits.

gptqmodel 7.6.0 pins numpy 2.2.6 and 7.7.0 needs CUDA torch 2.14.1 (shared/reference/environment.md §3),
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

from quantlab.apply import quantize
from quantlab.export.gptq import write_gptq
from quantlab.export.io import write_dir_atomic
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
        return py
    try:
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, capture_output=True, timeout=120)
        pip = [str(py), "-m", "pip", "install", "-q"]
        subprocess.run(pip + ["torch==2.13.0"], check=True, capture_output=True, timeout=900)
        subprocess.run(pip + ["gptqmodel==7.6.0", "optimum", "transformers>=5.23,<5.25"], check=True,
                       capture_output=True, timeout=1800)
    except (subprocess.SubprocessError, OSError) as err:
        pytest.skip(f"cannot build the gptqmodel venv at {VENV}: {err}")
    return py


@pytest.mark.slow
def test_uniform_gptq_export_loads_in_gptqmodel(tmp_path):
    py = _venv_python()
    loaded, samples = _setup("llava")
    plan = _plan(loaded, QuantScheme(backend="gptq", bits=4, group_size=32))
    results = quantize(loaded, plan, samples, progress=False)
    out = write_dir_atomic(tmp_path / "gptq", lambda d: write_gptq(loaded, results, d))
    from safetensors.torch import load_file, save_file

    inputs = samples[0].inputs
    save_file(inputs, str(tmp_path / "in.safetensors"))
    (tmp_path / "child.py").write_text(CHILD)
    proc = subprocess.run([str(py), str(tmp_path / "child.py"), str(out), str(tmp_path / "in.safetensors"),
                           str(tmp_path / "out.safetensors")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "KERNELS" in proc.stdout and "[]" not in proc.stdout.split("KERNELS", 1)[1].splitlines()[0]
    theirs = load_file(str(tmp_path / "out.safetensors"))["logits"]
    with torch.no_grad():
        ours = loaded.model.half()(**inputs).logits.float()
    torch.testing.assert_close(theirs, ours, rtol=0, atol=2e-2)  # fp16 kernels vs fp16 dequantized matmul
