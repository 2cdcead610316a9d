"""Dense int32 packing: round trips, equality with compressed-tensors 0.20, GPTQ layout."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from quantlab.quant.pack import pack_gptq_qweight, pack_gptq_qzeros, pack_int32, unpack_int32

SHAPES = [(7, 45), (33, 100), (5, 1), (3, 32), (64, 96), (1, 257)]


def random_codes(shape, bits, seed=0):
    return torch.randint(0, 2 ** bits, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int64
                         ).to(torch.uint8)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dim", [0, 1])
def test_round_trip_and_compressed_tensors_equality(bits, shape, dim):
    codes = random_codes(shape, bits, seed=bits)
    packed = pack_int32(codes, bits, dim)
    n = shape[dim]
    expect = list(shape)
    expect[dim] = -(-n * bits // 32)
    assert packed.dtype == torch.int32 and list(packed.shape) == expect
    assert torch.equal(unpack_int32(packed, bits, n, dim), codes)
    # compressed-tensors packs the signed value q = u - 2^(b-1) after adding the offset back
    signed = (codes.to(torch.int32) - (1 << (bits - 1))).to(torch.int8)
    assert torch.equal(packed, pack_to_int32(signed, bits, packed_dim=dim))
    assert torch.equal(unpack_from_int32(packed, bits, torch.Size(shape), packed_dim=dim), signed)


def test_extreme_values_fill_all_bits():
    codes = torch.full((2, 32), 7, dtype=torch.uint8)
    packed = pack_int32(codes, 3, 1)
    assert packed.shape == (2, 3) and torch.all(packed == -1)  # 96 ones
    assert torch.equal(unpack_int32(packed, 3, 32, 1), codes)


def test_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        pack_int32(torch.tensor([[4]], dtype=torch.uint8), 2, 1)


def autogptq_qweight(intweight: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ's packing loop for 2/4/8 bits (qlinear_cuda.py ``pack``): ``intweight [in, out]``."""
    pf = 32 // bits
    iw = intweight.to(torch.int64)
    qweight = torch.zeros(iw.shape[0] // pf, iw.shape[1], dtype=torch.int64)
    for row in range(qweight.shape[0]):
        for j in range(pf):
            qweight[row] |= iw[row * pf + j] << (bits * j)
    return torch.where(qweight >= 2 ** 31, qweight - 2 ** 32, qweight).to(torch.int32)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gptq_qweight_matches_autogptq_loop(bits):
    codes = random_codes((48, 64), bits, seed=1)  # [out, in]
    q = pack_gptq_qweight(codes, bits)
    assert q.shape == (64 * bits // 32, 48)
    assert torch.equal(q, autogptq_qweight(codes.T, bits))


def test_gptq_qzeros_v1_and_shape_errors():
    zeros = torch.full((64, 2), 8.0)  # symmetric 4-bit: v1 stores 7 in every nibble
    qz = pack_gptq_qzeros(zeros, 4)
    assert qz.shape == (2, 8) and torch.all(qz == 0x77777777)
    with pytest.raises(ValueError, match="zero point of 0"):
        pack_gptq_qzeros(torch.zeros(32, 1), 4)
    with pytest.raises(ValueError, match="in_features % 32"):
        pack_gptq_qweight(torch.zeros(4, 40, dtype=torch.uint8), 4)
