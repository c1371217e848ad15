"""Dense b-bit packing of quantization indices (3 bits really take 3 bits).

Two layouts:

* :func:`pack_bits`: one dense little-endian bit stream of ``b``-bit fields.
* :func:`pack_planes`, the layout of TurboQuant slots: ``b`` is split into its power-of-two parts
  (:func:`plane_widths`, e.g. 3 = 2 + 1, 7 = 4 + 2 + 1), and each part is a dense stream of its own
  (``pack_bits`` of that width), high part first; an index is ``sum(part_w << shift_w)``.  It takes
  exactly as many bytes as one dense stream when ``n`` is a multiple of 8, but every byte of a plane
  holds ``8 / w`` whole fields, so a GPU kernel decodes a tile with contiguous vector loads and
  constant shifts instead of per-element byte gathers.

Bit order of a dense stream: element ``j`` of a row occupies bits ``[j*b, (j+1)*b)`` of the row's little-endian bit
stream, i.e. byte ``(j*b) // 8`` from bit ``(j*b) % 8`` upwards, spilling into the next byte when it
crosses a byte boundary.  A row of ``n`` indices takes ``ceil(n*b / 8)`` bytes.  Kernels decode an
element with two byte loads, a shift and a mask: ``((B[o >> 3] | B[(o >> 3) + 1] << 8) >> (o & 7)) & m``.
"""

from __future__ import annotations

import torch

from tq_core._validate import check_bits

__all__ = [
    "packed_bytes",
    "pack_bits",
    "unpack_bits",
    "plane_widths",
    "planes_bytes",
    "pack_planes",
    "unpack_planes",
]


# Integer dtypes torch reduces and shifts on every device (its uint16/32/64 lack CPU min/max kernels).
_INDEX_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _check_count(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n (indices per row) must be an integer >= 0, got {n!r}")
    return n


def _check_indices(idx: object, bits: int) -> torch.Tensor:
    """``idx`` is an integer tensor `[..., n]` whose values fit in ``bits`` bits (one min/max pass)."""
    if not isinstance(idx, torch.Tensor):
        raise ValueError(f"idx must be an integer torch.Tensor, got {type(idx).__name__}")
    if idx.dtype not in _INDEX_DTYPES:
        allowed = ", ".join(str(t).removeprefix("torch.") for t in _INDEX_DTYPES)
        raise ValueError(
            f"idx must be an integer tensor ({allowed}), got {idx.dtype}; convert it with .to(torch.int64)"
        )
    if idx.dim() < 1:
        raise ValueError("idx must have at least one dimension (the indices of a row are its last)")
    if idx.numel() and not (idx.dtype == torch.uint8 and bits == 8):
        lo, hi = (int(t) for t in torch.aminmax(idx))
        if lo < 0 or hi > (1 << bits) - 1:
            raise ValueError(
                f"idx values must lie in 0..{(1 << bits) - 1} for {bits} bits, got min {lo} and max {hi}; "
                "an out-of-range value would be stored wrapped and corrupt its neighbours"
            )
    return idx


def _check_packed(packed: object, need: int, n: int, bits: int) -> torch.Tensor:
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        got = packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise ValueError(f"packed must be a uint8 torch.Tensor, got {got}")
    if packed.dim() < 1 or packed.shape[-1] != need:
        raise ValueError(
            f"packed has shape {tuple(packed.shape)}; {n} indices of {bits} bits need {need} bytes "
            f"in its last dimension"
        )
    return packed


def packed_bytes(n: int, bits: int) -> int:
    """Bytes that ``n`` indices of ``bits`` bits take when packed."""
    check_bits(bits)
    _check_count(n)
    return (n * bits + 7) // 8


def pack_bits(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack the last dimension of ``idx`` (integers in ``[0, 2**bits)``) into bytes.

    Args:
        idx: integer tensor `[..., n]`.
        bits: 1..8.

    Returns:
        uint8 tensor `[..., ceil(n*bits/8)]`.

    Raises:
        ValueError: ``bits`` is not in 1..8, ``idx`` is not an integer tensor, or a value lies outside
            ``0..2**bits - 1`` (it would be stored wrapped and corrupt its neighbours).

    Example:
        >>> pack_bits(torch.tensor([1, 2, 3, 4, 5, 6, 7, 0]), 3).tolist()
        [209, 88, 31]
    """
    check_bits(bits)
    return _pack_bits(_check_indices(idx, bits), bits)


def _pack_bits(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`pack_bits` without the checks, for values already known to fit."""
    n = idx.shape[-1]
    lead = idx.shape[:-1]
    if bits == 8:
        return idx.to(torch.uint8).clone()
    if 8 % bits == 0 and n % (8 // bits) == 0:  # 1, 2, 4 bits: whole bytes, no int64 words needed
        per = 8 // bits
        v8 = idx.to(torch.uint8).reshape(*lead, n // per, per)
        out8 = v8[..., 0].clone()
        for i in range(1, per):
            out8 |= v8[..., i] << (i * bits)
        return out8
    nbytes = packed_bytes(n, bits)
    pad = (-n) % 8
    v = idx.to(torch.int64)
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    # 8 indices of b bits make exactly b bytes: assemble them in one int64 word, then split it.
    groups = v.reshape(*lead, (n + pad) // 8, 8)
    shifts = torch.arange(8, device=idx.device, dtype=torch.int64) * bits
    words = (groups << shifts).sum(-1)  # bit fields do not overlap, so sum == OR
    byte_shifts = torch.arange(bits, device=idx.device, dtype=torch.int64) * 8
    out = ((words.unsqueeze(-1) >> byte_shifts) & 0xFF).reshape(*lead, (n + pad) // 8 * bits)
    return out[..., :nbytes].to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 `[..., ceil(n*bits/8)]` -> uint8 `[..., n]`."""
    _check_packed(packed, packed_bytes(n, bits), n, bits)
    return _unpack_bits(packed, bits, n)


def _unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """:func:`unpack_bits` without the checks."""
    if bits == 8:
        return packed.clone()
    lead = packed.shape[:-1]
    if 8 % bits == 0 and n % (8 // bits) == 0:
        per, mask = 8 // bits, (1 << bits) - 1
        parts = [(packed >> (i * bits)) & mask for i in range(per)]
        return torch.stack(parts, dim=-1).reshape(*lead, n)
    ngroups = (n + 7) // 8
    v = packed.to(torch.int64)
    need = ngroups * bits
    if v.shape[-1] < need:
        v = torch.nn.functional.pad(v, (0, need - v.shape[-1]))
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    words = (v.reshape(*lead, ngroups, bits) << byte_shifts).sum(-1)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    idx = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return idx.reshape(*lead, ngroups * 8)[..., :n].to(torch.uint8)


def plane_widths(bits: int) -> tuple[int, ...]:
    """Power-of-two parts of ``bits``, high part first: 3 -> (2, 1), 6 -> (4, 2), 8 -> (8,)."""
    check_bits(bits)
    return tuple(w for w in (8, 4, 2, 1) if bits & w)


def planes_bytes(n: int, bits: int) -> int:
    """Bytes that ``n`` indices take in the plane layout (``== packed_bytes`` when ``8 | n``)."""
    return sum(packed_bytes(n, w) for w in plane_widths(bits))


def pack_planes(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer indices `[..., n]` in the plane layout; uint8 `[..., planes_bytes(n, bits)]`.

    Checks its input as :func:`pack_bits` does (values in ``0..2**bits - 1``).

    Example:
        >>> pack_planes(torch.tensor([5, 2, 7, 0, 1, 3, 6, 4]), 3).tolist()  # planes 2 bits + 1 bit
        [54, 180, 53]
    """
    check_bits(bits)
    _check_indices(idx, bits)
    widths = plane_widths(bits)
    if len(widths) == 1:  # 1, 2, 4, 8 bits: the plane layout is the dense stream
        return _pack_bits(idx, bits)
    v = idx if idx.dtype == torch.uint8 else idx.to(torch.int64)
    parts, shift = [], bits
    for w in widths:
        shift -= w
        parts.append(_pack_bits((v >> shift) & ((1 << w) - 1), w))
    return torch.cat(parts, dim=-1)


def unpack_planes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_planes`: uint8 `[..., planes_bytes(n, bits)]` -> uint8 `[..., n]`."""
    _check_packed(packed, planes_bytes(n, bits), n, bits)
    out = torch.zeros(*packed.shape[:-1], n, dtype=torch.int32, device=packed.device)
    off, shift = 0, bits
    for w in plane_widths(bits):
        shift -= w
        nb = packed_bytes(n, w)
        out |= _unpack_bits(packed[..., off : off + nb].contiguous(), w, n).to(torch.int32) << shift
        off += nb
    return out.to(torch.uint8)
