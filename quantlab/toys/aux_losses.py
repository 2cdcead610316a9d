"""The auxiliary losses that make the toys learnable in minutes on a CPU; their heads are dropped after
training, so the saved model is a plain transformers checkpoint.

- cell losses (:func:`cell_terms`, :func:`cell_loss`): each image token classified by its cell's colour,
  shape, row, column and, on labelled boards, its two characters (colour and shape against the decoder's
  own word embeddings, :class:`WordAlignedHead`);
- the binding loss: the decoder's middle layer, at each colour/shape word of the question, classifies the
  named object's other attribute and position;
- the lookup-attention loss: one head's attention from such a word to its object's image token;
- the relation-attention loss: one head's attention from a relation question's ``?`` to the image token of
  the object it asks about (the second hop), read through :func:`record_attention` on one layer only.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from quantlab.data.synthetic import SyntheticSet
from quantlab.toys.batches import Batchable, first_token

ATTN_LAYER = 1  # the decoder layer whose head 0 the lookup-attention loss supervises


def lookup_attention_loss(attn: torch.Tensor, data: Batchable, idx: torch.Tensor, image_token_id: int,
                          input_ids: torch.Tensor, grid: int) -> torch.Tensor:
    """-log of one head's attention from each colour/shape word of the question to its object's image token.

    ``attn``: one layer's attention probabilities ``(batch, heads, seq, seq)``; head 0 is supervised. The
    binding targets' position bins must be the board's rows and columns (``bins == grid``). This teaches
    the lookup the binding loss asks for directly, instead of leaving it to be found by the gradient of
    a loss several layers up.
    """
    picks = []
    for r, i in enumerate(idx.tolist()):
        t = data.word_targets[i]
        t = t[t[:, 1] > 0]
        if len(t):
            picks.append((r, t[:, 0], t))
    return head0_attention_loss(attn, picks, input_ids, image_token_id, grid)


def head0_attention_loss(attn: torch.Tensor, picks: list[tuple[int, torch.Tensor, torch.Tensor]],
                         input_ids: torch.Tensor, image_token_id: int, grid: int) -> torch.Tensor:
    """Mean -log of head 0's attention from query positions to the image tokens of the objects their targets
    name; ``picks``: per batch row ``(row, query positions (k,), targets (k, >=4))`` (:func:`object_tokens`)."""
    if not picks:
        return attn.sum() * 0
    rows = torch.cat([torch.full_like(q, r) for r, q, _t in picks])
    key = torch.cat([object_tokens(input_ids[r], t, image_token_id, grid) for r, _q, t in picks])
    p = attn[rows, 0, torch.cat([q for _r, q, _t in picks]), key]
    return -torch.log(p.float() + 1e-6).mean()


def object_tokens(input_ids: torch.Tensor, targets: torch.Tensor, image_token_id: int, grid: int) -> torch.Tensor:
    """Positions in one sequence of the image tokens of the objects that binding ``targets`` name (their row and
    column bins, 1-based, must be the board's rows and columns): one image token per cell, in raster order."""
    start = int((input_ids == image_token_id).nonzero()[0])
    return start + (targets[:, 2] - 1) * grid + (targets[:, 3] - 1)


def relation_attention_loss(attn: torch.Tensor, data: Batchable, idx: torch.Tensor, image_token_id: int,
                            input_ids: torch.Tensor, grid: int, at: str = "question") -> torch.Tensor:
    """-log of head 0's attention from each relation question's ``?`` (``at="question"``) or from the position
    that predicts the answer's first token (``at="answer"``, the last prompt token) to the image token of the
    object the question asks about (the late targets' row and column, which must be the board's:
    ``bins == grid``).

    ``attn``: one layer's attention probabilities ``(batch, heads, seq, seq)``. The answer-token loss alone
    never taught the decoder this second hop (docs/hard-testbed.md, runs 9-13); this asks for it directly.
    """
    picks = []
    for r, i in enumerate(idx.tolist()):
        t = data.late_targets[i]
        t = t[t[:, 2] > 0]  # relation questions (a count question's row is 0)
        if len(t):
            query = t[:, 0] if at == "question" else torch.full_like(t[:, 0], data.answer_start[i] - 1)
            picks.append((r, query, t))
    return head0_attention_loss(attn, picks, input_ids, image_token_id, grid)


def _probe_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention that takes the mask the model built for sdpa (boolean, ``True`` = attend, or None for
    plain causal) and returns the probabilities too; registered for the recorded layer only."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is None:
        q, k = scores.shape[-2:]
        attention_mask = torch.ones(q, k, dtype=torch.bool, device=scores.device).tril(k - q)
    if attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


PROBE = "quantlab_probe"


def record_attention(layer_attention: nn.Module, store: dict[str, torch.Tensor]) -> None:
    """Make one decoder layer's attention module compute eagerly and put its probabilities in
    ``store["attn"]`` on every forward; the other layers keep their sdpa kernels."""
    from transformers import AttentionInterface

    AttentionInterface.register(PROBE, _probe_attention)
    layer_attention.config = copy.copy(layer_attention.config)  # this layer only
    layer_attention.config._attn_implementation = PROBE
    layer_attention.register_forward_hook(lambda m, i, o: store.__setitem__("attn", o[1]))


def _at_positions(hidden: torch.Tensor, per_sample: list[torch.Tensor], idx: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The hidden states at each target's position (column 0 of every sample's ``(k, 1 + m)`` targets) and the
    targets' other columns, over the batch rows ``idx``; None when the batch has no target."""
    rows, pos, tgt = [], [], []
    for r, i in enumerate(idx.tolist()):
        t = per_sample[i]
        rows += [r] * len(t)
        pos.append(t[:, 0])
        tgt.append(t[:, 1:])
    if not rows:
        return None
    return hidden[torch.tensor(rows), torch.cat(pos)], torch.cat(tgt)


def binding_loss(hidden: torch.Tensor, data: Batchable, idx: torch.Tensor, heads: nn.ModuleDict) -> torch.Tensor:
    """Cross-entropy of the binding targets read from the decoder's middle layer at the question words.

    The question word "circle" must find the circle among the image tokens and carry its colour and
    position; supervising that directly is what lets a tiny decoder trained from scratch learn the
    lookup in minutes rather than after a long plateau.
    """
    gathered = _at_positions(hidden, data.word_targets, idx)
    if gathered is None:
        return hidden.sum() * 0
    h, tgt = gathered
    return (F.cross_entropy(heads["bind_other"](h), tgt[:, 0]) + F.cross_entropy(heads["bind_row"](h), tgt[:, 1])
            + F.cross_entropy(heads["bind_col"](h), tgt[:, 2]))


LATE_TERMS = ("late_other", "late_row", "late_col", "late_count")  # heads, in the late targets' column order


def late_loss(hidden: torch.Tensor, data: Batchable, idx: torch.Tensor, heads: nn.ModuleDict,
              terms: tuple[str, ...] = LATE_TERMS) -> torch.Tensor:
    """Cross-entropy of the late targets (:func:`quantlab.toys.batches.late_targets`: a relation question's
    target object, a count question's number) read from a late decoder layer at the question's ``?``; only
    the heads in ``terms`` are trained."""
    gathered = _at_positions(hidden, data.late_targets, idx)
    if gathered is None:
        return hidden.sum() * 0
    h, tgt = gathered
    total = hidden.new_zeros(())
    for k, name in enumerate(LATE_TERMS):
        if name in terms and bool((tgt[:, k] > 0).any()):  # class 0: not this kind of question
            total = total + F.cross_entropy(heads[name](h), tgt[:, k], ignore_index=0)
    return total


class WordAlignedHead(nn.Module):
    """Classifies each image token's colour and shape against the decoder's own word embeddings.

    Scoring a cell against the input-embedding rows of " red", " circle", ... pulls image tokens towards
    the embeddings of the words that describe them, so a question word can find its object by plain
    query-key similarity. This shortens the long plateau before the decoder learns that binding.
    """

    def __init__(self, model: nn.Module, tokenizer, width: int, member: SyntheticSet):
        super().__init__()
        self.embed = model.get_input_embeddings()
        self.register_buffer("color_ids", torch.tensor([first_token(tokenizer, c) for c in member.colors]),
                             persistent=False)
        self.register_buffer("shape_ids", torch.tensor([first_token(tokenizer, s) for s in member.shapes]),
                             persistent=False)
        self.empty = nn.Parameter(torch.zeros(2, width))  # "no object here", for colour and for shape
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        colors = torch.cat([self.empty[:1], self.embed(self.color_ids)])
        shapes_ = torch.cat([self.empty[1:], self.embed(self.shape_ids)])
        return self.scale * feats @ colors.T, self.scale * feats @ shapes_.T


def cell_positions(n: int, cells: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column targets ``(n, cells)`` of ``n`` boards' image tokens: cell c of a square board sits at
    ``(c // grid, c % grid)``, one image token per cell in raster order."""
    grid = int(cells ** 0.5)
    c = torch.arange(cells).repeat(n, 1)
    return c // grid, c % grid


def cell_terms(feats: torch.Tensor, data: Batchable, idx: torch.Tensor, word_aux: WordAlignedHead,
               heads: nn.ModuleDict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(logits, targets) of each per-cell loss for image-token features ``feats`` ``(batch, cells, width)``:
    colour, shape, and, when ``heads`` has those heads, row and column and the two label characters."""
    n, cells = feats.shape[:2]
    color_logits, shape_logits = word_aux(feats)
    # Cell c of every image sits at (c // grid, c % grid): supervising it keeps position in the image tokens,
    # which rotary-position decoders cannot recover from token content otherwise.
    terms = {"color": (color_logits, data.cell_color[idx]), "shape": (shape_logits, data.cell_shape[idx])}
    if "row" in heads:  # only towers with an absolute position embedding (ToySpec.tower_positions)
        rows, cols = cell_positions(n, cells)
        terms["row"] = (heads["row"](feats), rows)
        terms["col"] = (heads["col"](feats), cols)
    if "chars" in heads:
        terms["chars"] = (heads["chars"](feats).reshape(n, cells, 2, -1), data.cell_chars[idx])
    return terms


def image_position_loss(hidden: torch.Tensor, input_ids: torch.Tensor, image_token_id: int,
                        heads: nn.ModuleDict) -> torch.Tensor:
    """Cross-entropy of each image token's row and column (heads ``pos_row``/``pos_col``) read from a decoder
    layer's hidden states ``(batch, seq, width)``; the image tokens of a row are its board's cells in raster
    order.

    For towers without an absolute position embedding (Qwen2.5-VL: 2-D rotary positions inside attention
    only) an image token's content cannot say where it is, and a relation question's second hop ("left of
    the triangle") needs the anchor's row and column as content. The decoder sees each image token's 2-D
    position through mrope, so its early layers can put it there; this loss asks them to.
    """
    mask = input_ids == image_token_id
    cells = int(mask[0].sum())
    feats = hidden[mask].reshape(-1, cells, hidden.shape[-1]).float()
    rows, cols = cell_positions(feats.shape[0], cells)
    return (F.cross_entropy(heads["pos_row"](feats).flatten(0, 1), rows.flatten())
            + F.cross_entropy(heads["pos_col"](feats).flatten(0, 1), cols.flatten()))


BALANCED = ("color", "shape", "chars")  # terms whose class 0 means "nothing here"


def cell_loss(terms: dict[str, tuple[torch.Tensor, torch.Tensor]], balanced: bool = False) -> torch.Tensor:
    """The sum of the terms' cross-entropies (each over every cell of the batch).

    ``balanced``: for the colour, shape and character terms, the mean over the cells that hold something plus
    the mean over those that do not. On a 6 x 6 board with at most six objects, five cells in six are empty:
    a plain mean is mostly the easy "empty" answer, and the shape of the few objects, the hard part, gets a
    sixth of the gradient (docs/hard-testbed.md, run 7's probes).
    """
    total = 0
    for name, (logits, target) in terms.items():
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.flatten(), reduction="none")
        if balanced and name in BALANCED:
            full = target.flatten() > 0
            total = total + sum(ce[m].mean() for m in (full, ~full) if bool(m.any()))
        else:
            total = total + ce.mean()
    return total


def vision_params(model: nn.Module, heads: nn.ModuleDict, word_aux: WordAlignedHead) -> list[nn.Parameter]:
    """What a vision-only stage trains: the vision tower, the projector, the cell heads and the word
    embeddings the image tokens are scored against (not the decoder, not the binding heads)."""
    params = [p for n, p in model.named_parameters() if not n.startswith(("model.language_model", "lm_head"))]
    params += [p for n, p in heads.named_parameters() if not n.startswith("bind")]
    return params + [word_aux.empty, word_aux.scale, model.get_input_embeddings().weight]
