"""Every export format stores exactly the bytes the cost model predicts (its registered layout is the one
source of truth), and the format registry answers what the pipeline asks."""

from __future__ import annotations

import math

import pytest
import yaml
from safetensors import safe_open

from quantlab.export.formats import FORMATS, get_format
from quantlab.pipeline import run_all
from quantlab.quant.scheme import QuantScheme

ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "I32": 4, "I64": 8, "U8": 1, "I8": 1}


def stored_tensor_bytes(model_dir) -> int:
    total = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                s = st.get_slice(k)
                total += math.prod(s.get_shape()) * ITEMSIZE[s.get_dtype()]
    return total


@pytest.mark.parametrize(("recipe", "sets"), [
    ("w4a16", {}),                                                   # compressed-tensors
    ("w4a16", {"export.format": "gptq"}),                            # GPTQ v1
    ("luq", {"plan.k": 2, "plan.target_avg_bits": None}),            # native: BiLLM + GPTQ W4
    ("w4a16", {"export.format": "native", "plan.scheme": {"backend": "rtn", "bits": 3, "group_size": 64,
                                                          "sym": False}}),  # native, asymmetric zero points
])
def test_predicted_bytes_are_the_stored_bytes(tmp_path, recipe, sets):
    out = tmp_path / "run"
    run_all("toy-llava", recipe, out, overrides={"calibration.num_samples": 4, "eval.tasks": [], **sets},
            progress=False, say=lambda m: None, stop_after="export")
    plan = yaml.safe_load((out / "plan.yaml").read_text())
    assert stored_tensor_bytes(out / "model") == plan["total_predicted_bytes"], plan["format"]


@pytest.mark.parametrize("toy", ["toy-llava", "toy-qwen2.5-vl"])
def test_gguf_predicted_bytes_are_the_bytes_in_the_gguf_files(tmp_path, toy):
    from quantlab.eval.memory import gguf_tensor_bytes

    out = tmp_path / "run"
    run_all(toy, "w4a16", out, overrides={"calibration.num_samples": 4, "eval.tasks": [], "export.format": "gguf",
                                          "plan.scheme": {"backend": "gptq", "bits": 4, "group_size": 32}},
            progress=False, say=lambda m: None, stop_after="export")
    plan = yaml.safe_load((out / "plan.yaml").read_text())
    assert sum(map(gguf_tensor_bytes, (out / "model").glob("*.gguf"))) == plan["total_predicted_bytes"]


def test_the_registry_answers_what_the_pipeline_asks():
    assert set(FORMATS) == {"compressed-tensors", "gptq", "native", "gguf"}
    billm = QuantScheme(backend="billm", bits=1, group_size=128)
    w3 = QuantScheme(backend="rtn", bits=3, group_size=128)
    assert "not a uniform grid" in get_format("compressed-tensors").problem(billm)
    assert get_format("native").problem(billm) is None
    assert "stores bits in [2, 3, 4, 8]" in get_format("gptq").problem(w3.model_copy(update={"bits": 5}))
    assert get_format("gptq").loader_package == "gptqmodel"
    with pytest.raises(KeyError, match="did you mean 'gptq'"):
        get_format("gtpq")
