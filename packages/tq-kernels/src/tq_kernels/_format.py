"""What a kernel needs to know about a :class:`tq_core.formats.KVFormat`, in launch-ready form.

Compile-time constants (bits, code and norm bytes, where the fields of a paged cache's regions live,
norm dtypes) become ``tl.constexpr`` arguments; per-format tables (centroids for decoding, decision
boundaries for encoding) and per-layer rotations are small device tensors cached per device.

The kernels serve one code width per component (no extra-bit coordinates) and head dims that are
multiples of 8, with codes in the plane layout of :func:`tq_core.packing.pack_planes`.  Centroid and
boundary tables are ``[2, 256]`` float32 (row 0 holds the component's codebook; boundaries are padded
with ``+inf``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from tq_core.codebooks import lloyd_max_codebook
from tq_core.formats import ComponentFormat, KVFormat
from tq_core.quantizers import gain_grid
from tq_kernels._nibble_lut import (
    BYTE_BIAS,
    byte_table,
    is_antisymmetric,
    lut_asm,
    pair_lut_asm,
    pair_table_words,
)

__all__ = [
    "NORM_CODES",
    "ByteLookup",
    "KernelComponent",
    "KernelFormat",
    "byte_centroids",
    "gain_table",
    "kernel_format",
    "rotation_for",
]

# norm dtype -> small integer understood by the kernels
NORM_CODES = {"float16": 0, "bfloat16": 1, "float32": 2}


@dataclass(frozen=True)
class KernelComponent:
    bits: int
    code_bytes: int
    norm_code: int
    norm_bytes: int


@dataclass(frozen=True)
class KernelFormat:
    fmt: KVFormat
    head_dim: int
    block_d: int  # next power of two >= head_dim (tl.arange needs powers of two)
    slot_bytes: int
    key: KernelComponent
    value: KernelComponent

    def region_constexprs(self, page: int) -> dict[str, int]:
        """Constexprs for kernels that address a paged cache's (block, head) regions of ``page`` tokens:
        offsets of the K/V code arrays and norm arrays inside a region, and bytes per code row."""
        kc, vc, kn, vn = self.fmt.region_offsets(page)
        return {
            "HEAD_DIM": self.head_dim,
            "BLOCK_D": self.block_d,
            "PAGE": page,
            "K_BITS": self.key.bits,
            "K_ROW": self.key.code_bytes,
            "K_CODE_OFF": kc,
            "K_NORM_OFF": kn,
            "K_NORM": self.key.norm_code,
            "V_BITS": self.value.bits,
            "V_ROW": self.value.code_bytes,
            "V_CODE_OFF": vc,
            "V_NORM_OFF": vn,
            "V_NORM": self.value.norm_code,
        }

    def centroids(
        self, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(key, value) centroid tables `[2, 256]` each, on ``device``; the attention kernels take
        float16 tables (their tensor-core operands), the dequantize kernel float32."""
        k, v = _tables(self.fmt, str(device), "centroids")
        if dtype == torch.float32:
            return k, v
        return _cast_tables(self.fmt, str(device), dtype)

    def nibble_asm(self, symmetric: bool = False) -> tuple[str, str]:
        """(key, value) register-lookup PTX of the eight-phase decode loop (:mod:`tq_kernels._nibble_lut`);
        only for components of 3 or 4 bits.  ``symmetric`` uses the shorter program for
        antisymmetric codebooks where the table is one (every Lloyd-Max codebook here is)."""
        return _nibble_asm(self.fmt, symmetric)

    def byte_lookup(self, device: torch.device) -> tuple[ByteLookup, ByteLookup]:
        """(key, value) byte tables of the decode kernel's ``PAIRS`` loop (4-bit components only)."""
        return _byte_lookups(self.fmt, str(device))

    def boundaries(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(key, value) boundary tables, float32 `[2, 256]` (+inf padded), on ``device``."""
        return _tables(self.fmt, str(device), "boundaries")


def _component(c: ComponentFormat, d: int) -> KernelComponent:
    return KernelComponent(
        bits=c.bits, code_bytes=c.code_bytes(d), norm_code=NORM_CODES[c.norm_dtype], norm_bytes=c.norm_bytes
    )


@functools.lru_cache(maxsize=256)
def kernel_format(fmt: KVFormat) -> KernelFormat:
    """Launch-ready description of ``fmt``.

    Raises:
        ValueError: for a head_dim that is not a multiple of 8 or components with extra-bit coordinates
            (the kernels decode whole byte planes with one code width per component).
    """
    d = fmt.head_dim
    if d % 8:
        raise ValueError(f"the kernels need head_dim to be a multiple of 8, got {d}")
    for name, comp in (("key", fmt.key), ("value", fmt.value)):
        if comp.hi_bits_coords:
            raise ValueError(
                f"the kernels store one code width per component, but the {name} of {fmt.name or 'this format'} "
                f"has hi_bits_coords={comp.hi_bits_coords}; use hi_bits_coords=0 (the reference tq_core path "
                f"supports it)"
            )
    return KernelFormat(
        fmt=fmt,
        head_dim=d,
        block_d=1 << (d - 1).bit_length(),
        slot_bytes=fmt.slot_bytes,
        key=_component(fmt.key, d),
        value=_component(fmt.value, d),
    )


def _table(c: ComponentFormat, d: int, what: str) -> torch.Tensor:
    fill = 0.0 if what == "centroids" else float("inf")
    t = torch.full((2, 256), fill, dtype=torch.float32)
    for row, bits in ((0, c.bits), (1, c.bits + 1 if c.hi_bits_coords else None)):
        if bits is None:
            continue
        cb = lloyd_max_codebook(d, bits)
        vals = cb.centroids if what == "centroids" else cb.boundaries
        t[row, : vals.numel()] = vals.to(torch.float32)
    return t


@functools.lru_cache(maxsize=256)
def _tables(fmt: KVFormat, device: str, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    return (_table(fmt.key, fmt.head_dim, what).to(device), _table(fmt.value, fmt.head_dim, what).to(device))


@functools.lru_cache(maxsize=256)
def _cast_tables(fmt: KVFormat, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    k, v = _tables(fmt, device, "centroids")
    return k.to(dtype), v.to(dtype)


@dataclass(frozen=True)
class ByteLookup:
    """A 4-bit codebook as bytes ``m_k`` (:func:`tq_kernels._nibble_lut.byte_table`): centroid
    ``k`` is ``scale * (table[k] - BYTE_BIAS)`` with ``table[k] = 1024 + m_k``.  ``table`` is float16
    `[26]`: the sixteen entries (what the interpreter gathers), then the five int32 registers of the
    register lookup (:func:`~tq_kernels._nibble_lut.pair_table_words`, int32 words 8-12); ``asm`` is
    that lookup, for NVIDIA GPUs."""

    scale: float
    table: torch.Tensor
    asm: str


@functools.lru_cache(maxsize=256)
def _byte_lookups(fmt: KVFormat, device: str) -> tuple[ByteLookup, ByteLookup]:
    out = []
    for comp in (fmt.key, fmt.value):
        if comp.bits != 4 or comp.hi_bits_coords:
            raise ValueError(f"the byte tables serve 4-bit codes, got {comp.bits} bits")
        scale, table = byte_table(lloyd_max_codebook(fmt.head_dim, 4).centroids.tolist())
        magic = torch.tensor([1024.0 + m for m in table], dtype=torch.float16)
        words = torch.tensor(pair_table_words(table), dtype=torch.int64).to(torch.int32).view(torch.float16)
        out.append(ByteLookup(scale, torch.cat([magic, words]).to(device), pair_lut_asm()))
    return out[0], out[1]


def byte_centroids(fmt: KVFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """(key, value) float32 `[16]` centroids as the ``PAIRS`` loop reads them: ``scale * (m_k - 127.5)``."""
    return tuple(  # type: ignore[return-value]
        (lk.table[:16].float().cpu() - BYTE_BIAS) * lk.scale for lk in _byte_lookups(fmt, "cpu")
    )


@functools.lru_cache(maxsize=256)
def _nibble_asm(fmt: KVFormat, symmetric: bool) -> tuple[str, str]:
    out = []
    for comp in (fmt.key, fmt.value):
        if comp.bits not in (3, 4) or comp.hi_bits_coords:
            raise ValueError(f"the register lookup serves 3- and 4-bit codes, got {comp.bits} bits")
        centroids = lloyd_max_codebook(fmt.head_dim, comp.bits).centroids.to(torch.float16)
        bits = tuple(int(b) & 0xFFFF for b in centroids.view(torch.int16).tolist())
        out.append(lut_asm(bits, symmetric and comp.bits == 4 and is_antisymmetric(bits)))
    return out[0], out[1]


@functools.lru_cache(maxsize=1024)
def _rotation(fmt: KVFormat, layer: int, device: str) -> torch.Tensor:
    return fmt.rotation_matrix(layer).to(device).contiguous()


def rotation_for(fmt: KVFormat, layer: int, device: torch.device | str) -> torch.Tensor:
    """float32 `[d, d]` rotation ``R`` of ``layer`` on ``device`` (``y = x @ R.T``), cached."""
    return _rotation(fmt, int(layer), str(device))


@functools.lru_cache(maxsize=64)
def _gains(device: str) -> torch.Tensor:
    return gain_grid(device)


def gain_table(device: torch.device | str) -> torch.Tensor:
    """float32 :data:`tq_core.quantizers.GAIN_GRID` on ``device`` (the store kernel's gain search), cached."""
    return _gains(str(device))
