"""push_to_hub refuses cleanly offline and on a directory that is not an export."""

from __future__ import annotations

import pytest

from quantlab.export.hub import push_to_hub


def test_offline_push_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConnectionError, match="org/name.*not reachable.*stays in"):
        push_to_hub(tmp_path, "org/name")


def test_not_an_export(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        push_to_hub(tmp_path, "org/name")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="ORG/NAME"):
        push_to_hub(tmp_path, "justname")
