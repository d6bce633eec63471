"""Bit packing: layout written down in upq_hf/packing.py, round trips bit-exact."""

import pytest
import torch

from upq_hf import packing


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("shape", [(3, 16), (5, 576), (7, 37), (1, 1)])
def test_round_trip_is_bit_exact(bits, shape):
    g = torch.Generator().manual_seed(hash(shape) % 1000 + bits)
    codes = torch.randint(0, 2 ** bits, shape, generator=g, dtype=torch.uint8)
    packed = packing.pack_codes(codes, bits)
    assert packed.dtype == torch.int32
    assert tuple(packed.shape) == packing.packed_shape(shape[0], shape[1], bits)
    assert torch.equal(packing.unpack_codes(packed, bits, shape[1]), codes)


def test_layout_lowest_bits_first_along_k():
    codes = torch.tensor([[1, 2, 3, 0] + [0] * 11 + [3]], dtype=torch.uint8)  # one row, K = 16
    packed = packing.pack_codes(codes, 2)
    expected = 1 | (2 << 2) | (3 << 4) | (3 << 30)
    expected -= 1 << 32  # top field set: negative as int32
    assert packed.shape == (1, 1) and packed.item() == expected


def test_int4_layout_and_padding():
    codes = torch.tensor([[15, 1, 2, 3, 4, 5, 6, 7, 9]], dtype=torch.uint8)  # K = 9: second word padded
    packed = packing.pack_codes(codes, 4)
    assert packed.shape == (2, 1)
    first = sum(c << (4 * i) for i, c in enumerate([15, 1, 2, 3, 4, 5, 6, 7]))
    assert packed[0, 0].item() == first and packed[1, 0].item() == 9


def test_all_ones_word_survives_sign_extension():
    codes = torch.full((2, 16), 3, dtype=torch.uint8)
    packed = packing.pack_codes(codes, 2)
    assert packed.unique().tolist() == [-1]
    assert torch.equal(packing.unpack_codes(packed, 2, 16), codes)


def test_bits_per_weight():
    assert packing.bits_per_weight(2, 64, 576) == 2.25
    assert packing.bits_per_weight(2, None, 4096) == pytest.approx(2.0039, abs=1e-4)
    assert packing.bits_per_weight(4, 128, 4096) == 4.25


def test_invalid_input_is_rejected():
    with pytest.raises(ValueError, match="bits"):
        packing.pack_codes(torch.zeros(2, 16, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        packing.pack_codes(torch.full((2, 16), 4, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="cannot hold"):
        packing.unpack_codes(torch.zeros(2, 3, dtype=torch.int32), 2, 16)
