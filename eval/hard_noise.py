"""How much weight noise a trained toy's decoder tolerates (docs/hard-testbed.md): a probe of fragility.

    python eval/hard_noise.py --model DIR [--n 300] [--levels 0.5 1 2] [--init-swap]

Greedy answers to the first ``n`` shapes-VQA-hard test items with Gaussian noise added to every decoder
Linear (``W + level * std(W) * N(0, 1)``; all Linears, attention only, MLP only), reported as the share of
answers equal to the noise-free model's. For scale: RTN W3 g128 perturbs a Gaussian weight by about 0.2 of
its std, W2 g64 by about 0.45. ``--init-swap`` rebuilds the toy's initial weights ``W0`` from its seed and
replaces them by another seed's (``W - W0 + W1``, halfway and fully) and removes them (``W - W0``): how much
of the function lives in the random initialisation.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json

import torch

from quantlab.eval.runner import load_items, predict
from quantlab.eval.tasks import get_task
from quantlab.models import load_model

TASK = "shapes-vqa-hard"


def _answers(loaded, items) -> list:
    preds, _ = predict(loaded, get_task(TASK), items, batch_size=64, max_new_tokens=8)
    return preds


def _agreement(a: list, b: list) -> float:
    return round(sum(x == y for x, y in zip(a, b)) / len(b), 4)


def _decoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".language_model." in n}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--levels", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    ap.add_argument("--init-swap", action="store_true")
    ap.add_argument("--toy", default="toy-llava-hard", help="the toy whose initial weights --init-swap rebuilds")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    base = load_model(a.model, dtype=torch.float32)
    items, _ = load_items(TASK, None, limit=a.n)
    ref = _answers(base, items)

    def perturbed(edit) -> float:
        model = copy.deepcopy(base.model)
        for name, mod in _decoder_linears(model).items():
            edit(name, mod)
        return _agreement(_answers(dataclasses.replace(base, model=model), items), ref)

    for part in ("all", "attn", "mlp"):
        for level in a.levels:
            def noise(name, mod, part=part, level=level):
                if part == "all" or (part == "attn") == (".self_attn." in name):
                    w = mod.weight.data
                    mod.weight.data = w + level * w.std() * torch.randn_like(w)
            print(json.dumps({"noise": part, "level": level, "agreement": perturbed(noise)}), flush=True)
    if a.init_swap:
        from quantlab.toys.build import build_toy

        w0 = {n: m.weight.detach() for n, m in _decoder_linears(build_toy(a.toy, seed=0)[0]).items()}
        w1 = {n: m.weight.detach() for n, m in _decoder_linears(build_toy(a.toy, seed=1)[0]).items()}
        for label, f in (("swap 0.5", 0.5), ("swap 1.0", 1.0), ("remove", None)):
            def swap(name, mod, f=f):
                mod.weight.data += -w0[name] if f is None else f * (w1[name] - w0[name])
            print(json.dumps({"init": label, "agreement": perturbed(swap)}), flush=True)


if __name__ == "__main__":
    main()
