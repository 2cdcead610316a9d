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
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from quantlab.data.synthetic import SETS, SyntheticSet
from quantlab.models.adapter import ADAPTERS
from quantlab.models.inputs import answer_suffix, prompt_text
from quantlab.toys.build import TOYS, build_toy


ATTN_LAYER = 1  # the decoder layer whose head 0 the lookup-attention loss supervises


def color_ids(member: SyntheticSet) -> dict[str, int]:
    return {c: i + 1 for i, c in enumerate(member.colors)}  # 0 = empty cell


def shape_ids(member: SyntheticSet) -> dict[str, int]:
    return {s: i + 1 for i, s in enumerate(member.shapes)}


@dataclass
class Batchable:
    """Pre-tokenised training set: prompt+answer ids, loss masks, pixels and cell targets."""

    ids: list[torch.Tensor]
    answer_start: list[int]
    pixel_values: torch.Tensor  # LLaVA: (N, 3, H, W); Qwen: (N, patches, dim)
    extra: dict[str, torch.Tensor]  # per-sample tensors such as image_grid_thw
    cell_color: torch.Tensor  # (N, cells)
    cell_shape: torch.Tensor
    qtypes: list[str]
    n_objects: torch.Tensor  # (N,) objects in each scene (for the curriculum)
    word_targets: list[torch.Tensor]  # per sample (k, 4): position, other attribute, row bin, col bin
    cell_chars: torch.Tensor  # (N, cells, 2): label characters in each cell (0 = none), for sets with labels


def word_ids(tokenizer, member: SyntheticSet) -> dict[int, tuple[str, str]]:
    """Token id of " red", " circle", ... -> ("color" | "shape", word)."""
    first = lambda w: tokenizer(" " + w, add_special_tokens=False)["input_ids"][0]  # noqa: E731
    return {**{first(c): ("color", c) for c in member.colors}, **{first(k): ("shape", k) for k in member.shapes}}


def binding_targets(sample, ids: torch.Tensor, answer_start: int, words: dict[int, tuple[str, str]],
                    member: SyntheticSet, bins: int) -> torch.Tensor:
    """For each colour/shape word of the question: the named object's other attribute and board position.

    Class 0 means "no such object" (or, for a shape named twice on a board, "not one object"). Other
    attribute: colours 1..C, shapes C+1..C+S. Position: row and column in ``bins`` bins, 1..bins (2 bins:
    top/bottom, left/right).
    """
    cids, sids = color_ids(member), shape_ids(member)
    rows = []
    for pos in range(answer_start):
        kind, word = words.get(int(ids[pos]), (None, None))
        if kind is None:
            continue
        named = [o for o in sample.objects if getattr(o, kind) == word]
        if len(named) != 1:
            rows.append((pos, 0, 0, 0))
            continue
        obj = named[0]
        other = sids[obj.shape] + len(cids) if kind == "color" else cids[obj.color]
        rows.append((pos, other, 1 + obj.row * bins // sample.grid, 1 + obj.col * bins // sample.grid))
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 4)


def label_chars(sample, member: SyntheticSet) -> torch.Tensor:
    """(cells, 2): the label characters each cell holds (1-based alphabet index; 0 = none)."""
    out = torch.zeros(sample.grid * sample.grid, 2, dtype=torch.long)
    label = getattr(sample, "label", None)
    if label is not None:
        for k, ch in enumerate(label.text):
            out[label.row * sample.grid + label.col + k // 2, k % 2] = 1 + member.alphabet.index(ch)
    return out


def prepare(processor, member: SyntheticSet, split: str, n: int, *, bins: int = 2, chunk: int = 512) -> Batchable:
    """Tokenise ``n`` samples of ``split`` with the real processor (in chunks, for speed)."""
    ids, starts, pixels, grids, colors, shp, bind, chars = [], [], [], [], [], [], [], []
    words = word_ids(processor.tokenizer, member)
    cids, sids = color_ids(member), shape_ids(member)
    samples = list(member.samples(split, n))
    for lo in range(0, n, chunk):
        part = samples[lo:lo + chunk]
        texts = [prompt_text(processor, s.question, True) + answer_suffix(processor, s.question, True, s.answer)
                 for s in part]
        heads = [prompt_text(processor, s.question, True) for s in part]
        enc = processor(images=[s.render() for s in part], text=texts, return_tensors="pt", padding=True)
        head_enc = processor(images=[s.render() for s in part], text=heads, return_tensors="pt", padding=True)
        for i in range(len(part)):
            full = enc["input_ids"][i][enc["attention_mask"][i].bool()]
            head_len = int(head_enc["attention_mask"][i].sum())
            ids.append(full)
            starts.append(head_len)
            bind.append(binding_targets(part[i], full, head_len, words, member, bins))
        pv = enc["pixel_values"]
        if "image_grid_thw" in enc:
            per = int(enc["image_grid_thw"][0].prod())
            pixels.append(pv.reshape(len(part), per, -1))
            grids.append(enc["image_grid_thw"])
        else:
            pixels.append(pv)
        for s in part:
            c = torch.zeros(s.grid * s.grid, dtype=torch.long)
            k = torch.zeros_like(c)
            for o in s.objects:
                c[o.row * s.grid + o.col] = cids[o.color]
                k[o.row * s.grid + o.col] = sids[o.shape]
            colors.append(c)
            shp.append(k)
            chars.append(label_chars(s, member))
    extra = {"image_grid_thw": torch.cat(grids)} if grids else {}
    return Batchable(ids, starts, torch.cat(pixels), extra, torch.stack(colors), torch.stack(shp),
                     [s.question_type for s in samples], torch.tensor([len(s.objects) for s in samples]), bind,
                     torch.stack(chars))


def lookup_attention_loss(attn: torch.Tensor, data: Batchable, idx: torch.Tensor, image_token_id: int,
                          input_ids: torch.Tensor, grid: int) -> torch.Tensor:
    """-log of one head's attention from each colour/shape word of the question to its object's image token.

    ``attn``: one layer's attention probabilities ``(batch, heads, seq, seq)``; head 0 is supervised. The
    binding targets' position bins must be the board's rows and columns (``bins == grid``). This teaches
    the lookup the binding loss asks for directly, instead of leaving it to be found by the gradient of
    a loss several layers up.
    """
    rows, pos, key = [], [], []
    for r, i in enumerate(idx.tolist()):
        t = data.word_targets[i]
        t = t[t[:, 1] > 0]
        if not len(t):
            continue
        start = int((input_ids[r] == image_token_id).nonzero()[0])
        rows += [r] * len(t)
        pos.append(t[:, 0])
        key.append(start + (t[:, 2] - 1) * grid + (t[:, 3] - 1))
    if not rows:
        return attn.sum() * 0
    p = attn[torch.tensor(rows), 0, torch.cat(pos), torch.cat(key)]
    return -torch.log(p + 1e-6).mean()


def binding_loss(hidden: torch.Tensor, data: Batchable, idx: torch.Tensor, heads: nn.ModuleDict) -> torch.Tensor:
    """Cross-entropy of the binding targets read from the decoder's middle layer at the question words.

    The question word "circle" must find the circle among the image tokens and carry its colour and
    position; supervising that directly is what lets a tiny decoder trained from scratch learn the
    lookup in minutes rather than after a long plateau.
    """
    rows, pos, tgt = [], [], []
    for r, i in enumerate(idx.tolist()):
        t = data.word_targets[i]
        rows += [r] * len(t)
        pos.append(t[:, 0])
        tgt.append(t[:, 1:])
    if not rows:
        return hidden.sum() * 0
    h = hidden[torch.tensor(rows), torch.cat(pos)]
    tgt = torch.cat(tgt)
    return (F.cross_entropy(heads["bind_other"](h), tgt[:, 0]) + F.cross_entropy(heads["bind_row"](h), tgt[:, 1])
            + F.cross_entropy(heads["bind_col"](h), tgt[:, 2]))


class WordAlignedHead(nn.Module):
    """Classifies each image token's colour and shape against the decoder's own word embeddings.

    Scoring a cell against the input-embedding rows of " red", " circle", ... pulls image tokens towards
    the embeddings of the words that describe them, so a question word can find its object by plain
    query-key similarity. This shortens the long plateau before the decoder learns that binding.
    """

    def __init__(self, model: nn.Module, tokenizer, width: int, member: SyntheticSet):
        super().__init__()
        self.embed = model.get_input_embeddings()
        first = lambda w: tokenizer(" " + w, add_special_tokens=False)["input_ids"][0]  # noqa: E731
        self.register_buffer("color_ids", torch.tensor([first(c) for c in member.colors]), persistent=False)
        self.register_buffer("shape_ids", torch.tensor([first(s) for s in member.shapes]), persistent=False)
        self.empty = nn.Parameter(torch.zeros(2, width))  # "no object here", for colour and for shape
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        colors = torch.cat([self.empty[:1], self.embed(self.color_ids)])
        shapes_ = torch.cat([self.empty[1:], self.embed(self.shape_ids)])
        return self.scale * feats @ colors.T, self.scale * feats @ shapes_.T


def collate(data: Batchable, idx: torch.Tensor, pad_id: int, image_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch with labels on the answer tokens only."""
    seqs = [data.ids[i] for i in idx.tolist()]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full_like(input_ids, -100)
    mask = torch.zeros_like(input_ids)
    for row, (i, s) in enumerate(zip(idx.tolist(), seqs)):
        input_ids[row, : len(s)] = s
        mask[row, : len(s)] = 1
        labels[row, data.answer_start[i]: len(s)] = s[data.answer_start[i]:]
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    pv = data.pixel_values[idx]
    if "image_grid_thw" in data.extra:
        batch["pixel_values"] = pv.reshape(-1, pv.shape[-1])
        batch["image_grid_thw"] = data.extra["image_grid_thw"][idx]
        batch["mm_token_type_ids"] = (input_ids == image_token_id).long()
    else:
        batch["pixel_values"] = pv
    return batch


@torch.no_grad()
def first_token_accuracy(model, data: Batchable, pad_id: int, image_token_id: int, bs: int = 256) -> dict[str, float]:
    """Share of samples whose first answer token is the greedy argmax (a cheap proxy for exact match)."""
    model.eval()
    correct: list[bool] = []
    for lo in range(0, len(data.ids), bs):
        idx = torch.arange(lo, min(lo + bs, len(data.ids)))
        batch = collate(data, idx, pad_id, image_token_id)
        labels = batch.pop("labels")
        logits = model(**batch).logits
        for row, i in enumerate(idx.tolist()):
            p = data.answer_start[i]
            correct.append(bool(logits[row, p - 1].argmax() == labels[row, p]))
    model.train()
    per_type = {t: round(sum(c for c, q in zip(correct, data.qtypes) if q == t) / max(1, data.qtypes.count(t)), 3)
                for t in sorted(set(data.qtypes))}
    return {"first_token_acc": round(sum(correct) / len(correct), 4), "per_type": per_type}


def train(name: str, out: Path, *, steps: int, batch_size: int, lr: float, n_train: int, seed: int,
          aux_weight: float, threads: int, eval_every: int, curriculum: float = 0.0,
          bind_weight: float = 0.5, bind_bins: int = 2, test_n: int = 500, vision_warmup: int = 0,
          attn_weight: float = 0.0) -> dict:
    """Train toy ``name`` and save it (fp16 safetensors + processor) to ``out``; returns the training log."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    t0 = time.time()
    model, processor = build_toy(name, seed=seed)
    member = SETS.get(TOYS[name].size.dataset)
    adapter = ADAPTERS[TOYS[name].model_type]
    image_token_id = adapter.image_token_id(model.config)
    pad_id = processor.tokenizer.pad_token_id
    data = prepare(processor, member, "train", n_train, bins=bind_bins)
    held = prepare(processor, member, "calibration", 500, bins=bind_bins)
    print(f"data ready in {time.time() - t0:.0f}s: {n_train} train samples", flush=True)

    width = model.config.text_config.hidden_size
    grid = int(data.cell_color.shape[1] ** 0.5)
    if attn_weight > 0:
        if bind_bins != grid:
            raise ValueError(f"--attn-weight needs --bind-bins {grid} (the board's rows and columns), got {bind_bins}")
        model.set_attn_implementation({"text_config": "eager"})  # sdpa returns no attention probabilities
    heads = nn.ModuleDict({"row": nn.Linear(width, grid), "col": nn.Linear(width, grid),
                           "bind_other": nn.Linear(width, 1 + len(member.colors) + len(member.shapes)),
                           "bind_row": nn.Linear(width, 1 + bind_bins), "bind_col": nn.Linear(width, 1 + bind_bins)})
    if member.alphabet:
        heads["chars"] = nn.Linear(width, 2 * (1 + len(member.alphabet)))
    bind_layer = model.config.text_config.num_hidden_layers // 2
    word_aux = WordAlignedHead(model, processor.tokenizer, width, member)
    # Cell c of every image sits at (c // grid, c % grid): supervising it keeps position in the image tokens,
    # which rotary-position decoders cannot recover from token content otherwise.
    cell_row = torch.arange(grid * grid) // grid
    cell_col = torch.arange(grid * grid) % grid
    captured: dict[str, torch.Tensor] = {}
    projector = adapter.get(model, adapter.projector)
    hook = projector.register_forward_hook(lambda m, i, o: captured.__setitem__("features", o))

    params = list(model.parameters()) + list(heads.parameters()) + [word_aux.empty, word_aux.scale]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    model.train()
    log = []
    def cell_aux(feats: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        n = len(idx)
        color_logits, shape_logits = word_aux(feats)
        aux = (F.cross_entropy(color_logits.flatten(0, 1), data.cell_color[idx].flatten())
               + F.cross_entropy(shape_logits.flatten(0, 1), data.cell_shape[idx].flatten())
               + F.cross_entropy(heads["row"](feats).flatten(0, 1), cell_row.repeat(n))
               + F.cross_entropy(heads["col"](feats).flatten(0, 1), cell_col.repeat(n)))
        if member.alphabet:
            aux = aux + F.cross_entropy(heads["chars"](feats).reshape(-1, 1 + len(member.alphabet)),
                                        data.cell_chars[idx].flatten())
        return aux

    gen = torch.Generator().manual_seed(seed)
    if vision_warmup:
        # Stage 1: the vision tower and projector alone learn each cell's content (no decoder pass: a few
        # times cheaper per sample), so the decoder starts from image tokens that already say what is where.
        vparams = [p for n, p in model.named_parameters() if not n.startswith(("model.language_model", "lm_head"))]
        vparams += [p for n, p in heads.named_parameters() if not n.startswith("bind")]
        vparams += [word_aux.empty, word_aux.scale, model.get_input_embeddings().weight]
        vopt = torch.optim.AdamW(vparams, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
        for vstep in range(vision_warmup):
            idx = torch.randint(0, len(data.ids), (batch_size,), generator=gen)
            batch = collate(data, idx, pad_id, image_token_id)
            model.get_image_features(**{k: batch[k] for k in ("pixel_values", "image_grid_thw") if k in batch})
            aux = cell_aux(captured["features"].reshape(batch_size, -1, width), idx)
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
        out_ = model(**batch, output_hidden_states=bind_weight > 0, output_attentions=attn_weight > 0)
        aux = cell_aux(captured["features"].reshape(batch_size, -1, width), idx)
        loss = out_.loss + aux_weight * aux
        if bind_weight > 0:
            loss = loss + bind_weight * binding_loss(out_.hidden_states[bind_layer], data, idx, heads)
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
            log.append(entry)
            print(json.dumps(entry), flush=True)
    hook.remove()
    if attn_weight > 0:
        model.set_attn_implementation({"text_config": "sdpa"})
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out)
    save_hub_layout(model, out)
    processor.save_pretrained(out)
    info = {"command": "python -m quantlab.toys.train " + " ".join(sys.argv[1:]), "toy": name,
            "dataset": member.name, "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr,
            "n_train": n_train, "aux_weight": aux_weight, "curriculum": curriculum, "bind_weight": bind_weight,
            "bind_bins": bind_bins, "vision_warmup": vision_warmup, "attn_weight": attn_weight, "threads": threads, "train_seconds": round(time.time() - t0, 1),
            "torch": torch.__version__, "log": log}
    info["test"] = test_accuracy(out, member.name, test_n)
    info["total_seconds"] = round(time.time() - t0, 1)
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info["test"]), flush=True)
    return info


def save_hub_layout(model: nn.Module, out: Path) -> None:
    """Rewrite ``out/model.safetensors`` under the hub's tensor names (docs/formats.md#tensor-names).

    transformers 5.23 saves LLaVA's CLIP tower as ``vision_tower.*``, without the ``vision_model`` level that
    hub checkpoints have; vLLM refuses that layout and transformers loads both, so the toys ship the hub's.
    """
    from safetensors.torch import save_file

    from quantlab.export.io import dense_tensors
    from quantlab.models.load import LoadedModel, get_adapter

    loaded = LoadedModel(model=model, processor=None, adapter=get_adapter(model), source=str(out))
    save_file(dense_tensors(loaded, set(), torch.float16), str(out / "model.safetensors"), metadata={"format": "pt"})


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
    a = ap.parse_args(argv)
    train(a.toy, a.out, steps=a.steps, batch_size=a.batch_size, lr=a.lr, n_train=a.n_train, seed=a.seed,
          aux_weight=a.aux_weight, threads=a.threads, eval_every=a.eval_every,
          curriculum=a.curriculum, bind_weight=a.bind_weight, bind_bins=a.bind_bins, test_n=a.test_n,
          vision_warmup=a.vision_warmup, attn_weight=a.attn_weight)


if __name__ == "__main__":
    main()
