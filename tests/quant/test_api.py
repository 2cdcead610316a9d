"""quantize_weight: dispatch, schemes and the error messages users see; the registry."""

from __future__ import annotations

import pytest
import torch

from quantlab.quant import (
    BACKENDS,
    QuantScheme,
    get_backend,
    hessian_from_inputs,
    quantize_weight,
    register_backend,
    relative_output_error,
)


def test_all_backends_registered_on_import():
    assert {"rtn", "gptq", "billm"} <= set(BACKENDS)
    assert get_backend("gptq").needs_hessian and not get_backend("rtn").needs_hessian


def test_unknown_backend_lists_valid_names():
    with pytest.raises(KeyError, match="unknown quantization backend .awq.*valid: .*billm.*gptq.*rtn"):
        quantize_weight(torch.randn(4, 32), "awq", bits=4)


def test_duplicate_registration_fails():
    with pytest.raises(ValueError, match="already registered"):
        register_backend("rtn")(lambda w, s, h: None)


@pytest.mark.parametrize("backend,bits", [("gptq", 4), ("billm", 1)])
def test_missing_hessian(backend, bits):
    with pytest.raises(ValueError, match=rf"{backend}.*needs a Hessian"):
        quantize_weight(torch.randn(8, 128), backend, bits=bits)


def test_bad_group_size_names_shape():
    with pytest.raises(ValueError, match=r"weight 8x100 \(out x in\): group_size 128 does not divide in_features 100"):
        quantize_weight(torch.randn(8, 100), "rtn", bits=4, group_size=128)


def test_bad_bits_options_and_hessian_shape():
    W = torch.randn(8, 64)
    with pytest.raises(ValueError, match=r"takes bits in \[2, 3, 4, 8\], got 5 \(other widths only on a K grid"):
        quantize_weight(W, "gptq", bits=5, group_size=32, hessian=torch.eye(64))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['actorder'\]"):
        quantize_weight(W, "gptq", bits=4, group_size=32, hessian=torch.eye(64), actorder=True)
    with pytest.raises(ValueError, match=r"Hessian must be \[64, 64\]"):
        quantize_weight(W, "gptq", bits=4, group_size=32, hessian=torch.eye(32))
    with pytest.raises(ValueError, match="2-D floating"):
        quantize_weight(torch.ones(8, 64, dtype=torch.int32), "rtn", bits=4, group_size=32)
    with pytest.raises(ValueError, match="bits is required"):
        quantize_weight(W, "rtn")


def test_scheme_and_keywords():
    torch.manual_seed(0)
    X = torch.randn(2, 50, 64)
    H = hessian_from_inputs(X)
    assert H.shape == (64, 64) and torch.allclose(H, X.reshape(-1, 64).T @ X.reshape(-1, 64) / 100)
    W = torch.randn(16, 64)
    scheme = QuantScheme(backend="gptq", bits=4, group_size=32, sym=False, args={"act_order": True})
    a = quantize_weight(W, scheme, hessian=H)
    b = quantize_weight(W, "gptq", bits=4, group_size=32, sym=False, hessian=H, act_order=True)
    assert torch.equal(a.codes, b.codes) and a.args == b.args and a.args["act_order"] is True
    with pytest.raises(ValueError, match="not both"):
        quantize_weight(W, scheme, bits=4, hessian=H)
    # the reported error is the relative output error on the given inputs
    Xf = X.reshape(-1, 64)
    direct = ((Xf @ W.T - Xf @ a.dequantized.T).square().sum() / (Xf @ W.T).square().sum()).item()
    assert a.error == pytest.approx(direct, rel=1e-4)
    assert relative_output_error(W, W, H) == 0.0


def test_rtn_error_only_with_hessian():
    W = torch.randn(8, 64)
    assert quantize_weight(W, "rtn", bits=4, group_size=32).error is None
    assert quantize_weight(W, "rtn", bits=4, group_size=32, hessian=torch.eye(64)).error > 0


def test_register_custom_backend():
    @register_backend("test-identity", bits=(8,))
    def identity(weight, scheme, hessian):
        return quantize_weight(weight, "rtn", bits=scheme.bits, group_size=scheme.group_size)

    try:
        r = quantize_weight(torch.randn(4, 32), "test-identity", bits=8, group_size=32)
        assert r.bits == 8
        with pytest.raises(ValueError, match=r"takes bits in \[8\], got 4"):
            quantize_weight(torch.randn(4, 32), "test-identity", bits=4, group_size=32)
    finally:
        BACKENDS.remove("test-identity")


def test_non_positive_definite_hessian():
    with pytest.raises(ValueError, match="not positive definite"):
        quantize_weight(torch.randn(4, 32), "gptq", bits=4, group_size=32, hessian=-torch.eye(32))
