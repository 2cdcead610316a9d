"""The streaming safetensors writer: byte for byte what safetensors' own save_file writes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import quantlab.export.safetensors_stream as stream
from quantlab.export.io import write_shards
from quantlab.export.safetensors_stream import SafetensorsWriter


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = {f"w.{dt}".replace("torch.", ""): (torch.randn(7, 5, generator=g) * 50).to(dt)
         for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64,
                    torch.int16, torch.int8, torch.uint8)}
    t |= {"b.mask": torch.rand(3, generator=g) > 0.5, "z.scalar": torch.tensor(2.5), "a.empty": torch.zeros(0, 4),
          "é.unicode": torch.ones(3, dtype=torch.float16), "odd": torch.ones(3, dtype=torch.float16),
          "emb": torch.randn(1000, 33, generator=g).to(torch.bfloat16)}
    return t


def test_writer_matches_save_file_byte_for_byte(tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "SLICE_BYTES", 1000)  # many slices per tensor
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    with SafetensorsWriter(tmp_path / "ours.safetensors", {"format": "pt"}) as w:
        for name, t in reversed(tensors.items()):  # arrival order does not matter
            w.add(name, t)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.safetensors", "ref.safetensors"]  # no side file


def test_cast_a_slice_at_a_time_equals_the_whole_cast(tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "SLICE_BYTES", 4096)
    emb = _tensors()["emb"]
    write_shards([("emb", emb, torch.float16), ("n", torch.ones(3))], tmp_path)
    save_file({"emb": emb.to(torch.float16), "n": torch.ones(3)}, str(tmp_path / "ref.st"), metadata={"format": "pt"})
    assert (tmp_path / "model.safetensors").read_bytes() == (tmp_path / "ref.st").read_bytes()


def test_shards_hold_the_same_tensors(tmp_path):
    tensors = _tensors()
    files = write_shards(tensors.items(), tmp_path, max_bytes=600)
    assert len(files) == 3 and (tmp_path / "model.safetensors.index.json").exists()
    back = {k: v for f in files for k, v in load_file(str(f)).items()}
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_a_failed_export_leaves_no_partial_file(tmp_path):
    def tensors():
        yield "a", torch.ones(4)
        raise RuntimeError("reading the checkpoint failed")

    with pytest.raises(RuntimeError, match="checkpoint failed"):
        write_shards(tensors(), tmp_path)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="written twice"):
        write_shards([("a", torch.ones(1)), ("a", torch.ones(1))], tmp_path)
    with pytest.raises(ValueError, match="does not store"), SafetensorsWriter(tmp_path / "c.safetensors") as w:
        w.add("c", torch.ones(2, dtype=torch.complex64))
    assert list(tmp_path.iterdir()) == []
