"""The training script end to end on a few steps: checkpoints, size trials, both families' cell losses."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from quantlab.toys.train import train


@pytest.mark.parametrize("name", ["toy-llava-hard", "toy-qwen2.5-vl-hard"])
def test_a_few_training_steps_save_checkpoints_and_a_loadable_toy(name, tmp_path):
    out = tmp_path / "toy"
    info = train(name, out, steps=2, batch_size=2, lr=1e-3, n_train=8, seed=0, aux_weight=0.5, threads=1,
                 eval_every=100, bind_bins=6, test_n=2, held_n=4, vision_warmup=1, balanced_cells=True,
                 text_mlp=256, save_at=(1,), position_weight=0.5)
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["intermediate_size"] == 256 and info["text_mlp"] == 256
    first, last = (load_file(str(p / "model.safetensors")) for p in (out / "step-1", out))
    assert first.keys() == last.keys()
    assert all(t.dtype == torch.float16 for t in last.values())
    # the checkpoint is the model after step 1, not an alias of the final one: step 2 changed the decoder
    changed = [k for k in last if "mlp.down_proj" in k and not torch.equal(first[k], last[k])]
    assert changed
    assert info["test"]["n"] == 2
    # a checkpoint names its dataset, so evaluations pick the toy's task, not shapes-VQA's default
    from quantlab.data.synthetic import set_of_model
    assert set_of_model(out / "step-1").name == "shapes-vqa-hard"


def test_image_position_loss_reads_the_image_tokens_in_raster_order():
    """Hidden states that hold each image token's own row/column one-hot, scaled up, give a near-zero loss
    through identity heads; a shifted layout does not."""
    from torch import nn

    from quantlab.toys.aux_losses import image_position_loss

    grid, img, width = 3, 7, 12
    ids = torch.tensor([[1, 2] + [img] * grid * grid + [3, 4]] * 2)
    hidden = torch.zeros(2, ids.shape[1], width)
    for c in range(grid * grid):
        hidden[:, 2 + c, c // grid] = 50.0
        hidden[:, 2 + c, 6 + c % grid] = 50.0
    heads = nn.ModuleDict({"pos_row": nn.Linear(width, grid, bias=False), "pos_col": nn.Linear(width, grid, bias=False)})
    with torch.no_grad():
        heads["pos_row"].weight.copy_(torch.eye(width)[:grid])
        heads["pos_col"].weight.copy_(torch.eye(width)[6:6 + grid])
    assert image_position_loss(hidden, ids, img, heads) < 1e-6
    assert image_position_loss(hidden.roll(1, dims=1), ids, img, heads) > 1.0
