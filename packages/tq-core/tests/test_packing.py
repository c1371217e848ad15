import pytest
import torch

from tq_core import pack_bits, packed_bytes, unpack_bits


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 3, 7, 8, 9, 63, 80, 128, 256])
def test_round_trip(bits, n):
    gen = torch.Generator().manual_seed(bits * 1000 + n)
    idx = torch.randint(0, 2**bits, (4, 5, n), generator=gen)
    packed = pack_bits(idx, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (4, 5, (n * bits + 7) // 8)  # 3 bits really take 3 bits
    assert torch.equal(unpack_bits(packed, bits, n), idx.to(torch.uint8))


def test_bit_order_is_little_endian_stream():
    # element j occupies bits [3j, 3j+3) of the byte stream
    assert pack_bits(torch.tensor([1, 2, 3, 4, 5, 6, 7, 0]), 3).tolist() == [209, 88, 31]
    assert pack_bits(torch.tensor([0xA, 0x5]), 4).tolist() == [0x5A]
    assert pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1]), 1).tolist() == [0x81, 0x01]


def test_sizes():
    assert packed_bytes(128, 3) == 48
    assert packed_bytes(80, 3) == 30
    assert packed_bytes(128, 5) == 80


def test_bad_input():
    with pytest.raises(ValueError, match="integer tensor"):
        pack_bits(torch.zeros(8), 2)
    with pytest.raises(ValueError, match="bits must be"):
        pack_bits(torch.zeros(8, dtype=torch.int64), 9)
    with pytest.raises(ValueError, match="need 48"):
        unpack_bits(torch.zeros(47, dtype=torch.uint8), 3, 128)
    with pytest.raises(ValueError, match="uint8"):
        unpack_bits(torch.zeros(48, dtype=torch.int32), 3, 128)


@pytest.mark.parametrize("pack", ["pack_bits", "pack_planes"])
@pytest.mark.parametrize(
    ("values", "bits", "shown"),
    [
        ([8, 1, 2, 3, 4, 5, 6, 7], 3, "min 1 and max 8"),  # used to unpack as [0, 2, ...]
        ([-1, 0, 0, 0, 0, 0, 0, 0], 3, "min -1 and max 0"),  # used to unpack as 7
        ([2, 0, 0, 0, 0, 0, 0, 0], 1, "min 0 and max 2"),
        ([256, 0], 8, "min 0 and max 256"),
        ([16, 0], 4, "min 0 and max 16"),
    ],
)
def test_out_of_range_indices_are_rejected(pack, values, bits, shown):
    from tq_core import packing

    with pytest.raises(ValueError, match=rf"0\.\.{2**bits - 1} for {bits} bits, got {shown}"):
        getattr(packing, pack)(torch.tensor(values), bits)


def test_index_dtypes_and_shapes_are_checked():
    from tq_core.packing import pack_planes, unpack_planes

    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        assert pack_bits(torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=dtype), 3).tolist() == [209, 88, 31]
    for bad in (torch.tensor([1, 2], dtype=torch.uint16), torch.tensor([True]), torch.tensor([1j])):
        with pytest.raises(ValueError, match="integer tensor"):
            pack_bits(bad, 3)
    with pytest.raises(ValueError, match=r"integer torch\.Tensor"):
        pack_bits([1, 2, 3], 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one dimension"):
        pack_planes(torch.tensor(3), 3)
    with pytest.raises(ValueError, match=r"bits must be an integer in 1\.\.8, got 0"):
        pack_planes(torch.tensor([0]), 0)
    with pytest.raises(ValueError, match=r"n \(indices per row\) must be an integer >= 0"):
        unpack_planes(torch.zeros(3, dtype=torch.uint8), 3, -8)
    with pytest.raises(ValueError, match=r"uint8 torch\.Tensor"):
        unpack_bits([0, 1], 3, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("bits", range(1, 9))
def test_empty_leading_dims(bits):
    idx = torch.zeros(0, 2, 128, dtype=torch.int64)
    packed = pack_bits(idx, bits)
    assert packed.shape == (0, 2, packed_bytes(128, bits))
    assert unpack_bits(packed, bits, 128).shape == (0, 2, 128)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [8, 16, 80, 96, 128, 256, 7])
def test_planes_round_trip_and_size(bits, n):
    from tq_core.packing import pack_planes, plane_widths, planes_bytes, unpack_planes

    gen = torch.Generator().manual_seed(bits * 100 + n)
    idx = torch.randint(0, 2**bits, (3, n), generator=gen)
    packed = pack_planes(idx, bits)
    assert packed.shape[-1] == planes_bytes(n, bits)
    if n % 8 == 0:
        assert planes_bytes(n, bits) == packed_bytes(n, bits)  # no byte lost to the split
    assert torch.equal(unpack_planes(packed, bits, n), idx.to(torch.uint8))
    assert sum(plane_widths(bits)) == bits


def test_plane_layout_is_dense_streams_of_each_part():
    from tq_core.packing import pack_planes

    idx = torch.tensor([5, 2, 7, 0, 1, 3, 6, 4])
    hi, lo = idx >> 1, idx & 1
    assert pack_planes(idx, 3).tolist() == pack_bits(hi, 2).tolist() + pack_bits(lo, 1).tolist()
    # widths that are powers of two are one plane: identical to the dense stream
    assert torch.equal(pack_planes(idx, 4), pack_bits(idx, 4))
