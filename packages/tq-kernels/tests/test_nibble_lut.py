"""The register table lookups of the eight-phase decode loop, checked by emulating their PTX programs."""

import random

import pytest
import torch

from tq_core.codebooks import lloyd_max_codebook
from tq_kernels._nibble_lut import (
    PROGRAM,
    PROGRAM_3BIT,
    PROGRAM_SYMMETRIC,
    emulate,
    float16_bits,
    is_antisymmetric,
    lut_asm,
    word_3bit,
)


def _tables():
    rng = random.Random(7)
    yield float16_bits(lloyd_max_codebook(128, 4).centroids.tolist())
    yield tuple(rng.getrandbits(16) for _ in range(16))  # any table: no symmetry or order assumed
    yield tuple(range(0x8000, 0x8010))  # sign bits set in every high byte


@pytest.mark.parametrize("table", list(_tables()), ids=["lloyd-max-d128", "random-bits", "negative"])
def test_program_looks_up_every_code(table):
    rng = random.Random(1)
    words = [rng.getrandbits(32) for _ in range(3000)]
    words += [int(f"{c:x}" * 8, 16) for c in range(16)]  # every code in every position
    words += [0x76543210, 0xFEDCBA98, 0x89ABCDEF, 0x01234567]
    for w in words:
        assert emulate(w, table) == tuple(table[(w >> (4 * p)) & 15] for p in range(8)), hex(w)


def test_float16_bits_match_torch():
    vals = lloyd_max_codebook(64, 4).centroids
    assert float16_bits(vals.tolist()) == tuple(
        int(b) & 0xFFFF for b in vals.to(torch.float16).view(torch.int16).tolist()
    )


def test_asm_text_is_the_program():
    table = float16_bits(lloyd_max_codebook(128, 4).centroids.tolist())
    asm = lut_asm(table)
    body = [
        ln
        for ln in asm.splitlines()
        if ln.split(" ")[0].split(".")[0] in {"and", "shr", "shl", "prmt", "lop3"}
    ]
    assert len(body) == len(PROGRAM) == 21
    assert asm.count("mov.b32 {$") == 4 and "$8" in asm
    with pytest.raises(ValueError, match="eight or sixteen"):
        lut_asm(table[:5])


@pytest.mark.parametrize("d", [64, 80, 96, 128, 256])
def test_symmetric_program_looks_up_every_code_of_the_codebooks(d):
    """The 18-instruction program for antisymmetric tables: every Lloyd-Max codebook the kernels use is
    one, and the program returns the table entry of every code in every position."""
    table = float16_bits(lloyd_max_codebook(d, 4).centroids.tolist())
    assert is_antisymmetric(table)
    rng = random.Random(d)
    words = [rng.getrandbits(32) for _ in range(2000)] + [int(f"{c:x}" * 8, 16) for c in range(16)]
    words += [0x76543210, 0xFEDCBA98]
    for w in words:
        assert emulate(w, table, symmetric=True) == tuple(table[(w >> (4 * p)) & 15] for p in range(8)), hex(
            w
        )
    asm = lut_asm(table, symmetric=True)
    body = [
        ln
        for ln in asm.splitlines()
        if ln.split(" ")[0].split(".")[0] in {"shr", "shl", "prmt", "lop3", "mul"}
    ]
    assert len(body) == len(PROGRAM_SYMMETRIC) == 18


def test_symmetric_program_refuses_other_tables():
    table = tuple(range(16))
    assert not is_antisymmetric(table)
    with pytest.raises(ValueError, match="antisymmetric"):
        lut_asm(table, symmetric=True)


@pytest.mark.parametrize("d", [64, 128, 256])
def test_3bit_program_reads_the_plane_bytes(d):
    """The 3-bit program spreads the 2-bit plane's two bytes and the 1-bit plane's byte of a word into
    eight 3-bit codes and looks each up in an 8-entry table; bits 24-31 of the word are ignored."""
    table = float16_bits(lloyd_max_codebook(d, 3).centroids.tolist())
    assert len(table) == 8
    rng = random.Random(d)
    cases = [[rng.randrange(8) for _ in range(8)] for _ in range(2000)]
    cases += [[c] * 8 for c in range(8)] + [list(range(8)), list(range(7, -1, -1))]
    for codes in cases:
        word = word_3bit(codes) | rng.getrandbits(8) << 24
        assert emulate(word, table) == tuple(table[c] for c in codes), codes
    asm = lut_asm(table)
    body = [
        ln
        for ln in asm.splitlines()
        if ln.split(" ")[0].split(".")[0] in {"and", "or", "shr", "shl", "prmt", "lop3"}
    ]
    assert len(body) == len(PROGRAM_3BIT) == 26


def test_3bit_word_matches_the_plane_layout():
    """word_3bit puts code p's high two bits where the 2-bit plane's bytes 2w, 2w + 1 hold coordinate
    8w + p (bits 2p, little-endian), and its low bit where the 1-bit plane's byte w holds it (bit p)."""
    from tq_core.packing import pack_planes

    rng = random.Random(3)
    codes = torch.tensor([[rng.randrange(8) for _ in range(16)]])
    packed = pack_planes(codes, 3)[0].tolist()  # 2-bit plane (4 bytes), then 1-bit plane (2 bytes)
    for w in range(2):
        word = packed[2 * w] | packed[2 * w + 1] << 8 | packed[4 + w] << 16
        assert word == word_3bit(codes[0, 8 * w : 8 * w + 8].tolist())
