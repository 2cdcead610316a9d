"""Train a toy VLM on its synthetic VQA set (shapes-VQA or shapes-VQA-hard), deterministically, on CPU.

    python -m quantlab.toys.train toy-llava --out quantlab/assets/toy-llava
    python -m quantlab.toys.train toy-llava-hard --out quantlab/assets/toy-llava-hard

The answer tokens (and the end-of-turn token) carry the language-model loss. An auxiliary loss on the
projector output supervises each image token with the colour and shape in its board cell (and, on boards
with labels, the two characters it holds); it speeds up learning a lot and is dropped after training (the
saved model is a plain transformers checkpoint).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from quantlab.data.synthetic import SETS
from quantlab.models.adapter import ADAPTERS
from quantlab.models.inputs import encode_images
from quantlab.toys.aux_losses import (
    ATTN_LAYER,
    LATE_TERMS,
    WordAlignedHead,
    binding_loss,
    cell_loss,
    cell_terms,
    image_position_loss,
    late_loss,
    lookup_attention_loss,
    record_attention,
    relation_attention_loss,
    vision_params,
)
from quantlab.toys.batches import collate, first_token_accuracy, prepare
from quantlab.toys.build import TOYS, build_toy
from quantlab.toys.fast_vision import speed_up_vision
from quantlab.toys.probes import cell_accuracy, lookup_probes


def train(name: str, out: Path, *, steps: int, batch_size: int, lr: float, n_train: int, seed: int,
          aux_weight: float, threads: int, eval_every: int, curriculum: float = 0.0,
          bind_weight: float = 0.5, bind_bins: int = 2, test_n: int = 500, vision_warmup: int = 0,
          attn_weight: float = 0.0, turns: int = 1, probe: bool = False, bf16: bool = False,
          balanced_cells: bool = False, late_weight: float = 0.0, late_from: int = 0,
          late_count: bool = True, relation_attn_weight: float = 0.0,
          relation_attn_at: str = "question", relation_attn_layer: int | None = None,
          init_std: float | None = None, weight_decay: float = 0.01, text_mlp: int | None = None,
          save_at: tuple[int, ...] = (), held_n: int = 500, position_weight: float = 0.0,
          position_layer: int = 2) -> dict:
    """Train toy ``name`` and save it (fp16 safetensors + processor) to ``out``; returns the training log."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    t0 = time.time()
    size = replace(TOYS[name].size, text_mlp=text_mlp) if text_mlp else None
    model, processor = build_toy(name, seed=seed, size=size)
    if init_std is not None:
        reinit_decoder(model, init_std)
    speed_up_vision(model)  # Qwen2.5-VL: batched window attention, patch embedding as one matmul
    member = SETS.get(TOYS[name].size.dataset)
    adapter = ADAPTERS[TOYS[name].model_type]
    image_token_id = adapter.image_token_id(model.config)
    pad_id = processor.tokenizer.pad_token_id
    data = prepare(processor, member, "train", n_train, bins=bind_bins, turns=turns)
    held = prepare(processor, member, "calibration", held_n, bins=bind_bins)
    print(f"data ready in {time.time() - t0:.0f}s: {n_train} train samples", flush=True)

    width = model.config.text_config.hidden_size
    grid = int(data.cell_color.shape[1] ** 0.5)
    if attn_weight > 0:
        if bind_bins != grid:
            raise ValueError(f"--attn-weight needs --bind-bins {grid} (the board's rows and columns), got {bind_bins}")
        model.set_attn_implementation({"text_config": "eager"})  # sdpa returns no attention probabilities
    heads = nn.ModuleDict({"row": nn.Linear(width, grid), "col": nn.Linear(width, grid)} if TOYS[name].tower_positions
                          else {})
    heads.update({"bind_other": nn.Linear(width, 1 + len(member.colors) + len(member.shapes)),
                  "bind_row": nn.Linear(width, 1 + bind_bins), "bind_col": nn.Linear(width, 1 + bind_bins)})
    if member.alphabet:
        heads["chars"] = nn.Linear(width, 2 * (1 + len(member.alphabet)))
    if position_weight > 0:
        heads.update({"pos_row": nn.Linear(width, grid), "pos_col": nn.Linear(width, grid)})
    bind_layer = model.config.text_config.num_hidden_layers // 2
    late_layer = 3 * model.config.text_config.num_hidden_layers // 4
    if late_weight > 0:
        counts = 1 + max(int(t[:, 4].max()) for t in data.late_targets if len(t))
        heads.update({"late_other": nn.Linear(width, 1 + len(member.colors) + len(member.shapes)),
                      "late_row": nn.Linear(width, 1 + bind_bins), "late_col": nn.Linear(width, 1 + bind_bins),
                      "late_count": nn.Linear(width, counts)})
    relation_attn: dict[str, torch.Tensor] = {}
    if relation_attn_weight > 0:
        if bind_bins != grid:
            raise ValueError(f"--relation-attn-weight needs --bind-bins {grid} (the board's rows and columns)")
        # the layer whose output the late heads read: its attention is where the second hop can happen
        record_attention(adapter.blocks(model)[late_layer - 1 if relation_attn_layer is None else relation_attn_layer]
                         .self_attn, relation_attn)
    word_aux = WordAlignedHead(model, processor.tokenizer, width, member)
    captured: dict[str, torch.Tensor] = {}
    hook = adapter.capture_image_features(model, captured)  # in token order (Qwen's merger output is not)

    params = list(model.parameters()) + list(heads.parameters()) + [word_aux.empty, word_aux.scale]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    sched = warmup_cosine(opt, steps)
    model.train()
    log = []
    gen = torch.Generator().manual_seed(seed)
    if vision_warmup:
        # Stage 1: the vision tower and projector alone learn each cell's content (no decoder pass: a few
        # times cheaper per sample), so the decoder starts from image tokens that already say what is where.
        vparams = vision_params(model, heads, word_aux)
        vopt = torch.optim.AdamW(vparams, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
        for vstep in range(vision_warmup):
            idx = torch.randint(0, len(data.ids), (batch_size,), generator=gen)
            batch = collate(data, idx, pad_id, image_token_id)
            encode_images(model, batch)
            aux = cell_loss(cell_terms(captured["features"].reshape(batch_size, -1, width), data, idx, word_aux, heads),
                            balanced=balanced_cells)
            vopt.zero_grad(set_to_none=True)
            aux.backward()
            torch.nn.utils.clip_grad_norm_(vparams, 1.0)
            vopt.step()
            if (vstep + 1) % eval_every == 0 or vstep + 1 == vision_warmup:
                entry = {"vision_step": vstep + 1, "aux_loss": round(aux.item(), 4), "seconds": round(time.time() - t0, 1)}
                log.append(entry)
                print(json.dumps(entry), flush=True)
        del vopt

    # Curriculum: scenes with few objects first. With one object the decoder learns to read an object's
    # colour/shape without having to find it; selecting among several objects is learnt on top of that.
    most = int(data.n_objects.max())
    pools = {m: (data.n_objects <= m).nonzero().flatten() for m in range(1, most + 1)}
    ramp = max(1, int(curriculum * steps))
    for step in range(steps):
        pool = pools[min(most, 1 + ((most - 1) * step) // ramp)]
        idx = pool[torch.randint(0, len(pool), (batch_size,), generator=gen)]
        batch = collate(data, idx, pad_id, image_token_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            late_on = (late_weight > 0 or relation_attn_weight > 0) and step >= late_from
            out_ = model(**batch, output_hidden_states=bind_weight > 0 or late_on or position_weight > 0,
                         output_attentions=attn_weight > 0)
        aux = cell_loss(cell_terms(captured["features"].reshape(batch_size, -1, width), data, idx, word_aux, heads),
                            balanced=balanced_cells)
        loss = out_.loss + aux_weight * aux
        if bind_weight > 0:
            loss = loss + bind_weight * binding_loss(out_.hidden_states[bind_layer], data, idx, heads)
        if late_on and late_weight > 0:
            loss = loss + late_weight * late_loss(out_.hidden_states[late_layer].float(), data, idx, heads,
                                                  terms=LATE_TERMS if late_count else LATE_TERMS[:3])
        if position_weight > 0:
            loss = loss + position_weight * image_position_loss(out_.hidden_states[position_layer],
                                                                batch["input_ids"], image_token_id, heads)
        rel_attn = None
        if relation_attn_weight > 0 and late_on:
            rel_attn = relation_attention_loss(relation_attn["attn"], data, idx, image_token_id, batch["input_ids"], grid,
                                               at=relation_attn_at)
            loss = loss + relation_attn_weight * rel_attn
        if attn_weight > 0:
            loss = loss + attn_weight * lookup_attention_loss(out_.attentions[ATTN_LAYER], data, idx, image_token_id,
                                                              batch["input_ids"], grid)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            acc = first_token_accuracy(model, held, pad_id, image_token_id)
            entry = {"step": step + 1, "lm_loss": round(out_.loss.item(), 4), "aux_loss": round(aux.item(), 4),
                     "seconds": round(time.time() - t0, 1), **acc}
            if rel_attn is not None:
                entry["relation_attn_loss"] = round(rel_attn.item(), 4)
            if probe:
                entry.update(lookup_probes(model, held, heads, bind_layer, pad_id, image_token_id, grid))
                entry["cell_acc"] = cell_accuracy(model, held, word_aux, heads, captured, pad_id, image_token_id)
            log.append(entry)
            print(json.dumps(entry), flush=True)
        if step + 1 in save_at:
            save_checkpoint(model, processor, out / f"step-{step + 1}",
                            {"toy": name, "dataset": member.name, "step": step + 1, "log": log})
    hook.remove()
    if attn_weight > 0:
        model.set_attn_implementation({"text_config": "sdpa"})
    model.eval()
    save_checkpoint(model, processor, out)
    info = {"command": "python -m quantlab.toys.train " + " ".join(sys.argv[1:]), "toy": name,
            "dataset": member.name, "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr,
            "n_train": n_train, "aux_weight": aux_weight, "curriculum": curriculum, "bind_weight": bind_weight,
            "bind_bins": bind_bins, "vision_warmup": vision_warmup, "attn_weight": attn_weight, "turns": turns, "bf16": bf16, "balanced_cells": balanced_cells, "late_weight": late_weight,
            "late_from": late_from, "late_count": late_count, "relation_attn_weight": relation_attn_weight,
            "relation_attn_at": relation_attn_at, "relation_attn_layer": relation_attn_layer,
            "init_std": init_std, "weight_decay": weight_decay, "text_mlp": text_mlp, "position_weight": position_weight,
            "position_layer": position_layer, "threads": threads, "train_seconds": round(time.time() - t0, 1),
            "torch": torch.__version__, "log": log}
    info["test"] = test_accuracy(out, member.name, test_n)
    info["total_seconds"] = round(time.time() - t0, 1)
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info["test"]), flush=True)
    return info


def warmup_cosine(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first 5% of ``steps``, then a cosine decay to zero at ``steps``."""
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))


def save_checkpoint(model: nn.Module, processor, out: Path, info: dict | None = None) -> None:
    """Save ``model`` as a shipped toy is saved (fp16 safetensors under the hub's names, config, processor)
    and ``info`` as its ``training.json`` (the dataset there tells evaluations which task is the toy's); a
    training model is copied first, so it keeps training in its own precision and mode."""
    if model.training:
        model = copy.deepcopy(model).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out)
    save_hub_layout(model, out)
    processor.save_pretrained(out)
    if info is not None:
        (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")


def reinit_decoder(model: nn.Module, std: float) -> None:
    """Draw every decoder-block Linear's weight from N(0, std^2) (the config's ``initializer_range`` otherwise).

    A trial knob of the hard test bed (docs/hard-testbed.md): how much of a trained toy's weights is its random
    initialisation decides how robust it is to weight noise.
    """
    adapter = ADAPTERS[model.config.model_type]
    for block in adapter.blocks(model):
        for mod in block.modules():
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, mean=0.0, std=std)


def save_hub_layout(model: nn.Module, out: Path) -> None:
    """Rewrite ``out/model.safetensors`` under the hub's tensor names (docs/formats.md#tensor-names).

    transformers 5.23 saves LLaVA's CLIP tower as ``vision_tower.*``, without the ``vision_model`` level that
    hub checkpoints have; vLLM refuses that layout and transformers loads both, so the toys ship the hub's.
    """
    from safetensors.torch import save_file

    from quantlab.export.io import dense_tensors
    from quantlab.models.load import LoadedModel, get_adapter

    loaded = LoadedModel(model=model, processor=None, adapter=get_adapter(model), source=str(out))
    save_file(dict(dense_tensors(loaded, set(), torch.float16)), str(out / "model.safetensors"),
              metadata={"format": "pt"})


def test_accuracy(out: Path, task: str = "shapes-vqa", n: int = 500) -> dict:
    """Greedy exact match of the saved (fp16) checkpoint on the task's test split, per question type."""
    from quantlab.eval.runner import evaluate
    from quantlab.models import load_model

    report = evaluate(load_model(out, dtype=torch.float32), [task], data_dir=None, limit=n)
    r = report.tasks[task]
    return {"n": r.n, "accuracy": r.score, "per_type": {t: s.score for t, s in r.per_type.items()},
            "aggregates": r.aggregates}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("toy", choices=sorted(TOYS))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--n-train", type=int, default=40000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--aux-weight", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--curriculum", type=float, default=0.0, help="share of steps spent ramping 1 -> 4 objects")
    ap.add_argument("--bind-weight", type=float, default=0.5, help="weight of the question-word binding loss")
    ap.add_argument("--bind-bins", type=int, default=2, help="row/column bins of the binding loss's position")
    ap.add_argument("--test-n", type=int, default=500, help="test items scored after training")
    ap.add_argument("--attn-weight", type=float, default=0.0,
                    help="weight of the lookup-attention loss (needs --bind-bins equal to the board's grid)")
    ap.add_argument("--vision-warmup", type=int, default=0,
                    help="steps training the vision tower + projector on the cell losses alone, before the rest")
    ap.add_argument("--turns", type=int, default=1,
                    help="questions per training board: the sample's own and up to TURNS-1 more about the same "
                         "board, in one conversation (one image encode supervises several answers)")
    ap.add_argument("--probe", action="store_true",
                    help="log held-out lookup probes at each evaluation (toys/probes.py): binding accuracy, attention")
    ap.add_argument("--bf16", action="store_true",
                    help="bfloat16 autocast for the training forward (faster only on CPUs with native bf16)")
    ap.add_argument("--balanced-cells", action="store_true",
                    help="occupied and empty cells weigh the same in the cell losses (toys/aux_losses.py cell_loss)")
    ap.add_argument("--late-weight", type=float, default=0.0,
                    help="weight of the late targets' loss (a relation's target object, a count) at 3/4 depth")
    ap.add_argument("--late-from", type=int, default=0,
                    help="first decoder step with the late targets' loss (after the lookups by name are learnt)")
    ap.add_argument("--no-late-count", dest="late_count", action="store_false",
                    help="late targets on relation questions only (no count target)")
    ap.add_argument("--relation-attn-weight", type=float, default=0.0,
                    help="weight of the relation-attention loss (from --late-from; needs --bind-bins equal to the "
                         "board's grid): head 0 of the layer below the late targets attends from a relation "
                         "question's ? to the object it asks about")
    ap.add_argument("--relation-attn-at", choices=("question", "answer"), default="question",
                    help="the relation-attention loss's query: the question's ? or the last prompt token (which "
                         "predicts the answer)")
    ap.add_argument("--relation-attn-layer", type=int, default=None,
                    help="decoder layer (0-based) whose head 0 the relation-attention loss supervises "
                         "(default: the one below the late targets)")
    ap.add_argument("--init-std", type=float, default=None,
                    help="standard deviation of the decoder Linears' initial weights (default: the config's "
                         "initializer_range, 0.02)")
    ap.add_argument("--text-mlp", type=int, default=None,
                    help="decoder MLP width instead of the toy's (a trial: a smaller decoder, docs/hard-testbed.md)")
    ap.add_argument("--position-weight", type=float, default=0.0,
                    help="weight of the image tokens' row/column targets read at a decoder layer "
                         "(towers without absolute positions, e.g. Qwen2.5-VL's; aux_losses.image_position_loss)")
    ap.add_argument("--position-layer", type=int, default=2,
                    help="the decoder layer (hidden_states index) whose image tokens --position-weight reads")
    ap.add_argument("--save-at", type=int, nargs="*", default=[],
                    help="steps after which to save a checkpoint to OUT/step-N (fp16, as the final one)")
    ap.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay of the main stage")
    a = ap.parse_args(argv)
    train(a.toy, a.out, steps=a.steps, batch_size=a.batch_size, lr=a.lr, n_train=a.n_train, seed=a.seed,
          aux_weight=a.aux_weight, threads=a.threads, eval_every=a.eval_every,
          curriculum=a.curriculum, bind_weight=a.bind_weight, bind_bins=a.bind_bins, test_n=a.test_n,
          vision_warmup=a.vision_warmup, attn_weight=a.attn_weight, turns=a.turns, probe=a.probe, bf16=a.bf16,
          balanced_cells=a.balanced_cells, late_weight=a.late_weight,
          late_from=a.late_from, late_count=a.late_count, relation_attn_weight=a.relation_attn_weight,
          relation_attn_at=a.relation_attn_at, relation_attn_layer=a.relation_attn_layer, init_std=a.init_std,
          weight_decay=a.weight_decay, text_mlp=a.text_mlp, save_at=tuple(a.save_at),
          position_weight=a.position_weight, position_layer=a.position_layer)


if __name__ == "__main__":
    main()
