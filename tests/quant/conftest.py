"""Seeded random layers for the quantization tests: a weight and the Hessian of correlated inputs."""

from __future__ import annotations

import pytest
import torch

from quantlab.quant import hessian_from_inputs


def make_layer(out_f: int, in_f: int, seed: int = 0, n: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W [out, in], H [in, in])``: Gaussian W with a few large rows; inputs with outlier and correlated columns."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g)
    W[: max(1, out_f // 8)] *= 3
    X = torch.randn(n, in_f, generator=g)
    k = max(1, in_f // 16)
    X[:, :k] *= 8  # outlier channels
    X[:, k:2 * k] = X[:, :k] + 0.05 * torch.randn(n, k, generator=g)  # nearly collinear with them
    X = X @ (torch.eye(in_f) + 0.1 * torch.randn(in_f, in_f, generator=g))  # mild global mixing
    return W, hessian_from_inputs(X)


@pytest.fixture
def layer():
    return make_layer(48, 256)


@pytest.fixture(autouse=True)
def _one_thread():
    """Small matrices: one thread is faster and immune to contention on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
