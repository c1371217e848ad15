"""Formats and slot comparisons shared by the store and dequantize tests.

The reference is tq_core (``KVFormat.encode`` / ``store_paged`` / ``decode``).  A kernel computes the
norm and the rotation in float32 in another order than torch, so two things may differ from the
reference, and :func:`assert_slots_match` allows exactly these:

* a code one cell off where the reference rotated coordinate lies within ``TIE_ATOL`` of the decision
  boundary between the two cells (a tie at float32 resolution), for at most ``TIE_FRACTION`` of them;
* a scale a few float32 ulps off (``float32`` norms), which for float16/bfloat16 norms can flip the
  final rounding by one ulp of the stored dtype, for at most ``FLIP_FRACTION`` of the vectors;
* with gain search, the codes of another gain where two gains score alike at float32 resolution: the
  kernel's codes must be one gain's candidate (up to the boundary ties above) whose ``cos^2`` is within
  ``GAIN_TIE_RTOL`` of the reference's choice, for at most ``TIE_FRACTION`` of the vectors (or 2).

Everything else (the other code bytes, alignment gaps, padding) must be byte-identical.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from tq_core import ComponentFormat, KVFormat, format_names, named_format
from tq_core.quantizers import GAIN_GRID
from tq_core.testing import rel_err

FORMAT_NAMES = [*format_names(), "f32norm", "bf16norm", "rawnorm"]

# (num_tokens, num_kv_heads, head_dim, format, block_size, dtype, layer) for the CPU suites; dtype is
# the input's (store) or the output's (dequantize).  Codebooks of 4 bits and more take seconds to
# solve at head_dim >= 80 (tq_core caches them per process), so the wider formats run at fewer head
# dims here; the GPU tests run every format at 128.
CPU_CASES = [
    (7, 2, 128, "turboquant_4bit_nc", 16, "bf16", 0),
    (7, 2, 128, "turboquant_k8v4", 4, "fp16", 0),
    (7, 2, 128, "turboquant_3bit_nc", 4, "fp32", 0),
    (7, 2, 128, "turboquant_k3v4_nc", 16, "bf16", 0),
    (7, 2, 128, "f32norm", 16, "fp16", 0),
    (7, 2, 96, "bf16norm", 4, "bf16", 0),
    (7, 2, 64, "rawnorm", 16, "fp32", 0),
    (7, 2, 80, "turboquant_4bit_nc", 4, "fp32", 0),
    (7, 2, 80, "turboquant_3bit_nc", 16, "bf16", 0),
    (7, 2, 80, "f32norm", 4, "bf16", 0),  # an alignment gap before the norms
    (7, 2, 96, "turboquant_k3v4_nc", 16, "fp16", 0),
    (7, 2, 96, "turboquant_3bit_nc", 4, "fp32", 0),
    (7, 2, 64, "turboquant_k8v4", 4, "bf16", 0),
    (7, 2, 64, "bf16norm", 16, "fp16", 0),
    # head_dim 256: the dequant kernel multiplies by the rotation in column blocks (the whole float32
    # matrix does not fit Hopper's shared memory)
    (5, 1, 256, "turboquant_4bit_nc", 16, "bf16", 1),
    (7, 2, 64, "turboquant_4bit_nc", 16, "fp32", 0),
    (7, 2, 64, "f32norm", 4, "fp16", 0),
    (1, 1, 128, "turboquant_4bit_nc", 16, "bf16", 0),
    (1, 3, 80, "f32norm", 4, "fp32", 2),
    (21, 3, 96, "turboquant_k3v4_nc", 4, "fp16", 5),
]


def case_id(c: tuple) -> str:
    return f"T{c[0]}-H{c[1]}-D{c[2]}-{c[3]}-bs{c[4]}-{c[5]}" + (f"-layer{c[6]}" if c[6] else "")


def cpu_params() -> list:
    """:data:`CPU_CASES` as pytest params; the 7/8-bit format is ``slow`` (its codebooks take ~10 s)."""
    return [pytest.param(*c, id=case_id(c), marks=SLOW_FORMATS.get(c[3], ())) for c in CPU_CASES]


SLOW_FORMATS = {"rawnorm": pytest.mark.slow}


TIE_ATOL = 1e-5
TIE_FRACTION = 1e-3
FLIP_FRACTION = 0.01
# Largest relative difference of a stored scale: one ulp of the storage dtype; float32 scales come
# from a norm summed in another order (and a division by ||c||), a few ulps.
GAMMA_RTOL = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-20}
# Relative RMS error between decoded values of the kernel's slots and of the reference's, on vectors
# whose codes agree and whose 16-bit scales rounded alike.
DECODE_RTOL = 1e-5
# Two gains' cos^2 closer than this are a tie at float32 resolution (the kernel sums y . c in another order).
GAIN_TIE_RTOL = 1e-5


def make_format(name: str, head_dim: int) -> KVFormat:
    """A named format, or a custom one exercising what named formats do not: float32 norms (with an
    alignment gap before them at head_dim 80, and padding after), bfloat16 norms, raw norms (no
    correction) and a Haar rotation.  With the named ones every code width 1..8 (every plane mix) occurs."""
    if name in format_names():
        return named_format(name, head_dim)
    if name == "f32norm":
        key, value = ComponentFormat(2, 0, "float32"), ComponentFormat(3, 0, "float32")
        used = KVFormat(head_dim, key, value).used_bytes
        return KVFormat(head_dim, key, value, slot_bytes=used + 5, name=name, seed=7)
    if name == "bf16norm":
        return KVFormat(
            head_dim, ComponentFormat(5, 0, "bfloat16"), ComponentFormat(1, 0, "bfloat16"), name=name
        )
    if name == "rawnorm":
        return KVFormat(
            head_dim,
            ComponentFormat(7, 0, norm_correction=False),
            ComponentFormat(8, 0, norm_correction=False),
            name=name,
            rotation="haar",
        )
    raise ValueError(name)


def generator(*parts: object) -> torch.Generator:
    """A generator seeded from a test's parameters: fresh inputs per case, reproducible per case."""
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def reference_rotated(fmt: KVFormat, x: torch.Tensor, layer: int) -> torch.Tensor:
    """``y = R x / ||x||`` as the reference quantizer computes it (non-finite vectors as zeros)."""
    x32 = x.to(torch.float32)
    x32 = torch.where(torch.isfinite(x32).all(-1, keepdim=True), x32, torch.zeros_like(x32))
    norm = x32.norm(dim=-1, keepdim=True)
    return fmt.quantizers(layer)[0].rotation.apply(x32 / norm.clamp_min(1e-30))


def _boundary(fmt: KVFormat, comp: ComponentFormat, layer: int, lower: torch.Tensor) -> torch.Tensor:
    """Boundary between cells ``lower`` and ``lower + 1`` of every coordinate `[N, d]`."""
    q = fmt.quantizers(layer)[0 if comp is fmt.key else 1]
    lo = q.codebook.boundaries.to(torch.float32)
    out = lo[lower.clamp_max(lo.numel() - 1)]
    if comp.hi_bits_coords:
        hi = q.codebook_hi.boundaries.to(torch.float32)
        h = comp.hi_bits_coords
        out[..., :h] = hi[lower[..., :h]]
    return out


def _boundary_ties(
    fmt: KVFormat, comp: ComponentFormat, layer: int, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """bool `[N, d]`: codes ``a`` and ``b`` of rotated coordinates ``y`` agree, or sit in neighbouring
    cells with ``y`` within ``TIE_ATOL`` of the boundary between them."""
    lower = torch.minimum(a, b).long()
    gap = (y - _boundary(fmt, comp, layer, lower)).abs()
    step = (a.int() - b.int()).abs()
    return (a == b) | ((step == 1) & (gap < TIE_ATOL))


def _gain_ties(
    fmt: KVFormat, comp: ComponentFormat, layer: int, y: torch.Tensor, got: torch.Tensor, want: torch.Tensor
) -> bool:
    """Whether each row of ``got`` is one gain's candidate codes of ``y`` (up to boundary ties) scoring
    ``cos^2`` within ``GAIN_TIE_RTOL`` of the reference's codes ``want``."""
    q = fmt.quantizers(layer)[0 if comp is fmt.key else 1]
    candidate = torch.zeros(y.shape[0], dtype=torch.bool)
    for gain in GAIN_GRID:
        yg = y / torch.tensor(gain, dtype=torch.float32)
        candidate |= _boundary_ties(fmt, comp, layer, yg, got, q.nearest_codes(yg)).all(-1)

    def score(idx: torch.Tensor) -> torch.Tensor:
        c = q.centroids(idx).double()
        return (y.double() * c).sum(-1).square() / (c * c).sum(-1).clamp_min(1e-300)

    close = (score(got) - score(want)).abs() <= GAIN_TIE_RTOL * score(want)
    return bool((candidate & close).all())


def _regions(fmt: KVFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte masks `[slot_bytes]` of the code bytes and of the norm bytes."""
    codes = torch.zeros(fmt.slot_bytes, dtype=torch.bool)
    codes[: fmt.value_code_offset + fmt.value.code_bytes(fmt.head_dim)] = True
    norms = torch.zeros(fmt.slot_bytes, dtype=torch.bool)
    norms[fmt.key_norm_offset : fmt.key_norm_offset + fmt.key.norm_bytes] = True
    norms[fmt.value_norm_offset : fmt.value_norm_offset + fmt.value.norm_bytes] = True
    return codes, norms


def read_paged_slots(fmt: KVFormat, cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Encoded slots uint8 `[n, num_kv_heads, slot_bytes]` of ``slots`` (all in range) in a paged cache
    `[num_blocks, num_kv_heads, block_size, slot_bytes]`, gathered through the reference's own map of
    a (block, head) region (``KVFormat._region_map``), so the kernels are checked against it."""
    nb, h, bs, s = cache.shape
    slots = slots.long().to(cache.device)
    regions = cache.reshape(nb, h, bs * s)
    rmap = fmt._region_map(bs, cache.device)[slots % bs]  # [n, slot_bytes]
    heads = torch.arange(h, device=cache.device)[None, :, None]
    return regions[(slots // bs)[:, None, None], heads, rmap[:, None, :]]


def paged_slot_bytes(fmt: KVFormat, cache_shape: tuple[int, ...], slots: torch.Tensor) -> torch.Tensor:
    """bool mask of ``cache_shape``: the bytes that belong to the slots ``slots`` (all in range)."""
    nb, h, bs, s = cache_shape
    mask = torch.zeros(nb, h, bs * s, dtype=torch.bool)
    slots = slots.long().cpu()
    rmap = fmt._region_map(bs, "cpu")[slots % bs]
    mask[(slots // bs)[:, None, None], torch.arange(h)[None, :, None], rmap[:, None, :]] = True
    return mask.view(cache_shape)


def assert_slots_match(
    got: torch.Tensor,
    want: torch.Tensor,
    fmt: KVFormat,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    layer: int = 0,
) -> torch.Tensor:
    """Compare kernel slots ``got`` with reference slots ``want`` (uint8 `[N, slot_bytes]`) that encode
    ``key``/``value`` `[N, d]`.  Returns a bool `[N]` of the vectors whose slots are byte-identical."""
    got, want = got.cpu().reshape(-1, fmt.slot_bytes), want.cpu().reshape(-1, fmt.slot_bytes)
    key, value = key.cpu().reshape(-1, fmt.head_dim), value.cpu().reshape(-1, fmt.head_dim)
    n = got.shape[0]
    code_bytes, norm_bytes = _regions(fmt)
    other = ~(code_bytes | norm_bytes)
    assert torch.equal(got[:, other], want[:, other]), "alignment gap / padding bytes differ"

    ties = torch.zeros(n, dtype=torch.bool)
    flips = torch.zeros(n, dtype=torch.bool)
    for comp, g, w, x in zip(
        (fmt.key, fmt.value), fmt.decode_codes(got), fmt.decode_codes(want), (key, value), strict=True
    ):
        diff = g.idx != w.idx
        if diff.any():
            y = reference_rotated(fmt, x, layer)
            boundary_tie = _boundary_ties(fmt, comp, layer, y, g.idx, w.idx).all(-1)
            if comp.gain_search:
                other_gain = ~boundary_tie
                if other_gain.any():
                    assert _gain_ties(
                        fmt, comp, layer, y[other_gain], g.idx[other_gain], w.idx[other_gain]
                    ), "codes differ and are not the codes of an equally good gain"
                    assert int(other_gain.sum()) <= max(2, TIE_FRACTION * n), (
                        f"{int(other_gain.sum())} vectors chose another gain"
                    )
                diff = diff & boundary_tie[:, None]
            else:
                assert bool(boundary_tie.all()), (
                    "a code differs by more than one cell or away from a boundary"
                )
            assert int(diff.sum()) <= max(2, TIE_FRACTION * diff.numel()), f"{int(diff.sum())} tie mismatches"
        tie = (g.idx != w.idx).any(-1)
        ties |= tie

        # With equal codes the scales may differ by float32 rounding only (NaN exactly where NaN).
        gg, wg = g.gamma[~tie], w.gamma[~tie]
        assert torch.equal(gg.isnan(), wg.isnan()), "NaN scales differ"
        fin = ~wg.isnan()
        rel = (gg[fin] - wg[fin]).abs() / wg[fin].abs().clamp_min(1e-30)
        if rel.numel():
            assert float(rel.max()) <= GAMMA_RTOL[comp.norm_dtype], f"scale off by {float(rel.max()):.3g}"
        if comp.norm_dtype != "float32":
            flip = (g.gamma != w.gamma) & ~(g.gamma.isnan() & w.gamma.isnan()) & ~tie
            assert int(flip.sum()) <= max(2, FLIP_FRACTION * n), (
                f"{int(flip.sum())} scales rounded differently"
            )
            flips |= flip

    same = ~ties
    assert torch.equal(got[same][:, code_bytes], want[same][:, code_bytes]), "packed code bytes differ"
    # Store-then-decode equals encode-decode on every vector whose codes agree and whose 16-bit scale
    # rounded the same way (the others are bounded above by one ulp of their scale).
    same &= ~flips
    for a, b in zip(fmt.decode(got[same], layer=layer), fmt.decode(want[same], layer=layer), strict=True):
        fin = torch.isfinite(b).all(-1)
        assert torch.equal(torch.isfinite(a).all(-1), fin), "non-finite decoded vectors differ"
        if fin.any():
            err = rel_err(a[fin], b[fin], dtype=torch.float64)
            assert err < DECODE_RTOL, f"decoded values differ: relative RMS {err:.3g}"
    return (got == want).all(-1)
