"""load_model: skeletons from the real configs, aliases, and the offline hub error."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantlab.models import load_model
from quantlab.models.load import resolve

CONFIGS = Path(__file__).resolve().parents[2].parent / "shared" / "configs"


@pytest.mark.parametrize("fname,params,blocks", [
    ("llava-1.5-7b-hf.json", 7_063_427_072, 32),
    ("qwen2.5-vl-7b-instruct.json", 8_292_166_656, 28),
    ("qwen2.5-vl-3b-instruct.json", 3_754_622_976, 36),
])
def test_skeleton_parameter_counts(fname, params, blocks):
    path = CONFIGS / fname
    if not path.is_file():
        pytest.skip(f"{path} not present (shared/ is beside the repository in CI)")
    lm = load_model(path, weights=False)
    assert sum(p.numel() for p in lm.model.parameters()) == params
    assert all(p.device.type == "meta" for p in lm.model.parameters())
    assert len(lm.adapter.blocks(lm.model)) == blocks
    assert lm.processor is None


def test_aliases_resolve():
    assert resolve("llava") == "llava-hf/llava-1.5-7b-hf"
    assert resolve("qwen2.5-vl") == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert resolve("toy-llava").endswith("assets/toy-llava")
    assert resolve("some/other") == "some/other"


def test_offline_hub_id_fails_fast_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match=r"llava-hf/llava-1.5-7b-hf.*local directory"):
        load_model("llava")


def test_missing_local_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope"):
        load_model(str(tmp_path / "nope"))
