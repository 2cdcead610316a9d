"""How far RTN moves a toy's answer logits, against how far apart they are (docs/hard-testbed.md).

    python eval/hard_margins.py --model DIR [--n 300]

On the first ``n`` shapes-VQA-hard test items, at the first answer token: the full-precision margin (top
logit minus the runner-up) and, with every decoder Linear at RTN W3 g128 / W2 g64 (symmetric, as the LUQ
table's uniform rows), how much the fp winner's lead over any other token changes, the ratio of that
change to the margin, and the share of items whose top token flips. An answer flips when the change exceeds
its margin: accuracy can only fall far when the changes are as large as the margins of many right answers.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from torch import nn

from quantlab.data.synthetic import set_of_model
from quantlab.models import load_model
from quantlab.models.load import resolve
from quantlab.quant.rtn import rtn_quantize
from quantlab.toys.batches import collate, prepare

SCHEMES = ((3, 128), (2, 64))


def rtn_copy(model: nn.Module, blocks: list[nn.Module], bits: int, group: int, sym: bool = True) -> nn.Module:
    """A deep copy of ``model`` with every Linear inside ``blocks`` (modules of ``model``) at RTN ``bits``/``group``
    (``sym``: no zero point, the default of quantlab's schemes and so of the LUQ table's uniform rows)."""
    memo: dict[int, object] = {}
    out = copy.deepcopy(model, memo)
    for block in blocks:
        for mod in memo[id(block)].modules():
            if isinstance(mod, nn.Linear):
                mod.weight.data = rtn_quantize(mod.weight.data, bits, group, sym=sym).dequantized
    return out


@torch.no_grad()
def answer_logits(model: nn.Module, data, pad_id: int, image_token_id: int, bs: int = 100) -> torch.Tensor:
    """(items, vocab) logits that predict each item's first answer token."""
    model.eval()
    rows = []
    for lo in range(0, len(data.ids), bs):
        idx = torch.arange(lo, min(lo + bs, len(data.ids)))
        batch = collate(data, idx, pad_id, image_token_id)
        batch.pop("labels")
        logits = model(**batch).logits
        rows += [logits[r, data.answer_start[i] - 1] for r, i in enumerate(idx.tolist())]
    return torch.stack(rows)


def quantiles(t: torch.Tensor, qs: tuple[float, ...]) -> list[float]:
    return [round(float(t.quantile(q)), 3) for q in qs]


def margins(fp: torch.Tensor, quant: torch.Tensor) -> dict:
    """Margin statistics of ``fp`` logits and how ``quant`` logits change the fp winner's leads."""
    top = fp.topk(2, dim=1)
    winner = top.indices[:, :1]
    margin = top.values[:, 0] - top.values[:, 1]
    change = ((quant.gather(1, winner) - quant) - (fp.gather(1, winner) - fp)).abs().max(1).values
    return {"change_q50_q90": quantiles(change, (0.5, 0.9)),
            "change_over_margin_q50_q90": quantiles(change / margin, (0.5, 0.9)),
            "flips": round(float((quant.argmax(1) != winner[:, 0]).float().mean()), 4)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=300)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    loaded = load_model(a.model, dtype=torch.float32)
    proc = loaded.processor
    data = prepare(proc, set_of_model(resolve(a.model)), "test", a.n, bins=2)
    pad, image = proc.tokenizer.pad_token_id, proc.tokenizer.convert_tokens_to_ids(proc.image_token)
    fp = answer_logits(loaded.model, data, pad, image)
    top = fp.topk(2, dim=1)
    out = {"model": a.model, "n": a.n,
           "fp_margin_q10_q25_q50_q75_q90": quantiles(top.values[:, 0] - top.values[:, 1], (0.1, 0.25, 0.5, 0.75, 0.9))}
    for bits, group in SCHEMES:
        model = rtn_copy(loaded.model, loaded.adapter.blocks(loaded.model), bits, group)
        out[f"RTN W{bits} g{group}"] = margins(fp, answer_logits(model, data, pad, image))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
