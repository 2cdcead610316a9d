"""Bad input through the CLI, as a careless user would give it: every case exits with code 2 and a message
that names the culprit, shows no traceback, and leaves every file the user had exactly as it was.

Small and fast: the toys, a few calibration samples, no evaluation unless the case needs it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from quantlab.cli import app
from quantlab.models.load import ALIASES

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
FAST = ["--set", "calibration.num_samples=4", "--set", "stats.entropy_k=4", "--set", "eval.tasks=[]"]


def digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path -> sha256), to prove nothing changed."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def refused(res, *words: str) -> None:
    """Exit code 2, a message naming the culprit, no traceback."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output, res.output
    text = " ".join(res.output.split())  # rich wraps long lines, inside a long path too
    for w in words:
        assert w in text or "".join(w.split()) in "".join(text.split()), (w, res.output)


@pytest.fixture(scope="module")
def toy_copy(tmp_path_factory) -> Path:
    """A user's only copy of a checkpoint: the toy LLaVA in a directory of its own."""
    import shutil

    d = tmp_path_factory.mktemp("user") / "llava-checkpoint"
    shutil.copytree(ALIASES["toy-llava"], d)
    return d


@pytest.fixture(scope="module")
def w4_run(tmp_path_factory) -> Path:
    """A finished run (compressed-tensors W4) whose artifacts the hand-edit cases must not lose."""
    out = tmp_path_factory.mktemp("runs") / "w4"
    res = runner.invoke(app, ["quantize", "toy-llava", "--recipe", "w4a16", "--out", str(out), *FAST])
    assert res.exit_code == 0, res.output
    return out


# --- 1. --overwrite never deletes what is not quantlab's ---------------------------------------------------

@pytest.mark.parametrize("where", ["model", "inside-model", "above-model"])
def test_out_at_the_model_directory_is_refused(toy_copy, where):
    before = digest(toy_copy.parent)
    out = {"model": toy_copy, "inside-model": toy_copy / "run", "above-model": toy_copy.parent}[where]
    res = runner.invoke(app, ["quantize", str(toy_copy), "--recipe", "w4a16", "--out", str(out), "--overwrite", *FAST])
    refused(res, "--out", "model directory")
    assert digest(toy_copy.parent) == before


@pytest.mark.parametrize("command", ["quantize", "calibrate"])
def test_out_at_the_working_directory_is_refused(tmp_path, monkeypatch, command):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "sub").mkdir()
    before = digest(tmp_path)
    for cwd, out in ((tmp_path, "."), (tmp_path / "sub", "..")):
        monkeypatch.chdir(cwd)
        res = runner.invoke(app, [command, "toy-llava", "--recipe", "w4a16", "--out", out, "--overwrite", *FAST])
        refused(res, "working directory")
    assert digest(tmp_path) == before


@pytest.mark.parametrize("command", ["quantize", "calibrate"])
def test_overwrite_refuses_a_folder_of_unrelated_files(tmp_path, command):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"\xff\xd8 not really")
    (folder / "stats.safetensors").write_bytes(b"someone else's")
    before = digest(tmp_path)
    res = runner.invoke(app, [command, "toy-llava", "--recipe", "w4a16", "--out", str(folder), "--overwrite", *FAST])
    refused(res, str(folder), "quantlab")
    assert digest(tmp_path) == before


def test_overwrite_of_a_run_keeps_files_quantlab_did_not_write(w4_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(w4_run, run)
    (run / "my-notes.md").write_text("keep me")
    res = runner.invoke(app, ["quantize", "toy-llava", "--recipe", "w4a16", "--out", str(run), "--overwrite",
                              *FAST, "--set", "plan.scheme.bits=8"])
    assert res.exit_code == 0, res.output
    assert (run / "my-notes.md").read_text() == "keep me"
    assert yaml.safe_load((run / "plan.yaml").read_text())["layers"][
        "model.language_model.layers.0.mlp.down_proj"]["bits"] == 8


# --- 2. a checkpoint with a missing, unexpected or mis-shaped tensor ------------------------------------------

@pytest.mark.parametrize("damage", ["missing", "unexpected", "shape"])
def test_eval_refuses_a_damaged_export(w4_run, tmp_path, damage):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "model"
    shutil.copytree(w4_run / "model", broken)
    tensors = load_file(broken / "model.safetensors")
    name = next(k for k in tensors if k.endswith("layers.0.self_attn.q_proj.weight_packed"))
    if damage == "missing":
        del tensors[name]
    elif damage == "unexpected":
        tensors["language_model.model.layers.0.self_attn.extra.weight"] = torch.zeros(4)
    else:
        tensors[name] = tensors[name][:-1].contiguous()
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    res = runner.invoke(app, ["eval", str(broken), "--limit", "4"])
    refused(res, "do not match", {"missing": "missing: ", "unexpected": "extra.weight", "shape": "wrong shape"}[damage],
            "q_proj" if damage != "unexpected" else "self_attn")


def test_native_checkpoint_with_a_missing_tensor_is_refused(tmp_path):
    """The native format (BiLLM) checks its own tensors, named."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = tmp_path / "run"
    res = runner.invoke(app, ["quantize", "toy-llava", "--recipe", "luq", "--out", str(out), *FAST,
                              "--set", "plan.k=1", "--set", "plan.target_avg_bits=null"])
    assert res.exit_code == 0, res.output
    q = out / "model" / "quantized.safetensors"
    with safe_open(str(q), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    gone = next(k for k in tensors if k.endswith("|scales"))
    del tensors[gone]
    save_file(tensors, q, metadata=meta)
    res = runner.invoke(app, ["eval", str(out / "model"), "--limit", "4"])
    refused(res, "missing", gone)


# --- 3. a hand-edited plan is checked before anything is invalidated ----------------------------------------

@pytest.mark.parametrize("edit", ["bits", "module"])
def test_bad_hand_edit_of_the_plan_loses_nothing(w4_run, tmp_path, edit):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(w4_run, run)
    plan = yaml.safe_load((run / "plan.yaml").read_text())
    name = "model.language_model.layers.0.self_attn.q_proj"
    if edit == "bits":
        plan["layers"][name]["bits"] = 5
    else:
        plan["layers"]["model.language_model.layers.0.self_attn.qq_proj"] = plan["layers"].pop(name)
    (run / "plan.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))
    before = digest(run)
    res = runner.invoke(app, ["quantize", "toy-llava", "--recipe", "w4a16", "--out", str(run), *FAST])
    refused(res, "plan.yaml", "qq_proj" if edit == "module" else "takes bits in [2, 3, 4, 8], got 5")
    after = digest(run)
    assert {k: v for k, v in after.items() if k != "run.log"} == {k: v for k, v in before.items() if k != "run.log"}


def test_old_model_and_report_stay_until_the_new_model_is_complete(w4_run, tmp_path, monkeypatch):
    """A valid edit, then a failure in the export: the old export and its report are still there and agree;
    the rerun replaces both."""
    import shutil

    import quantlab.export.api as api

    run = tmp_path / "run"
    shutil.copytree(w4_run, run)
    old_model, old_report = digest(run / "model"), (run / "report.json").read_bytes()
    plan = yaml.safe_load((run / "plan.yaml").read_text())
    plan["layers"]["model.language_model.layers.0.self_attn.q_proj"]["bits"] = 8
    (run / "plan.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(api, "write_model_card", boom)  # fails inside the build, after the tensors were written
    res = runner.invoke(app, ["quantize", "toy-llava", "--recipe", "w4a16", "--out", str(run), *FAST])
    refused(res, "No space left on device")
    assert digest(run / "model") == old_model and (run / "report.json").read_bytes() == old_report
    assert (run / "quant" / "block_007.safetensors").is_file()  # the new blocks, complete
    monkeypatch.undo()
    res = runner.invoke(app, ["quantize", "toy-llava", "--recipe", "w4a16", "--out", str(run), *FAST])
    assert res.exit_code == 0, res.output
    assert digest(run / "model") != old_model
    assert not (run / "quant.previous").exists()
    report = json.loads((run / "report.json").read_text())
    assert report["memory"]["quantized"]["disk_file_bytes"] == sum(
        p.stat().st_size for p in (run / "model").rglob("*") if p.is_file())


# --- 4. one process per run directory ---------------------------------------------------------------------

def test_second_process_on_a_run_directory_is_refused(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from quantlab.pipeline.rundir import locked\n"
         f"with locked({str(out)!r}):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        res = runner.invoke(app, ["quantize", "toy-llava", "--recipe", "w4a16", "--out", str(out), *FAST])
        refused(res, "in use by another quantlab process", f"pid {holder.pid}")
        assert sorted(p.name for p in out.iterdir()) == [".quantlab.lock"]
    finally:
        holder.kill()
        holder.wait()


# --- 5. everything checkable is checked before the first sample ------------------------------------------

@pytest.mark.parametrize(("sets", "words"), [
    (["plan.scheme.bits=5"], ["plan.scheme", "takes bits in [2, 3, 4, 8], got 5"]),
    (["plan.scheme.group_size=100", "plan.shape_fallback=error"], ["group_size 100 does not divide in_features 128",
                                                                  "layers.{0-7}.self_attn.q_proj"]),
    (["eval.tasks=[shapes-vq]"], ["unknown task 'shapes-vq'", "did you mean 'shapes-vqa'"]),
    (["eval.tasks=[vqav2]"], ["eval.data_dir", "vqav2"]),
    (["export.format=gptq", "plan.scheme.backend=rtn", "plan.scheme.bits=5"], ["gptq stores bits in [2, 3, 4, 8]",
                                                                              "got 5"]),
    (["export.format=compressed-tensors", "plan.scheme.backend=billm", "plan.scheme.bits=1"],
     ["billm codes are not a uniform grid", "'compressed-tensors' cannot hold them"]),
    (["plan.scheme.backend=awq"], ["unknown backend 'awq'"]),
    (["plan.scheme.args={damp: 0.01, act_ordr: true}"], ["unknown option(s) ['act_ordr']"]),
    (["calibration.image_sources=[{kind: jsonl, path: /no/such.jsonl}]"], ["calibration.image_sources[0].path"]),
    (["plan.rules=[{match: 're:nothing.*', scheme: null}]"], ["plan.rules", "names no module"]),
])
def test_late_errors_come_before_any_work(tmp_path, sets, words):
    out = tmp_path / "run"
    args = [a for s in sets for a in ("--set", s)]
    res = runner.invoke(app, ["quantize", "toy-llava", "--recipe", "w4a16", "--out", str(out), *args])
    refused(res, *words)
    assert not out.exists()


def test_an_unreachable_bits_target_is_refused_before_any_work(tmp_path):
    """gguf-budget on a toy: K-quants need 256-wide rows, so only Q8_0 fits and 3.0 bits cannot be met."""
    out = tmp_path / "run"
    res = runner.invoke(app, ["quantize", "toy-llava", "--recipe", "gguf-budget", "--out", str(out)])
    refused(res, "plan.target_avg_bits: 3.0 is below the smallest stored bits", "8.500")
    assert not out.exists()


def test_an_empty_recipe_is_refused_before_any_work(tmp_path):
    recipe = tmp_path / "empty.yaml"
    recipe.write_text("")
    out = tmp_path / "run"
    res = runner.invoke(app, ["quantize", "toy-llava", "--recipe", str(recipe), "--out", str(out)])
    refused(res, "plan.low / plan.high", "the luq planner needs")
    assert not out.exists()


@pytest.mark.parametrize("repo", ["no-slash", "a/b/c", "org/bad name", "org/" + "x" * 120])
def test_malformed_push_to_hub_id_is_refused_before_any_work(tmp_path, repo):
    out = tmp_path / "run"
    res = runner.invoke(app, ["quantize", "toy-llava", "--recipe", "w4a16", "--out", str(out), *FAST,
                              "--push-to-hub", repo])
    refused(res, "--push-to-hub")
    assert not out.exists()


def test_stream_with_the_budget_planner_is_refused_before_calibration(tmp_path, toy_copy):
    out = tmp_path / "run"
    res = runner.invoke(app, ["quantize", str(toy_copy), "--recipe", "luq-budget", "--out", str(out), "--stream"])
    refused(res, "--stream", "budget")
    assert not out.exists()


def test_measured_candidates_with_a_measured_image_weight_are_refused_before_calibration(tmp_path):
    """The budget planner measures each candidate with the Hessian it is quantized with; ``measured`` is
    resolved per block only after planning, so a candidate cannot take it."""
    out = tmp_path / "run"
    res = runner.invoke(app, ["quantize", "toy-llava", "--recipe", "luq-budget", "--out", str(out), "--set",
                              "plan.candidates=[{backend: gptq, bits: 4, group_size: 32, args: {image_weight: measured}}]"])
    refused(res, "resolved per block only after planning", "gptq-w4-g32")
    assert not out.exists()


def test_a_kl_search_with_awq_is_refused_before_calibration(tmp_path):
    """luq's KL search measures whole mappings without AWQ's block-wise scale search (the budget planner's
    per-unit measurement runs it): an awq scheme there is refused."""
    out = tmp_path / "run"
    res = runner.invoke(app, ["quantize", "toy-llava", "--recipe", "luq", "--out", str(out), "--set",
                              "plan.search_max_kl=0.1", "--set",
                              "plan.low={backend: rtn, bits: 2, group_size: 64, args: {awq: true}}"])
    refused(res, "without AWQ's block-wise scale search", "rtn-w2-g64-awq")
    assert not out.exists()


@pytest.mark.parametrize(("args", "key"), [("{image_weight: measured}", "image_weight"),
                                           ("{token_weight: gradient}", "token_weight")])
def test_stream_with_a_measured_token_weighting_is_refused_before_calibration(tmp_path, toy_copy, args, key):
    """MBQ's ratio and the tokens' gradient saliency are measured with a backward pass through the whole
    model, which a streamed run does not hold."""
    out = tmp_path / "run"
    res = runner.invoke(app, ["quantize", str(toy_copy), "--recipe", "w4a16", "--out", str(out), "--stream",
                              "--set", f"plan.scheme.args={args}"])
    refused(res, key, "--stream")
    assert not out.exists()


def test_a_mistyped_model_leaves_nothing_that_refuses_the_corrected_command(tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["quantize", "toy-lava", "--recipe", "w4a16", "--out", str(out), *FAST])
    refused(res, "'toy-lava'", "did you mean 'toy-llava'")
    assert not out.exists()
    res = runner.invoke(app, ["quantize", "toy-llava", "--recipe", "w4a16", "--out", str(out), *FAST])
    assert res.exit_code == 0, res.output


def test_a_run_that_failed_before_any_stage_finished_takes_the_corrected_model(tmp_path, monkeypatch):
    import quantlab.pipeline.stages as stages

    out = tmp_path / "run"

    def boom(ctx):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(stages, "stage_calibrate", boom)
    res = runner.invoke(app, ["quantize", "toy-llava", "--recipe", "w4a16", "--out", str(out), *FAST])
    refused(res, "No space left on device", "run.log")
    monkeypatch.undo()
    res = runner.invoke(app, ["quantize", "toy-qwen2.5-vl", "--recipe", "w4a16", "--out", str(out), *FAST])
    assert res.exit_code == 0, res.output


# --- 6. a message, exit 2, the traceback in run.log (and on the console with --debug) ------------------------

def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantlab.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"}, timeout=300)


def test_user_errors_on_the_real_console(tmp_path):
    res = _cli("quantize", "toy-llava", "--recipe", "no-such-recipe.yaml", "--out", str(tmp_path / "r"), cwd=tmp_path)
    assert res.returncode == 2
    assert "Traceback" not in res.stdout + res.stderr
    assert "no-such-recipe.yaml" in res.stderr and "quantlab recipes" in res.stderr
    assert len(res.stderr.strip().splitlines()) <= 6, res.stderr
    res = _cli("quantize", "toy-llava", "--recipe", "no-such-recipe.yaml", "--out", str(tmp_path / "r"), "--debug",
               cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" in res.stderr


@pytest.mark.parametrize(("args", "words"), [
    (["--set", "plan.shceme.bits=4"], ["unknown key 'plan.shceme'", "valid keys here"]),
    (["--set", "plan.budget_gb=0.00001", "--set", "plan.planner=budget",
      "--set", "plan.candidates=[{backend: gptq, bits: 2, group_size: 64}]"], ["plan.budget_gb", "below the smallest size"]),
    (["--set", "calibration.num_samples"], ["--set 'calibration.num_samples'", "key=value"]),
])
def test_bad_keys_and_budgets_are_messages(tmp_path, args, words):
    out = tmp_path / "run"
    res = runner.invoke(app, ["quantize", "toy-llava", "--recipe", "w4a16", "--out", str(out), *args])
    refused(res, *words)
    assert not out.exists()


def test_an_offline_hub_id_is_a_message(tmp_path, monkeypatch):
    import quantlab.models.load as load

    monkeypatch.setattr(load, "_hub_reachable", lambda timeout=3.0: False)
    out = tmp_path / "run"
    res = runner.invoke(app, ["quantize", "someorg/some-vlm", "--recipe", "w4a16", "--out", str(out)])
    refused(res, "'someorg/some-vlm'", "not reachable", "local directory")
    assert not out.exists()


def test_a_failure_inside_a_run_puts_its_traceback_in_run_log(tmp_path, monkeypatch):
    import quantlab.pipeline.stages as stages

    out = tmp_path / "run"

    def boom(ctx, stats):
        raise RuntimeError("a bug in a planner")

    monkeypatch.setattr(stages, "stage_plan", boom)
    res = runner.invoke(app, ["quantize", "toy-llava", "--recipe", "w4a16", "--out", str(out), *FAST])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "internal error (RuntimeError)" in res.output and str(out / "run.log") in "".join(res.output.split())
    log = (out / "run.log").read_text()
    assert "Traceback" in log and "a bug in a planner" in log


# --- 7. built-in recipes by name, from anywhere ----------------------------------------------------------

def test_builtin_recipes_resolve_by_name_outside_the_source_tree(tmp_path):
    res = _cli("recipes", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    for name in ("luq", "luq-budget", "w4a16", "w3a16", "w2a16-g64"):
        assert name in res.stdout
    res = _cli("plan", "toy-llava", "--recipe", "w2a16-g64.yaml", "--out", "plan.yaml", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert yaml.safe_load((tmp_path / "plan.yaml").read_text())["planner"] == "uniform"


def test_builtin_recipes_are_package_data():
    import quantlab

    text = (ROOT / "pyproject.toml").read_text()
    assert '"recipes/*.yaml"' in text
    shipped = Path(quantlab.__file__).parent / "recipes"
    assert sorted(p.stem for p in shipped.glob("*.yaml")) == ["gguf-budget", "luq", "luq-budget", "w2a16-g64", "w3a16", "w4a16"]


# --- 8. widths a group size does not divide ---------------------------------------------------------------

@pytest.fixture(scope="module")
def odd_llava(tmp_path_factory) -> Path:
    """A LLaVA variant with hidden 192, MLP 520 and vision MLP 200 (random weights, the toy's processor)."""
    from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig.from_pretrained(ALIASES["toy-llava"])
    cfg.text_config.hidden_size, cfg.text_config.intermediate_size = 192, 520
    cfg.text_config.num_attention_heads = cfg.text_config.num_key_value_heads = 6
    cfg.vision_config.intermediate_size = 200
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("odd") / "llava-192"
    LlavaForConditionalGeneration(cfg).to(torch.float16).save_pretrained(d)
    AutoProcessor.from_pretrained(ALIASES["toy-llava"]).save_pretrained(d)
    return d


def test_odd_widths_fall_back_per_module_and_say_so(odd_llava, tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["quantize", str(odd_llava), "--recipe", "w4a16", "--out", str(out), *FAST,
                              "--set", "eval.tasks=[shapes-vqa]", "--set", "eval.limit=4"])
    assert res.exit_code == 0, res.output
    plan = yaml.safe_load((out / "plan.yaml").read_text())
    fallbacks = plan["info"]["fallbacks"]
    q = "model.language_model.layers.0.self_attn.q_proj"
    down = "model.language_model.layers.0.mlp.down_proj"
    assert plan["layers"][q]["group_size"] == 64 and "gptq-w4-g128 -> gptq-w4-g64" in fallbacks[q]
    assert plan["layers"][down]["group_size"] == -1 and "in_features 520" in fallbacks[down]
    assert len(fallbacks) == 8 * 7  # every decoder Linear: 192 and 520 take no 128-wide group
    report = json.loads((out / "report.json").read_text())
    assert report["fallbacks"] == fallbacks
    assert "Shape fallbacks (56 modules" in (out / "report.md").read_text()


def test_odd_widths_with_fallback_error_are_refused_naming_every_module(odd_llava, tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["quantize", str(odd_llava), "--recipe", "w4a16", "--out", str(out), *FAST,
                              "--set", "plan.shape_fallback=error"])
    refused(res, "model.language_model.layers.{0-7}.self_attn.q_proj (gptq-w4-g128): group_size 128 does not "
                 "divide in_features 192", "layers.{0-7}.mlp.down_proj (gptq-w4-g128): group_size 128 does not divide "
                 "in_features 520")
    assert res.output.count("layers.{0-7}") == 7  # every decoder Linear, each kind on one line
    assert not out.exists()
