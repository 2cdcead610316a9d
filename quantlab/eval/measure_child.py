"""The measuring child of :func:`quantlab.eval.memory.measure_runtime`, run as its own process:

    python -m quantlab.eval.measure_child SRC GENERATE(0|1) DTYPE DEVICE

It loads the model as ``quantlab eval`` does (:func:`quantlab.export.open.open_model`), runs one generate
(or forward) on a tiny input, and prints one line ``QUANTLAB_RSS {json}`` with its RSS after the library
imports, after loading, at its peak, and the device's peak allocation on CUDA. Only the standard library is
imported at module level, so the "after imports" figure is torch + transformers, not the model.
"""

from __future__ import annotations

import json
import resource
import sys


def rss_peak() -> int:
    """This process's own peak RSS in bytes.

    Linux: ``VmHWM``. ``ru_maxrss`` would carry the parent's peak across fork + exec (the pipeline's parent
    holds whole models), so it is only the fallback.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def main(argv: list[str]) -> dict:
    src, generate, dtype, device = argv[0], argv[1] == "1", argv[2], argv[3]
    import torch
    import transformers  # noqa: F401 - counted in the "after imports" figure
    from PIL import Image

    import_rss = rss_peak()
    from quantlab.export.open import open_model
    from quantlab.models.inputs import build_inputs

    loaded = open_model(src, dtype=None if dtype == "auto" else getattr(torch, dtype))
    model, processor = loaded.model, loaded.processor
    loaded_rss = rss_peak()
    batch = build_inputs(processor, ["What color is the circle?"], [Image.new("RGB", (64, 64), (200, 30, 30))])
    on_gpu = device.startswith("cuda")
    if on_gpu:
        from accelerate.utils import send_to_device

        torch.cuda.reset_peak_memory_stats(device)
        model.to(device)
        batch = send_to_device(batch, device)
    with torch.no_grad():
        if generate:
            model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
        else:
            model(**batch)
    device_peak = torch.cuda.max_memory_allocated(device) if on_gpu else None
    return {"import_rss": import_rss, "loaded_rss": loaded_rss, "peak_rss": rss_peak(), "device_peak": device_peak}


if __name__ == "__main__":
    print("QUANTLAB_RSS " + json.dumps(main(sys.argv[1:])))
