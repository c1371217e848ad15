"""A 16-entry float16 table lookup of eight 4-bit codes at once, in registers, for NVIDIA GPUs.

The decode kernel's 4-bit loop (``tq_kernels._kernels.decode``) reads a code plane as int32 words:
word ``w`` of a row holds the codes of coordinates ``8w .. 8w + 7``, coordinate ``8w + p`` in bits
``[4p, 4p + 4)``.  Gathering ``centroids[code]`` from memory costs an address computation and a load
per element, which made the loop issue-bound (packages/tq-kernels/benchmarks/aot_report.py).  Here the table
lives in eight registers (the low and high bytes of its sixteen float16 values) and byte permutes
(``prmt``) look up four codes per instruction:

1. ``sel = word & 0x77777777`` gives each code's low three bits as ``prmt`` selectors (``prmt`` reads
   the four nibbles of the low half-word; the high codes use ``sel >> 16``);
2. ``prmt`` in sign-replicate mode turns bit 3 of each code into a byte mask (``0xFF`` for codes 8-15);
3. four ``prmt`` look up the low and high bytes in entries 0-7 and 8-15, and ``lop3`` picks by the mask;
4. two ``prmt`` interleave low and high bytes into float16 pairs.

That is 21 instructions per eight codes, exact for any table (no symmetry assumed).  The program is
kept as data so that the PTX the kernel runs and the Python emulation the CPU tests check
(:func:`emulate`) are generated from the same steps.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterable

__all__ = [
    "BYTE_BIAS",
    "PROGRAM",
    "PROGRAM_PAIRS",
    "PROGRAM_3BIT",
    "PROGRAM_SYMMETRIC",
    "byte_table",
    "emulate",
    "emulate_pairs",
    "is_antisymmetric",
    "lut_asm",
    "PAIR_CONSTRAINTS",
    "pair_lut_asm",
    "pair_table_words",
    "word_3bit",
]

# (op, destination, sources...); sources are register names, "$w" (the input word) or ints (immediates).
# "tl0".."tl3" hold the low bytes of entries 0-15 (four per register), "th0".."th3" the high bytes.
_SELECT = 0xD8  # lop3 immLut of (a & ~c) | (b & c): F(0xF0, 0xCC, 0xAA)


def _pairs(half: int) -> list[tuple]:
    """Interleave the low bytes ``vlo`` and high bytes ``vhi`` of four looked-up codes into the float16
    pairs ``o{2 half}`` (codes 4 half, 4 half + 1) and ``o{2 half + 1}`` (the next two)."""
    return [
        ("prmt", f"o{2 * half}", "vlo", "vhi", 0x5140),
        ("prmt", f"o{2 * half + 1}", "vlo", "vhi", 0x7362),
    ]


def _selectors_and_masks() -> list[tuple]:
    """From the selectors ``s0`` (codes 0-3) already in place: ``s1`` for codes 4-7, and the byte masks
    ``m0``/``m1`` (byte k = 0xFF iff bit 3 of code k; codes 0-3, 4-7) by sign-replicating ``prmt``."""
    return [
        ("shr", "s1", "s0", 16),
        ("shl", "w4", "$w", 4),
        ("prmt", "m0", "w4", "$w", 0xD9C8),
        ("prmt", "m1", "w4", "$w", 0xFBEA),
    ]


def _program() -> tuple[tuple, ...]:
    steps: list[tuple] = [("and", "s0", "$w", 0x77777777), *_selectors_and_masks()]
    for half in (0, 1):
        sel, mask = f"s{half}", f"m{half}"
        steps += [
            ("prmt", "la", "tl0", "tl1", sel),
            ("prmt", "lb", "tl2", "tl3", sel),
            ("prmt", "ha", "th0", "th1", sel),
            ("prmt", "hb", "th2", "th3", sel),
            ("lop3", "vlo", "la", "lb", mask, _SELECT),
            ("lop3", "vhi", "ha", "hb", mask, _SELECT),
            *_pairs(half),
        ]
    return tuple(steps)


PROGRAM = _program()

_OR_NOT = 0xF2  # lop3 immLut of a | (~b & c)
_NOT_AND = 0x0C  # ~a & b
_XOR_AND = 0x28  # (a ^ b) & c


def _program_symmetric() -> tuple[tuple, ...]:
    """18 instructions, for antisymmetric tables (``t[15 - j] = -t[j]``, as every Lloyd-Max codebook of a
    symmetric law): codes 8-15 index the eight magnitudes ``t[8..15]`` directly, codes 0-7 index them
    mirrored (``j ^ 7``) and get the sign bit.  Four table registers instead of eight."""
    steps: list[tuple] = [
        ("lop3", "t", "$w", 0x88888888, 0, _NOT_AND),  # bit 3 of each code clear: a negative entry
        ("shr", "u", "t", 3),
        ("mul", "xm", "u", 7),  # 0x7 in each nibble of a negative code (no carries: u is 0 or 1 per nibble)
        ("lop3", "s0", "$w", "xm", 0x77777777, _XOR_AND),  # magnitude index: j & 7, or (j ^ 7) & 7
        *_selectors_and_masks(),
    ]
    for half in (0, 1):
        sel, mask = f"s{half}", f"m{half}"
        steps += [
            ("prmt", "vlo", "ml0", "ml1", sel),
            ("prmt", "mhi", "mh0", "mh1", sel),
            ("lop3", "vhi", "mhi", mask, 0x80808080, _OR_NOT),  # the sign bit where bit 3 was clear
            *_pairs(half),
        ]
    return tuple(steps)


PROGRAM_SYMMETRIC = _program_symmetric()

_OR_AND = 0xA8  # (a | b) & c


def _program_3bit() -> tuple[tuple, ...]:
    """26 instructions for eight 3-bit codes of the plane layout, handed over as one word: bits 0-15
    the 2-bit plane's two bytes (code ``p``'s high bits at ``2p``), bits 16-23 the 1-bit plane's byte
    (its low bit at ``16 + p``).  Both are spread to one code per nibble, then an 8-entry table (4
    registers) is looked up four codes per ``prmt``."""
    steps: list[tuple] = [("and", "x", "$w", 0xFFFF)]
    for shift, mask in ((8, 0x00FF00FF), (4, 0x0F0F0F0F), (2, 0x33333333)):  # 2-bit fields -> nibbles
        steps += [("shl", "t", "x", shift), ("lop3", "x", "x", "t", mask, _OR_AND)]
    steps += [("shr", "y", "$w", 16), ("and", "y", "y", 0xFF)]
    for shift, mask in ((12, 0x000F000F), (6, 0x03030303), (3, 0x11111111)):  # bits -> nibbles
        steps += [("shl", "t", "y", shift), ("lop3", "y", "y", "t", mask, _OR_AND)]
    steps += [("shl", "x", "x", 1), ("or", "s0", "x", "y"), ("shr", "s1", "s0", 16)]
    for half in (0, 1):
        sel = f"s{half}"
        steps += [
            ("prmt", "vlo", "tl0", "tl1", sel),
            ("prmt", "vhi", "th0", "th1", sel),
            *_pairs(half),
        ]
    return tuple(steps)


PROGRAM_3BIT = _program_3bit()


def is_antisymmetric(table_bits: tuple[int, ...]) -> bool:
    """Whether a 16-entry float16 table is ``t[15 - j] = -t[j]`` with non-negative ``t[8..15]``."""
    return len(table_bits) == 16 and all(
        table_bits[j] == table_bits[15 - j] ^ 0x8000 and not table_bits[15 - j] & 0x8000 for j in range(8)
    )


def _byte_words(entries: tuple[int, ...], lo: str, hi: str) -> dict[str, int]:
    """Registers ``lo0, lo1, ...`` holding the low bytes of ``entries`` (four a register, entry 0 in
    byte 0) and ``hi0, hi1, ...`` their high bytes."""
    return {
        f"{name}{r}": sum(((entries[4 * r + k] >> shift) & 0xFF) << (8 * k) for k in range(4))
        for name, shift in ((lo, 0), (hi, 8))
        for r in range(len(entries) // 4)
    }


def _table_words(table_bits: tuple[int, ...], symmetric: bool = False) -> dict[str, int]:
    if len(table_bits) not in (8, 16) or any(not 0 <= b < 1 << 16 for b in table_bits):
        raise ValueError("the table needs eight or sixteen 16-bit patterns")
    if len(table_bits) == 16 and symmetric:
        if not is_antisymmetric(table_bits):
            raise ValueError("the symmetric lookup needs an antisymmetric table (t[15 - j] = -t[j])")
        return _byte_words(table_bits[8:], "ml", "mh")  # the magnitudes
    return _byte_words(table_bits, "tl", "th")  # 8 entries: the 3-bit program's table


def float16_bits(values: Iterable[float]) -> tuple[int, ...]:
    """The float16 bit patterns of sixteen numbers (round to nearest, as ``torch.half`` does)."""
    return tuple(struct.unpack("<H", struct.pack("<e", float(v)))[0] for v in values)


@functools.lru_cache(maxsize=64)
def lut_asm(table_bits: tuple[int, ...], symmetric: bool = False) -> str:
    """PTX for ``tl.inline_asm_elementwise`` (pack 1): input ``$8`` an int32 word of eight codes,
    outputs ``$0 .. $7`` the float16 table entries of codes 0-7 (constraints ``=h`` x8, ``r``).
    ``symmetric`` emits the 18-instruction program for antisymmetric tables; an 8-entry table selects
    the 3-bit program (the word as :data:`PROGRAM_3BIT` describes)."""
    program = _program_for(table_bits, symmetric)
    table = _table_words(table_bits, symmetric)
    regs = sorted({s[1] for s in program} | set(table))
    lines = ["{", f".reg .b32 {', '.join(regs)};"]
    lines += [f"mov.b32 {name}, {value:#010x};" for name, value in table.items()]

    def arg(x: str | int) -> str:
        return "$8" if x == "$w" else (f"{x:#x}" if isinstance(x, int) else x)

    for op, dst, *src in program:
        if op == "lop3":
            lines.append(f"lop3.b32 {dst}, {arg(src[0])}, {arg(src[1])}, {arg(src[2])}, {src[3]:#x};")
        elif op == "mul":
            lines.append(f"mul.lo.u32 {dst}, {arg(src[0])}, {arg(src[1])};")
        elif op == "prmt":
            lines.append(f"prmt.b32 {dst}, {arg(src[0])}, {arg(src[1])}, {arg(src[2])};")
        else:  # and, or, shl, shr
            lines.append(f"{op}.b32 {dst}, {arg(src[0])}, {arg(src[1])};")
    lines += [f"mov.b32 {{${2 * i}, ${2 * i + 1}}}, o{i};" for i in range(4)]
    lines.append("}")
    return "\n".join(lines)


def _program_for(table_bits: tuple[int, ...], symmetric: bool) -> tuple[tuple, ...]:
    if len(table_bits) == 8:
        return PROGRAM_3BIT
    return PROGRAM_SYMMETRIC if symmetric else PROGRAM


def _prmt(a: int, b: int, c: int) -> int:
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = 0
    for k in range(4):
        sel = (c >> (4 * k)) & 0xF
        byte = src[sel & 7]
        if sel & 8:  # sign-replicate mode
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * k)
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    m = 0xFFFFFFFF
    for i in range(8):
        if lut >> i & 1:
            out |= (a if i & 4 else ~a & m) & (b if i & 2 else ~b & m) & (c if i & 1 else ~c & m)
    return out


def emulate(word: int, table_bits: tuple[int, ...], symmetric: bool = False) -> tuple[int, ...]:
    """What :func:`lut_asm`'s program returns for ``word``, computed step by step in Python: the eight
    16-bit patterns, code 0 first."""
    r = dict(_table_words(table_bits, symmetric))
    r["$w"] = word & 0xFFFFFFFF

    def val(x: str | int) -> int:
        return x if isinstance(x, int) else r[x]

    for op, dst, *src in _program_for(table_bits, symmetric):
        a = [val(x) for x in src]
        if op == "and":
            r[dst] = a[0] & a[1]
        elif op == "or":
            r[dst] = a[0] | a[1]
        elif op == "shr":
            r[dst] = a[0] >> a[1]
        elif op == "shl":
            r[dst] = (a[0] << a[1]) & 0xFFFFFFFF
        elif op == "prmt":
            r[dst] = _prmt(a[0], a[1], a[2])
        elif op == "lop3":
            r[dst] = _lop3(a[0], a[1], a[2], a[3])
        elif op == "mul":
            r[dst] = (a[0] * a[1]) & 0xFFFFFFFF
        else:  # pragma: no cover - PROGRAM only uses the ops above
            raise AssertionError(op)
    return tuple((r[f"o{i // 2}"] >> (16 * (i % 2))) & 0xFFFF for i in range(8))


def word_3bit(codes: list[int]) -> int:
    """The word the 3-bit program reads for eight codes: their high two bits as the 2-bit plane's two
    bytes (bits 0-15), their low bits as the 1-bit plane's byte (bits 16-23)."""
    hi = sum(((c >> 1) & 3) << (2 * p) for p, c in enumerate(codes))
    lo = sum((c & 1) << p for p, c in enumerate(codes))
    return hi | lo << 16


# -- byte tables: two words at once, straight into tensor-core pairs ---------------------------------
# A 16-entry table of bytes m_k stands for the centroids s * (m_k - 127.5); the float16 whose high byte
# is 0x64 and low byte m_k is exactly 1024 + m_k, so a looked-up byte becomes a float16 operand with one
# byte permute and no arithmetic.  The kernel subtracts the bias 1024 + 127.5 in float32, after the
# products (every product and the bias are exact there), and multiplies by s once per score or output.
BYTE_BIAS = 1024.0 + 127.5
_MAGIC_HI = 0x64  # high byte of the float16 1024 + m for m in [0, 256)
_INTERLEAVE = 0xE4  # lop3 immLut of (a & c) | (b & ~c)


def byte_table(centroids: Iterable[float]) -> tuple[float, tuple[int, ...]]:
    """(scale ``s``, sixteen bytes ``m_k``) with ``s * (m_k - 127.5)`` the nearest of 256 evenly spaced
    levels to each centroid: the error is at most ``max|c| / 255`` (for a 4-bit Lloyd-Max codebook it adds
    about 0.4% to the mean squared error of a coordinate)."""
    c = [float(v) for v in centroids]
    if len(c) != 16:
        raise ValueError("the byte table needs sixteen centroids")
    top = max(abs(v) for v in c)
    s = top / 127.5 if top > 0 else 1.0
    return s, tuple(min(255, max(0, round(v / s + 127.5))) for v in c)


def _program_pairs() -> tuple[tuple, ...]:
    """34 instructions for sixteen 4-bit codes, words ``$a`` and ``$b`` (codes ``a_p``, ``b_p`` in bits
    ``[4p, 4p + 4)``), into eight float16 pairs ``o_p = (x(a_p), x(b_p))``: the operand pairs of a
    tensor-core product whose reduction runs over the two words (adjacent coordinates of one row for
    keys, adjacent rows for values).  The nibbles of both words are interleaved first (byte ``i`` of
    ``x`` holds ``a_2i`` and ``b_2i``, of ``y`` ``a_2i+1`` and ``b_2i+1``), each looked up as bytes in
    the 16-entry table (entries 0-7 in ``t0, t1``, 8-15 in ``t2, t3``), and two bytes plus the 0x64 high
    bytes make a pair."""
    steps: list[tuple] = [
        ("shl", "bs", "$b", 4),
        ("lop3", "x", "$a", "bs", 0x0F0F0F0F, _INTERLEAVE),
        ("shr", "as", "$a", 4),
        ("lop3", "y", "as", "$b", 0x0F0F0F0F, _INTERLEAVE),
    ]
    for src in ("x", "y"):
        steps += [
            ("and", "s0", src, 0x77777777),
            ("shr", "s1", "s0", 16),
            ("shl", "w4", src, 4),
            ("prmt", "m0", "w4", src, 0xD9C8),
            ("prmt", "m1", "w4", src, 0xFBEA),
        ]
        for half in (0, 1):
            steps += [
                ("prmt", "la", "t0", "t1", f"s{half}"),
                ("prmt", "lb", "t2", "t3", f"s{half}"),
                ("lop3", f"{src}{half}", "la", "lb", f"m{half}", _SELECT),
            ]
    # byte 2i of x0/x1 is a_{4 half + 2i}'s entry, byte 2i + 1 b's; y0/y1 hold the odd codes
    for p in range(8):
        reg = f"{'x' if p % 2 == 0 else 'y'}{p // 4}"
        sel = 0x4140 if (p // 2) % 2 == 0 else 0x4342
        steps.append(("prmt", f"o{p}", reg, "hi", sel))
    return tuple(steps)


PROGRAM_PAIRS = _program_pairs()


def _pair_table_words(table_bytes: tuple[int, ...]) -> dict[str, int]:
    if len(table_bytes) != 16 or any(not 0 <= b < 256 for b in table_bytes):
        raise ValueError("the byte table needs sixteen bytes")
    words = {f"t{r}": sum(table_bytes[4 * r + k] << (8 * k) for k in range(4)) for r in range(4)}
    return words | {"hi": _MAGIC_HI * 0x01010101}


# operands of the pair program: eight outputs, then (pack 2: two registers per input) the words and the
# five table registers, which the kernel loads once (as constants, ptxas re-materialized them every call)
_PAIR_OPERANDS = {"$a": "$8", "$b": "$9", "t0": "$10", "t1": "$12", "t2": "$14", "t3": "$16", "hi": "$18"}
PAIR_CONSTRAINTS = ",".join(["=r"] * 8 + ["r"] * 12)


def pair_table_words(table_bytes: tuple[int, ...]) -> tuple[int, ...]:
    """The five int32 registers of the pair program: entries 0-15 four a word, then the 0x64 bytes."""
    t = _pair_table_words(table_bytes)
    return tuple(t[name] for name in ("t0", "t1", "t2", "t3", "hi"))


@functools.lru_cache(maxsize=64)
def pair_lut_asm() -> str:
    """PTX for ``tl.inline_asm_elementwise`` with pack 2 over int32 words of eight 4-bit codes
    (constraints :data:`PAIR_CONSTRAINTS`): inputs two consecutive words of a thread (``$8``, ``$9``) and
    the five table registers of :func:`pair_table_words` (tensors of one value each), outputs ``$0 .. $7``
    per code ``p`` the float16 ``1024 + m`` of both words, the first word's in the low half."""
    regs = sorted({st[1] for st in PROGRAM_PAIRS})
    lines = ["{", f".reg .b32 {', '.join(regs)};"]

    def arg(x: str | int) -> str:
        return _PAIR_OPERANDS.get(x, x) if isinstance(x, str) else f"{x:#x}"

    for op, dst, *src in PROGRAM_PAIRS:
        if op == "lop3":
            lines.append(f"lop3.b32 {dst}, {arg(src[0])}, {arg(src[1])}, {arg(src[2])}, {src[3]:#x};")
        elif op == "prmt":
            lines.append(f"prmt.b32 {dst}, {arg(src[0])}, {arg(src[1])}, {arg(src[2])};")
        else:  # and, shl, shr
            lines.append(f"{op}.b32 {dst}, {arg(src[0])}, {arg(src[1])};")
    lines += [f"mov.b32 ${p}, o{p};" for p in range(8)]
    lines.append("}")
    return "\n".join(lines)


def emulate_pairs(a: int, b: int, table_bytes: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """What :func:`pair_lut_asm`'s program returns for words ``a`` and ``b``, step by step in Python:
    eight (first word's, second word's) float16 bit patterns, code 0 first."""
    r = dict(_pair_table_words(table_bytes))
    r["$a"], r["$b"] = a & 0xFFFFFFFF, b & 0xFFFFFFFF

    def val(x: str | int) -> int:
        return x if isinstance(x, int) else r[x]

    for op, dst, *src in PROGRAM_PAIRS:
        v = [val(x) for x in src]
        if op == "and":
            r[dst] = v[0] & v[1]
        elif op == "shr":
            r[dst] = v[0] >> v[1]
        elif op == "shl":
            r[dst] = (v[0] << v[1]) & 0xFFFFFFFF
        elif op == "prmt":
            r[dst] = _prmt(v[0], v[1], v[2])
        else:
            r[dst] = _lop3(v[0], v[1], v[2], v[3])
    return tuple((r[f"o{p}"] & 0xFFFF, r[f"o{p}"] >> 16) for p in range(8))
