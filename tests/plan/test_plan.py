"""Plan YAML round trip, error messages, and pin rules."""

from __future__ import annotations

import numpy as np
import pytest

from quantlab.models.adapter import LLAVA
from quantlab.plan.plan import Plan, apply_rules
from quantlab.quant.scheme import QuantScheme
from tests.conftest import tiny_llava

W4 = QuantScheme(backend="gptq", bits=4, group_size=128)
W8 = QuantScheme(backend="rtn", bits=8, group_size=-1, sym=False, args={"mse": True})


def _plan(**kw) -> Plan:
    base = dict(model="llava-hf/llava-1.5-7b-hf", format="compressed-tensors", planner="luq",
                layers={"model.language_model.layers.0.self_attn.q_proj": W4, "lm_head": None,
                        "model.language_model.layers.0.mlp.down_proj": W8},
                predicted_bytes=123, info={"block.0": {"entropy": np.float32(6.5), "bytes": 10}}, budget_bytes=None)
    return Plan(**(base | kw))


def test_roundtrip_and_readable(tmp_path):
    p = _plan()
    path = p.to_yaml(tmp_path / "plan.yaml")
    text = path.read_text()
    assert "q_proj: {backend: gptq, bits: 4, group_size: 128, sym: true}\n" in text
    assert "lm_head: null" in text and "args: {mse: true}" in text
    back = Plan.from_yaml(path)
    assert back.layers == p.layers and back.predicted_bytes == 123
    assert back.info["block.0"]["entropy"] == pytest.approx(6.5)
    assert [f.name for f in tmp_path.iterdir()] == ["plan.yaml"]  # no temp file left


def test_refuses_overwrite(tmp_path):
    path = _plan().to_yaml(tmp_path / "plan.yaml")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        _plan(predicted_bytes=5).to_yaml(path)
    _plan(predicted_bytes=5).to_yaml(path, overwrite=True)
    assert Plan.from_yaml(path).predicted_bytes == 5


@pytest.mark.parametrize("old,new,key", [
    ("bits: 4", "bitz: 4", "bitz"),
    ("planner: luq", "planner: luq\nplaner: x", "planer"),
    ("format: compressed-tensors", "format: onnx", "format"),
    ("bits: 4", "bits: 9", "bits"),
])
def test_errors_name_file_and_key(tmp_path, old, new, key):
    path = _plan().to_yaml(tmp_path / "plan.yaml")
    path.write_text(path.read_text().replace(old, new, 1))
    with pytest.raises(ValueError) as err:
        Plan.from_yaml(path)
    assert str(path) in str(err.value) and key in str(err.value)


def test_not_yaml_mapping(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        Plan.from_yaml(path)
    path.write_text("a: [\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        Plan.from_yaml(path)


def test_apply_rules_first_match_wins():
    names = [n for n, _ in LLAVA.iter_linears(tiny_llava())]
    rules = [{"match": "lm_head", "scheme": None},
             {"match": "component:vision", "scheme": W8.model_dump()},
             {"match": "re:.*mlp\\.down_proj$", "scheme": None},
             {"match": "re:model\\.language_model\\..*", "scheme": W4}]
    out = apply_rules(names, rules, LLAVA)
    assert out["lm_head"] is None
    assert out["model.vision_tower.encoder.layers.0.mlp.fc1"] == W8
    assert out["model.language_model.layers.1.mlp.down_proj"] is None
    assert out["model.language_model.layers.1.mlp.up_proj"] == W4
    assert "model.multi_modal_projector.linear_1" not in out  # no rule matched
    assert len(out) == len(names) - 2


@pytest.mark.parametrize("rule,msg", [
    ({"match": "component:visoin", "scheme": None}, "unknown component"),
    ({"match": "re:(", "scheme": None}, "bad regex"),
    ({"match": "x", "schema": None}, "invalid"),
])
def test_apply_rules_errors(rule, msg):
    with pytest.raises(ValueError, match=msg):
        apply_rules(["x"], [rule], LLAVA)


@pytest.mark.parametrize("match", ["re:.*layers\\.99\\..*", "model.language_model.layers.0.self_attn.qproj"])
def test_apply_rules_pattern_that_names_nothing_is_an_error(match):
    names = [n for n, _ in LLAVA.iter_linears(tiny_llava())]
    rules = [{"match": "lm_head", "scheme": None}, {"match": match, "scheme": None}]
    with pytest.raises(ValueError, match=r"rule 1: match .* names no module"):
        apply_rules(names, rules, LLAVA)
