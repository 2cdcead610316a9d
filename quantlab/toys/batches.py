"""The toys' training data as tensors: pre-tokenised samples, per-cell targets, padded batches.

Everything a synthetic set's sample says about its board (colour, shape and label characters per cell; for
each colour/shape word of a question, the object it names) becomes a target of the auxiliary losses in
:mod:`quantlab.toys.aux_losses`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantlab.data.synthetic import SyntheticSet
from quantlab.models.inputs import answer_suffix, chat_messages, prompt_text


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
    answer_spans: list[list[tuple[int, int]]] | None = None  # per sample, [start, end) of every answer (turns > 1)
    late_targets: list[torch.Tensor] | None = None  # per sample (k, 5): position, other, row, col, count (0 = n/a)


def first_token(tokenizer, word: str) -> int:
    """The first token id of `` word`` (the colour and shape words as they appear inside a question)."""
    return tokenizer(" " + word, add_special_tokens=False)["input_ids"][0]


def word_ids(tokenizer, member: SyntheticSet) -> dict[int, tuple[str, str]]:
    """Token id of " red", " circle", ... -> ("color" | "shape", word)."""
    return {**{first_token(tokenizer, c): ("color", c) for c in member.colors},
            **{first_token(tokenizer, k): ("shape", k) for k in member.shapes}}


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


def late_targets(sample, ids: torch.Tensor, answer_start: int, question_mark: int, member: SyntheticSet,
                 bins: int) -> torch.Tensor:
    """At the question's last ``?``: the object a relation question asks about (its other attribute in the
    binding classes, row and column bins) or a count question's number; ``(0, 5)`` for other questions.

    These are what the decoder must have found by its late layers to answer; supervising them there gives
    the two-hop questions (anchor, then its neighbour) a shorter path than the answer token's loss alone.
    """
    marks = (ids[:answer_start] == question_mark).nonzero().flatten()
    if not len(marks) or sample.question_type not in ("relation", "count"):
        return torch.zeros(0, 5, dtype=torch.long)
    pos = int(marks[-1])
    if sample.question_type == "count":
        return torch.tensor([[pos, 0, 0, 0, int(sample.answer)]])
    target = member.relation_target(sample) if member.relation_target is not None else None
    if target is None:
        return torch.zeros(0, 5, dtype=torch.long)
    cids, sids = color_ids(member), shape_ids(member)
    other = cids[target.color] if sample.answer == target.color else len(cids) + sids[target.shape]
    return torch.tensor([[pos, other, 1 + target.row * bins // sample.grid, 1 + target.col * bins // sample.grid, 0]])


def label_chars(sample, member: SyntheticSet) -> torch.Tensor:
    """(cells, 2): the label characters each cell holds (1-based alphabet index; 0 = none)."""
    out = torch.zeros(sample.grid * sample.grid, 2, dtype=torch.long)
    label = getattr(sample, "label", None)
    if label is not None:
        for k, ch in enumerate(label.text):
            out[label.row * sample.grid + label.col + k // 2, k % 2] = 1 + member.alphabet.index(ch)
    return out


def conversation(processor, member: SyntheticSet, sample, turns: int) -> tuple[str, list[tuple[str, str]]]:
    """The templated conversation of ``sample``'s question and up to ``turns - 1`` more about its board, and for
    each answer the texts before it and up to its end (to find its tokens)."""
    qas = [(sample.question, sample.answer)] + [(q, a) for q, a, _t in member.more_questions(sample, turns - 1)]
    messages = chat_messages(qas[0][0], True, qas[0][1])
    for q, a in qas[1:]:
        messages += [{"role": "user", "content": [{"type": "text", "text": q}]},
                     {"role": "assistant", "content": [{"type": "text", "text": a}]}]
    bounds = [(processor.apply_chat_template(messages[:2 * j + 1], add_generation_prompt=True, tokenize=False),
               processor.apply_chat_template(messages[:2 * j + 2], tokenize=False).rstrip("\n"))
              for j in range(len(qas))]
    return bounds[-1][1], bounds


def _answer_spans(tokenizer, full: torch.Tensor, text: str, bounds: list[tuple[str, str]]) -> list[tuple[int, int]]:
    """Token spans of the answers in ``full`` (the processor's ids of ``text``, image placeholder expanded)."""
    plain = tokenizer(text, add_special_tokens=True)["input_ids"]
    shift = len(full) - len(plain)  # the image tokens the processor added

    def length(prefix: str) -> int:
        ids = tokenizer(prefix, add_special_tokens=True)["input_ids"]
        if ids != plain[:len(ids)]:
            raise ValueError(f"chat template: {prefix[-40:]!r} does not tokenize as a prefix of the conversation")
        return len(ids) + shift

    return [(length(head), length(upto)) for head, upto in bounds]


def prepare(processor, member: SyntheticSet, split: str, n: int, *, bins: int = 2, chunk: int = 512,
            turns: int = 1) -> Batchable:
    """Tokenise ``n`` samples of ``split`` with the real processor (in chunks, for speed).

    ``turns > 1``: each sample becomes a conversation of its question and up to ``turns - 1`` more about the
    same board (``member.more_questions``), every answer carrying the loss (``answer_spans``).
    """
    if turns > 1 and member.more_questions is None:
        raise ValueError(f"{member.name} has no more_questions: train it with turns=1")
    ids, starts, pixels, grids, colors, shp, bind, chars, spans, late = [], [], [], [], [], [], [], [], [], []
    words = word_ids(processor.tokenizer, member)
    question_mark = processor.tokenizer.convert_tokens_to_ids("?")
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    cids, sids = color_ids(member), shape_ids(member)
    samples = list(member.samples(split, n))
    for lo in range(0, n, chunk):
        part = samples[lo:lo + chunk]
        if turns > 1:
            convs = [conversation(processor, member, s, turns) for s in part]
            texts = [text for text, _b in convs]
        else:
            texts = [prompt_text(processor, s.question, True) + answer_suffix(processor, s.question, True, s.answer)
                     for s in part]
        heads = [prompt_text(processor, s.question, True) for s in part]
        images = [s.render() for s in part]
        enc = processor(images=images, text=texts, return_tensors="pt", padding=True)
        # the prompt's length: its text tokens (the image placeholder one of them) plus the placeholder's
        # expansion, which the processor made in ``full``; tokenising alone spares a second image pass
        head_ids = processor.tokenizer(heads, add_special_tokens=False)["input_ids"]
        for i in range(len(part)):
            full = enc["input_ids"][i][enc["attention_mask"][i].bool()]
            head_len = len(head_ids[i]) + int((full == image_token).sum()) - 1
            ids.append(full)
            starts.append(head_len)
            if turns > 1:
                spans.append(_answer_spans(processor.tokenizer, full, texts[i], convs[i][1]))
                if spans[-1][0][0] != head_len:
                    raise ValueError(f"answer span of {part[i].id} starts at {spans[-1][0][0]}, not {head_len}")
            bind.append(binding_targets(part[i], full, head_len, words, member, bins))
            late.append(late_targets(part[i], full, head_len, question_mark, member, bins))
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
                     torch.stack(chars), spans if turns > 1 else None, late)


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
        for lo, hi in data.answer_spans[i] if data.answer_spans else [(data.answer_start[i], len(s))]:
            labels[row, lo:hi] = s[lo:hi]
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
