"""quantlab: compress vision-language models to a memory budget, and measure what it cost.

The public verbs, one per stage (imported lazily so that ``import quantlab`` stays cheap):

    loaded = quantlab.load_model("toy-llava")                        # model + processor + adapter
    calib = quantlab.build_calibration_set(loaded, quantlab.CalibDataOptions(num_samples=64, alpha=0.5))
    stats = quantlab.calibrate(loaded, calib)                         # -> CalibrationStats (save/load)
    plan = quantlab.make_plan(loaded, stats, recipe.plan)             # -> Plan (plan.yaml)
    results = quantlab.quantize(loaded, plan.layers, calib.samples)   # fake-quant in place + packed results
    quantlab.quantize_weight(W, "gptq", bits=4, group_size=128, hessian=H)   # one tensor
    quantlab.export(loaded, results, plan, "out/model")                 # compressed-tensors / gptq / native
    report = quantlab.evaluate(loaded, ["shapes-vqa"], data_dir=None, limit=500)
    quantlab.run_all("toy-llava", "recipes/luq.yaml", "runs/demo")   # the whole pipeline
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "quantlab.models.load",
    "open_model": "quantlab.export.open",
    "load_streaming": "quantlab.calib.weights",
    "CalibDataOptions": "quantlab.calib.data",
    "build_calibration_set": "quantlab.calib.data",
    "make_sample": "quantlab.calib.data",
    "calibrate": "quantlab.calib.collect",
    "CalibrationStats": "quantlab.calib.artifact",
    "make_plan": "quantlab.plan.make",
    "Plan": "quantlab.plan.plan",
    "QuantScheme": "quantlab.quant.scheme",
    "quantize_weight": "quantlab.quant.api",
    "QuantResult": "quantlab.quant.result",
    "quantize": "quantlab.quant.apply",
    "load_native": "quantlab.export.native",
    "export": "quantlab.export.api",
    "evaluate": "quantlab.eval.runner",
    "Recipe": "quantlab.recipe",
    "run_all": "quantlab.pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'quantlab' has no attribute {name!r}")
