"""Dense int32 packing: round trips, a bit-stream reference written out here, GPTQ layout (AutoGPTQ loop)."""

from __future__ import annotations

import pytest
import torch

from quantlab.quant.pack import pack_gptq_qweight, pack_gptq_qzeros, pack_int32, unpack_int32

SHAPES = [(7, 45), (33, 100), (5, 1), (3, 32), (64, 96), (1, 257), (600, 40), (40, 600)]  # last two: > PACK_ROWS


def stream_reference(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Row by row: element i at bits [i*b, (i+1)*b) of a little-endian stream, cut into int32 words."""
    rows = []
    for row in codes.tolist():
        stream = sum(int(v) << (i * bits) for i, v in enumerate(row))
        words = [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(-(-len(row) * bits // 32))]
        rows.append([w - (1 << 32) if w >= 1 << 31 else w for w in words])
    return torch.tensor(rows, dtype=torch.int32)


def random_codes(shape, bits, seed=0):
    return torch.randint(0, 2 ** bits, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int64
                         ).to(torch.uint8)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dim", [0, 1])
def test_round_trip_and_bit_stream_reference(bits, shape, dim):
    codes = random_codes(shape, bits, seed=bits)
    packed = pack_int32(codes, bits, dim)
    n = shape[dim]
    expect = list(shape)
    expect[dim] = -(-n * bits // 32)
    assert packed.dtype == torch.int32 and list(packed.shape) == expect
    assert torch.equal(unpack_int32(packed, bits, n, dim), codes)
    ref = stream_reference(codes if dim == 1 else codes.T, bits)
    assert torch.equal(packed, ref if dim == 1 else ref.T)


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
