"""The documented top-level verbs exist and are the real functions."""

from __future__ import annotations

import torch

import quantlab


def test_every_export_resolves():
    for name in quantlab.__all__:
        assert getattr(quantlab, name) is not None, name


def test_quantize_weight_from_the_top_level():
    w = torch.randn(64, 128)
    h = (x := torch.randn(256, 128)).T @ x / 256
    r = quantlab.quantize_weight(w, "gptq", bits=4, group_size=64, hessian=h)
    assert r.dequantized.shape == w.shape and r.bits_per_weight == 4 + 16 / 64
    rtn = quantlab.quantize_weight(w, "rtn", bits=4, group_size=64, hessian=h)
    assert r.error <= rtn.error
