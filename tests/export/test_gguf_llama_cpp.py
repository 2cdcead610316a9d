"""A GGUF export runs in llama.cpp (llama-cpp-python 0.3.36 with mtmd, its own venv): it loads the language
model with its mmproj, tokenizes prompts as the HF processor does, and answers shapes-VQA questions with
images as quantlab's own transformers evaluation of the same quantized weights does.

Tolerance: llama.cpp multiplies Q4_0/Q8_0 weights with activations rounded to 8 bits (its ``vec_dot``
kernels), runs the projector's GELU as its tanh approximation and resizes images its own way, so its
logits differ slightly from transformers'; greedy answers may differ where two tokens nearly tie. The test
allows 1% of the items (rounded up) to differ: the issue's target (>= 99% of 200 items) at CI size.

llama-cpp-python is built from its sdist with two one-line fixes to llama.cpp's mtmd (the ``patches`` of
the ``llama-cpp`` engine in quantlab/eval/engines.py, each naming what it tracks); without them LLaVA's CLIP
encoder and Qwen2.5-VL's window attention compute something else than transformers (docs/formats.md#gguf).
The environment is built once by quantlab's installer and cached; the test is skipped, with the reason,
when it cannot be built.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

N_ITEMS = int(os.environ.get("QUANTLAB_GGUF_ITEMS", "40"))
CHILD = Path(__file__).parents[2] / "quantlab" / "eval" / "engine_children" / "llama_cpp_child.py"


def llama_cpp_python() -> Path:
    """The llama-cpp engine's Python, built by quantlab's own installer (``quantlab engines --install llama-cpp``:
    llama-cpp-python from its sdist with the patches the engine lists, cached); skipped with the reason when it
    cannot be built."""
    from quantlab.eval.engines import engine_python, install_engine

    try:
        install_engine("llama-cpp", log=lambda _m: None)
        return Path(engine_python("llama-cpp"))
    except Exception as err:  # noqa: BLE001 - no network, no compiler: the reason is the skip message
        pytest.skip(f"cannot build the llama-cpp engine environment: {err}")


# the placeholder each family's chat template puts where the image goes (quantlab.models.inputs.prompt_text)
IMAGE_TOKENS = {"llava": "<image>", "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>"}


def _export(toy: str, bits: int, out: Path, vision_bits: int | None = None):
    """Quantize a toy with a uniform GPTQ W``bits`` g32 plan (and its vision tower + projector at GPTQ
    W``vision_bits`` g32, into the mmproj) and write it as GGUF; returns the loaded model."""
    from quantlab.calib.data import CalibDataOptions, build_calibration_set
    from quantlab.export.gguf import write_gguf
    from quantlab.models import Component, load_model
    from quantlab.quant.apply import quantize
    from quantlab.quant.scheme import QuantScheme

    torch.manual_seed(0)
    loaded = load_model(toy)
    samples = build_calibration_set(loaded, CalibDataOptions(num_samples=8, alpha=0.5)).samples
    scheme = QuantScheme(backend="gptq", bits=bits, group_size=32)
    plan = {n: scheme for n, _ in loaded.adapter.iter_linears(loaded.model, Component.DECODER)}
    if vision_bits is not None:  # widths GGUF's 32-column blocks cannot hold stay F16, as the plan's fallback does
        from quantlab.plan.fit import fit_scheme

        vision = QuantScheme(backend="gptq", bits=vision_bits, group_size=32)
        fitted = {n: fit_scheme(m.out_features, m.in_features, vision, "gguf", "smaller_group").scheme
                  for c in (Component.VISION, Component.PROJECTOR) for n, m in loaded.adapter.iter_linears(loaded.model, c)}
        plan.update({n: s for n, s in fitted.items() if s is not None})
    results = quantize(loaded, plan, samples, progress=False)
    out.mkdir(parents=True, exist_ok=True)
    write_gguf(loaded, results, out)
    return loaded


def run_llama_cpp(py: Path, model_dir: Path, requests: list[dict], tmp: Path) -> tuple[list[dict], float]:
    """The child's answers (with the prompt's token ids) and its wall time."""
    req, ans = tmp / "requests.jsonl", tmp / "answers.jsonl"
    req.write_text("".join(json.dumps(r) + "\n" for r in requests))
    t0 = time.time()
    proc = subprocess.run([str(py), str(CHILD), "--model", str(model_dir), "--requests", str(req), "--out", str(ans),
                           "--options", json.dumps({"prompt_ids": True})],
                          check=False, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in ans.read_text().splitlines()], time.time() - t0


def compare(toy: str, bits: int, n: int, tmp: Path, py: Path, vision_bits: int | None = None) -> dict:
    """llama.cpp's and transformers' greedy answers on ``n`` seeded shapes-VQA items, and the prompts' ids."""
    from quantlab.eval.generate import generate_answers
    from quantlab.eval.tasks import format_prompt, get_task, seeded_subset, shapes_items
    from quantlab.models.inputs import prompt_text

    loaded = _export(toy, bits, tmp / "gguf", vision_bits)
    task = get_task("shapes-vqa")
    items = seeded_subset(shapes_items(1000), n, seed=0)
    prompts = [format_prompt(task, it) for it in items]
    images = [it.extra["render"]() for it in items]
    requests = []
    for i, (p, img) in enumerate(zip(prompts, images)):
        img.save(tmp / f"{i}.png")
        requests.append({"id": str(i), "prompt": prompt_text(loaded.processor, p, True), "image": str(tmp / f"{i}.png"),
                         "image_token": IMAGE_TOKENS[loaded.adapter.family], "max_new_tokens": 8})
    theirs, seconds = run_llama_cpp(py, tmp / "gguf", requests, tmp)
    t0 = time.time()
    ours = generate_answers(loaded, prompts, images, max_new_tokens=8)
    hf_seconds = time.time() - t0
    image_id = loaded.adapter.image_token_id(loaded.model.config)
    id_mismatch = []
    for r, a, img in zip(requests, theirs, images):
        hf = loaded.processor(images=[img], text=[r["prompt"]], return_tensors="pt")["input_ids"][0].tolist()
        cpp = [t for kind, v in a["prompt"] for t in (v if kind == "text" else [image_id] * v)]
        if hf != cpp:
            id_mismatch.append((r["id"], hf, cpp))
    differ = [(it.id, o, t["text"]) for it, o, t in zip(items, ours, theirs) if o != t["text"]]
    gold = sum(o == it.answers[0] for it, o in zip(items, ours)) / n
    return {"toy": toy, "bits": bits, "n": n, "differ": differ, "id_mismatch": id_mismatch, "hf_accuracy": gold,
            "cpp_accuracy": sum(t["text"] == it.answers[0] for it, t in zip(items, theirs)) / n,
            "llama_cpp_seconds": seconds, "transformers_seconds": hf_seconds}


@pytest.mark.slow
@pytest.mark.parametrize(("toy", "bits"), [("toy-llava", 4), ("toy-llava", 8), ("toy-qwen2.5-vl", 4),
                                           ("toy-qwen2.5-vl", 8)])
def test_llama_cpp_answers_as_quantlab_does(toy, bits, tmp_path):
    py = llama_cpp_python()
    r = compare(toy, bits, N_ITEMS, tmp_path, py)
    print(json.dumps({k: v for k, v in r.items() if k != "id_mismatch"}))
    assert not r["id_mismatch"], f"llama.cpp tokenizes {len(r['id_mismatch'])} prompts differently: {r['id_mismatch'][0]}"
    assert len(r["differ"]) <= math.ceil(0.01 * r["n"]), r["differ"]


@pytest.mark.slow
@pytest.mark.parametrize(("toy", "vision_bits"), [("toy-llava", 4), ("toy-qwen2.5-vl", 8)])  # Q4_0 and Q8_0, both families
def test_llama_cpp_runs_a_quantized_vision_tower_from_the_mmproj(toy, vision_bits, tmp_path):
    """The vision tower and projector at GPTQ W8/W4 g32 go into mmproj.gguf as Q8_0/Q4_0 (quantlab's codes bit for
    bit), and llama.cpp's mtmd answers with them as quantlab does."""
    import gguf

    py = llama_cpp_python()
    r = compare(toy, 4, N_ITEMS, tmp_path, py, vision_bits=vision_bits)
    print(json.dumps({k: v for k, v in r.items() if k != "id_mismatch"}))
    reader = gguf.GGUFReader(str(tmp_path / "gguf" / "mmproj.gguf"))
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    want = "Q8_0" if vision_bits == 8 else "Q4_0"
    quantized = [n for n, k in kinds.items() if k == want]
    assert any(n.startswith("v.blk.0.") for n in quantized) and any(n.startswith("mm.") for n in quantized), kinds
    assert not r["id_mismatch"]
    assert len(r["differ"]) <= math.ceil(0.01 * r["n"]), r["differ"]


@pytest.mark.slow
def test_eval_engine_llama_cpp_scores_the_export_as_transformers_does(tmp_path):
    """``quantlab eval DIR --engine llama-cpp``: the runner's scores through llama.cpp equal transformers' on the
    same quantized weights (the processor saved beside the GGUF files templates the prompts)."""
    from quantlab.eval.engines import open_engine
    from quantlab.eval.runner import evaluate

    py = llama_cpp_python()
    loaded = _export("toy-llava", 4, tmp_path / "gguf")
    theirs = evaluate(open_engine("llama-cpp", tmp_path / "gguf", python=py), ["shapes-vqa"], data_dir=None,
                      limit=N_ITEMS, max_new_tokens=8).tasks["shapes-vqa"]
    ours = evaluate(loaded, ["shapes-vqa"], data_dir=None, limit=N_ITEMS, max_new_tokens=8).tasks["shapes-vqa"]
    assert theirs.n_failed == 0 and theirs.n == ours.n == N_ITEMS
    differ = [k for k in ours.item_scores if ours.item_scores[k] != theirs.item_scores[k]]
    assert len(differ) <= math.ceil(0.01 * N_ITEMS), differ


if __name__ == "__main__":  # build the venv: python tests/export/test_gguf_llama_cpp.py [TOY BITS N]
    t0 = time.time()
    python = llama_cpp_python()
    print(python, f"{time.time() - t0:.0f} s")
    if len(sys.argv) == 4:
        with tempfile.TemporaryDirectory() as d:
            result = compare(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(d), python)
        print(json.dumps(result | {"id_mismatch": result["id_mismatch"][:2]}, indent=1))
