"""Does GPTQ at 2 bits fit its calibration set at the expense of other inputs? (eval/RESULTS.md)

    python eval/gptq_overfit.py --model toy-llava-hard [--samples 64 256] [--damp 0.01 0.1]

For every decoder Linear of the full-precision model: the relative output error
``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` of RTN and of GPTQ (solved on the calibration Hessian of ``n`` samples, seed 0,
the LUQ table's source and mix) measured on that same Hessian and on a held-out one (64 other samples, seed
1), at W2 g64 and W3 g128; the median over Linears and the share of Linears where GPTQ is worse than RTN on
the held-out inputs. Layer by layer on full-precision inputs: it isolates the solver from error propagation.
That error is a ratio of sums over tokens, so a few tokens with huge activations (an attention sink's) can
dominate it; ``token_median`` is the median over the held-out tokens of each token's own relative error
``||ΔW x||² / ||W x||²``, which weighs every token the same.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from luq_table import calib_options

from quantlab.calib.collect import calibrate
from quantlab.calib.data import build_calibration_set
from quantlab.models import Component, load_model
from quantlab.quant.api import quantize_weight
from quantlab.quant.hessian import relative_output_error

SCHEMES = ((2, 64), (3, 128))


def hessians(loaded, model: str, samples: int, seed: int) -> dict[str, torch.Tensor]:
    """``XᵀX / n`` of every decoder Linear's inputs over ``samples`` calibration samples drawn with ``seed``."""
    calib = build_calibration_set(loaded, calib_options(model, samples, seed))
    stats = calibrate(loaded, calib, hessians=True, entropy=False, linears=False, progress=False)
    return {n: stats.hessians[n] / stats.hessian_weight[n] for n in stats.hessians}


def held_inputs(loaded, model: str, samples: int, seed: int) -> dict[str, torch.Tensor]:
    """Every decoder Linear's input rows (valid tokens) on ``samples`` held-out samples, from one fp forward each."""
    calib = build_calibration_set(loaded, calib_options(model, samples, seed))
    linears = dict(loaded.adapter.iter_linears(loaded.model, Component.DECODER))
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
    mask: list[torch.Tensor] = []
    hooks = [lin.register_forward_hook(lambda _m, args, _o, n=n: rows[n].append(args[0].detach().reshape(-1, args[0].shape[-1])))
             for n, lin in linears.items()]
    with torch.no_grad():
        for s in calib.samples:
            if hasattr(loaded.model.model, "rope_deltas"):
                loaded.model.model.rope_deltas = None
            loaded.model(**s.inputs, use_cache=False)
            mask.append(s.valid_mask.reshape(-1).bool())
    for h in hooks:
        h.remove()
    keep = torch.cat(mask)
    return {n: torch.cat(r)[keep] for n, r in rows.items()}


def token_median(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    """Median over the rows of ``x`` of ``||(W - Ŵ) x||² / ||W x||²``."""
    return float(((x @ (w - w_hat).T).pow(2).sum(1) / (x @ w.T).pow(2).sum(1).clamp_min(1e-12)).median())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="toy-llava-hard")
    ap.add_argument("--samples", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--damp", type=float, nargs="+", default=[0.01, 0.1])
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    loaded = load_model(a.model, dtype=torch.float32)
    linears = dict(loaded.adapter.iter_linears(loaded.model, Component.DECODER))
    held = hessians(loaded, a.model, 64, 1)
    tokens = held_inputs(loaded, a.model, 16, 1)
    out = []
    for n_samples in a.samples:
        fit = hessians(loaded, a.model, n_samples, 0)
        for bits, group in SCHEMES:
            rtn = {n: quantize_weight(lin.weight.data, "rtn", bits=bits, group_size=group).dequantized
                   for n, lin in linears.items()}
            for damp in a.damp:
                rows = []
                for n, lin in linears.items():
                    w = lin.weight.data
                    g = quantize_weight(w, "gptq", bits=bits, group_size=group, hessian=fit[n], damp=damp).dequantized
                    rows.append({"rtn_fit": relative_output_error(w, rtn[n], fit[n]),
                                 "rtn_held": relative_output_error(w, rtn[n], held[n]),
                                 "gptq_fit": relative_output_error(w, g, fit[n]),
                                 "gptq_held": relative_output_error(w, g, held[n]),
                                 "rtn_token_median": token_median(w, rtn[n], tokens[n]),
                                 "gptq_token_median": token_median(w, g, tokens[n])})
                med = {k: round(float(torch.tensor([r[k] for r in rows]).median()), 4) for k in rows[0]}
                worse = sum(r["gptq_held"] > r["rtn_held"] for r in rows) / len(rows)
                worse_tok = sum(r["gptq_token_median"] > r["rtn_token_median"] for r in rows) / len(rows)
                entry = {"samples": n_samples, "scheme": f"W{bits} g{group}", "damp": damp, "median": med,
                         "gptq_worse_than_rtn_held": round(worse, 3), "gptq_worse_than_rtn_token_median": round(worse_tok, 3)}
                out.append(entry)
                print(json.dumps(entry), flush=True)
    print(json.dumps({"model": a.model, "results": out}))


if __name__ == "__main__":
    main()
