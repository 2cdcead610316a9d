"""The engine registry and its errors: unknown or missing engines fail before any work, naming the remedy.

The engines themselves are exercised in tests/eval/test_vllm_engine.py and tests/export/test_gguf_llama_cpp.py
(slow: each starts an engine in its own environment).
"""

from __future__ import annotations

import sys

import pytest
from PIL import Image
from typer.testing import CliRunner

from quantlab.cli import app
from quantlab.eval.engines import ENGINES, ChildEngine, Engine, EngineRefused
from quantlab.eval.runner import evaluate

runner = CliRunner()


@pytest.fixture
def no_engines(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLAB_ENGINES_DIR", str(tmp_path / "engines"))
    for name in ENGINES.names():
        monkeypatch.delenv(f"QUANTLAB_{name.upper().replace('-', '_')}_PYTHON", raising=False)


def test_eval_refuses_an_unknown_engine_with_a_suggestion(no_engines):
    res = runner.invoke(app, ["eval", "toy-llava", "--engine", "vlm"])
    assert res.exit_code == 2
    text = " ".join(res.output.split())  # rich wraps long lines
    assert "unknown engine 'vlm'" in text and "did you mean 'vllm'" in text


def test_recipe_naming_a_missing_engine_fails_before_any_work(no_engines, tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["quantize", "toy-llava", "--recipe", "w4a16", "--out", str(out),
                              "--set", "eval.engine=vllm"])
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert "eval.engine: engine 'vllm' is not installed" in text and "quantlab engines --install vllm" in text
    assert not out.exists()


# A fake engine child following the protocol (engine_children/vllm_child.py): answers "red" for prompts
# with an image and "no" otherwise, or refuses when told to.
FAKE_CHILD = """
import argparse, json, sys
p = argparse.ArgumentParser()
for a in ("--model", "--requests", "--out", "--options"):
    p.add_argument(a)
args = p.parse_args()
if json.loads(args.options).get("refuse"):
    print("ENGINE-REFUSED: ValueError: no kernel for this", file=sys.stderr)
    sys.exit(3)
with open(args.requests) as f, open(args.out, "w") as g:
    for line in f:
        r = json.loads(line)
        assert "<image>" in r["prompt"] if r["image"] else "<image>" not in r["prompt"]
        g.write(json.dumps({"id": r["id"], "text": "red" if r["image"] else "no", "logprob": -0.5}) + "\\n")
"""


def test_child_engine_protocol_scores_through_the_runner(tmp_path, monkeypatch, request):
    from quantlab.eval import engines
    from quantlab.models.load import ASSETS
    from quantlab.models.processors import load_processor

    (tmp_path / "fake_child.py").write_text(FAKE_CHILD)
    monkeypatch.setattr(engines, "CHILDREN", tmp_path)
    ENGINES.register(Engine(name="fake", description="test double", child="fake_child.py"))
    request.addfinalizer(lambda: ENGINES.remove("fake"))
    proc = load_processor(ASSETS / "toy-llava")
    eng = ChildEngine(engine="fake", model_dir=ASSETS / "toy-llava", processor=proc, python=sys.executable)
    report = evaluate(eng, ["shapes-vqa"], data_dir=None, limit=20)
    task = report.tasks["shapes-vqa"]
    assert task.n == 20 and task.n_failed == 0 and all(e.prediction == "red" for e in task.examples)
    assert task.score == pytest.approx(sum(1 for k, v in task.item_scores.items() if v == 1.0) / 20)
    assert eng.logprobs == [-0.5] * 20
    assert report.model.endswith("(fake)")
    refusing = ChildEngine(engine="fake", model_dir=ASSETS / "toy-llava", processor=proc, python=sys.executable,
                           options={"refuse": True})
    with pytest.raises(EngineRefused, match="fake refused .*toy-llava: ValueError: no kernel for this"):
        refusing.answer(["what colour?"], [Image.new("RGB", (8, 8))], max_new_tokens=4)


def test_an_engine_that_cannot_serve_the_export_format_is_refused(tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["quantize", "toy-llava", "--recipe", "w4a16", "--out", str(out),
                              "--set", "eval.engine=llama-cpp"])
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert "eval.engine: llama-cpp serves export formats ['gguf']; export.format is 'compressed-tensors'" in text
    assert not out.exists()


# A fake session child (the ``--serve`` protocol of engine_children/vllm_child.py): one job per stdin line,
# one reply line per job; answers with its process id, writes plenty to stderr (as vLLM does, more than a
# pipe buffer holds), and refuses (then exits 3) when told to.
FAKE_SESSION_CHILD = """
import json, os, sys
assert sys.argv[1:] == ["--serve"]
for line in sys.stdin:
    job = json.loads(line)
    sys.stderr.write("engine log line\\n" * 20000)
    if job["options"].get("refuse"):
        print(json.dumps({"ok": False, "refused": "ValueError: no kernel for this"}), flush=True)
        sys.exit(3)
    with open(job["requests"]) as f, open(job["out"], "w") as g:
        for r in map(json.loads, f):
            g.write(json.dumps({"id": r["id"], "text": f"{os.getpid()} {job['model']}", "logprob": -0.5}) + "\\n")
    print(json.dumps({"ok": True}), flush=True)
"""


def test_a_session_answers_several_checkpoints_in_one_child_and_restarts_after_a_refusal(tmp_path, monkeypatch,
                                                                                           request):
    from quantlab.eval import engines
    from quantlab.eval.engines import EngineSession, open_engine
    from quantlab.models.load import ASSETS

    (tmp_path / "fake_session.py").write_text(FAKE_SESSION_CHILD)
    monkeypatch.setattr(engines, "CHILDREN", tmp_path)
    ENGINES.register(Engine(name="fake-session", description="test double", child="fake_session.py", sessions=True))
    request.addfinalizer(lambda: ENGINES.remove("fake-session"))
    img = Image.new("RGB", (8, 8))
    with EngineSession("fake-session", sys.executable) as session:
        answers = {toy: open_engine("fake-session", ASSETS / toy, session=session).answer(
            ["what colour?", "what shape?"], [img, img], max_new_tokens=4) for toy in ("toy-llava", "toy-qwen2.5-vl")}
        pids = {a.split()[0] for rows in answers.values() for a in rows}
        assert len(pids) == 1  # both checkpoints in one child
        assert all(a.endswith(str(ASSETS / toy)) for toy, rows in answers.items() for a in rows)
        refusing = open_engine("fake-session", ASSETS / "toy-llava", session=session, options={"refuse": True})
        with pytest.raises(EngineRefused, match="fake-session refused .*toy-llava: ValueError: no kernel for this"):
            refusing.answer(["what colour?"], [img], max_new_tokens=4)
        again = open_engine("fake-session", ASSETS / "toy-llava", session=session).answer(["what colour?"], [img],
                                                                                           max_new_tokens=4)
        assert again[0].split()[0] not in pids  # a fresh child after the refusal
    assert session._proc is None


def test_an_engine_without_a_session_mode_is_refused_a_session():
    from quantlab.core.errors import UserError
    from quantlab.eval.engines import EngineSession

    with pytest.raises(UserError, match="'llama-cpp' answers one checkpoint per process"):
        EngineSession("llama-cpp")
