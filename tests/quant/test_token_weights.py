"""Token-weighted Hessians ``XᵀDX / ΣD`` (VLMQ / MBQ-style modality weighting): the pure function."""

from __future__ import annotations

import pytest
import torch

from quantlab.quant import quantize_weight
from quantlab.quant.hessian import hessian_from_inputs, weighted_hessian_from_inputs


def test_weighted_hessian_equals_the_explicit_sum():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 37, 24, generator=g)
    w = torch.rand(74, generator=g) * 3
    rows = x.reshape(-1, 24).double()
    explicit = sum(w[t].double() * torch.outer(rows[t], rows[t]) for t in range(74)) / w.double().sum()
    torch.testing.assert_close(weighted_hessian_from_inputs(x, w).double(), explicit, rtol=1e-5, atol=1e-6)


def test_uniform_weights_give_the_plain_hessian_and_zero_weights_drop_tokens():
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(weighted_hessian_from_inputs(x, torch.full((50,), 2.5)), hessian_from_inputs(x))
    keep = torch.arange(50) % 3 == 0
    torch.testing.assert_close(weighted_hessian_from_inputs(x, keep.float()), hessian_from_inputs(x[keep]))


def test_bad_weights_are_refused():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="3 weights for 4 token rows"):
        weighted_hessian_from_inputs(x, torch.ones(3))
    with pytest.raises(ValueError, match="non-negative"):
        weighted_hessian_from_inputs(x, torch.tensor([1.0, -1.0, 1.0, 1.0]))


@pytest.mark.parametrize("bad", [-0.5, "high", True, float("nan")])
def test_image_weight_option_is_validated(bad):
    w = torch.randn(8, 32)
    with pytest.raises(ValueError, match="image_weight must be a non-negative number"):
        quantize_weight(w, "gptq", bits=4, group_size=32, hessian=torch.eye(32), image_weight=bad)


def test_image_weight_needs_a_hessian_backend_or_awq():
    """gptq weighs its Hessian with it; rtn reads no tokens, so there it only weighs AWQ's search and is
    refused without ``awq``, naming the remedy."""
    w = torch.randn(8, 32)
    quantize_weight(w, "gptq", bits=4, group_size=32, hessian=torch.eye(32), image_weight=0.25)
    with pytest.raises(ValueError, match="image_weight on backend 'rtn' weighs AWQ's scale search.*add awq: true"):
        quantize_weight(w, "rtn", bits=4, group_size=32, image_weight=0.25)


def test_token_weight_option_is_validated():
    w = torch.randn(8, 32)
    with pytest.raises(ValueError, match="token_weight must be 'gradient'"):
        quantize_weight(w, "gptq", bits=4, group_size=32, hessian=torch.eye(32), token_weight="attention")
    quantize_weight(w, "gptq", bits=4, group_size=32, hessian=torch.eye(32), token_weight="gradient")
