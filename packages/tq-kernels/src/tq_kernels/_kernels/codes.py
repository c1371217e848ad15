"""Device helpers shared by every kernel that reads or writes TurboQuant slots.

A component (key or value) stores its ``BITS``-bit codes in the plane layout of
:func:`tq_core.packing.pack_planes` and its scale ``gamma`` as float16/bfloat16/float32; where rows and
fields live in a cache is :meth:`tq_core.formats.KVFormat.region_offsets`.
"""

import triton
import triton.language as tl


@triton.jit
def _tq_load_norm_rows(region_ptrs, rows, n_mask, NORM_OFF: tl.constexpr, NORM: tl.constexpr):
    """Norms (float32 `[N]`) of rows ``rows`` of the norm array at ``NORM_OFF`` in each region.

    ``NORM``: 0 float16, 1 bfloat16, 2 float32 (the array is aligned to its element size)."""
    base = region_ptrs + NORM_OFF
    if NORM == 0:
        return tl.load(base.to(tl.pointer_type(tl.float16)) + rows, mask=n_mask, other=0.0).to(tl.float32)
    if NORM == 1:
        return tl.load(base.to(tl.pointer_type(tl.bfloat16)) + rows, mask=n_mask, other=0.0).to(tl.float32)
    return tl.load(base.to(tl.pointer_type(tl.float32)) + rows, mask=n_mask, other=0.0)


@triton.jit
def _tq_plane(
    slot_ptrs,
    n_mask,
    OFF: tl.constexpr,
    W: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One ``W``-bit plane (W in 1, 2, 4, 8) of a tile: int32 `[BLOCK_N, BLOCK_D]`, coordinate order.

    Byte ``i`` of the plane holds coordinates ``i * (8 // W) + k`` in bits ``[k W, (k + 1) W)``, so the
    tile is one contiguous `[BLOCK_N, BLOCK_D * W / 8]` byte load, expanded by constant shifts.
    """
    LP: tl.constexpr = BLOCK_D * W // 8
    offs = tl.arange(0, LP)
    m = n_mask[:, None] & (offs < HEAD_DIM * W // 8)[None, :]
    b = tl.load(slot_ptrs[:, None] + OFF + offs[None, :], mask=m, other=0).to(tl.int32)
    if W == 8:
        return b
    PER: tl.constexpr = 8 // W
    sh = tl.arange(0, PER) * W
    v = (b[:, :, None] >> sh[None, None, :]) & ((1 << W) - 1)
    return tl.reshape(v, (BLOCK_N, BLOCK_D))


@triton.jit
def _tq_load_plane_codes(
    slot_ptrs,
    n_mask,
    CODE_OFF: tl.constexpr,
    BITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Code indices (int32 `[BLOCK_N, BLOCK_D]`) of the slots ``slot_ptrs`` `[BLOCK_N]` in the plane
    layout of :func:`tq_core.packing.pack_planes`: planes of 8, 4, 2, 1 bits, high part first."""
    OFF4: tl.constexpr = CODE_OFF + HEAD_DIM * (BITS & 8) // 8
    OFF2: tl.constexpr = OFF4 + HEAD_DIM * (BITS & 4) // 8
    OFF1: tl.constexpr = OFF2 + HEAD_DIM * (BITS & 2) // 8
    code = tl.zeros([BLOCK_N, BLOCK_D], tl.int32)
    if BITS & 8:
        code = _tq_plane(slot_ptrs, n_mask, CODE_OFF, 8, HEAD_DIM, BLOCK_D, BLOCK_N)
    if BITS & 4:
        code = (code << 4) | _tq_plane(slot_ptrs, n_mask, OFF4, 4, HEAD_DIM, BLOCK_D, BLOCK_N)
    if BITS & 2:
        code = (code << 2) | _tq_plane(slot_ptrs, n_mask, OFF2, 2, HEAD_DIM, BLOCK_D, BLOCK_N)
    if BITS & 1:
        code = (code << 1) | _tq_plane(slot_ptrs, n_mask, OFF1, 1, HEAD_DIM, BLOCK_D, BLOCK_N)
    return code


@triton.jit
def _tq_centroids(lut_ptr, idx):
    """Centroid values for code indices ``idx`` `[N, BLOCK_D]`, from row 0 of a `[2, 256]` table (the
    kernels serve one code width per component)."""
    return tl.load(lut_ptr + idx)


@triton.jit
def _tq_load_norm(slot_ptrs, mask, NORM_OFF: tl.constexpr, NORM: tl.constexpr):
    """The stored scale ``gamma`` (float32) of every slot in ``slot_ptrs``; NORM: 0 fp16, 1 bf16, 2 fp32."""
    p = slot_ptrs + NORM_OFF
    b0 = tl.load(p, mask=mask, other=0).to(tl.uint32)
    b1 = tl.load(p + 1, mask=mask, other=0).to(tl.uint32)
    if NORM == 2:
        b2 = tl.load(p + 2, mask=mask, other=0).to(tl.uint32)
        b3 = tl.load(p + 3, mask=mask, other=0).to(tl.uint32)
        return (b0 | (b1 << 8) | (b2 << 16) | (b3 << 24)).to(tl.float32, bitcast=True)
    half = (b0 | (b1 << 8)).to(tl.uint16)
    if NORM == 0:
        return half.to(tl.float16, bitcast=True).to(tl.float32)
    return half.to(tl.bfloat16, bitcast=True).to(tl.float32)


@triton.jit
def _tq_row_regions(
    cache_ptr,
    slot_mapping_ptr,
    rows,
    num_rows,
    num_heads,
    num_slots,
    block_size,
    stride_c_block,
    stride_c_head,
    HAS_SLOT_MAPPING: tl.constexpr,
):
    """Region pointers, offsets in the block and a validity mask (each `[N]`) of flattened (token,
    head) ``rows`` `[N]` of a cache `[num_blocks, num_heads, block_size, slot_bytes]`.

    Row ``r`` is token ``r // num_heads`` of head ``r % num_heads``; its slot is
    ``slot_mapping[token]`` (``block * block_size + offset``), or the token itself without a mapping.
    A field of the row lives at ``region + FIELD_OFF + offset * FIELD_BYTES``
    (:meth:`tq_core.formats.KVFormat.region_offsets`); contiguous slots are the case ``block_size == 1``.
    Slots outside ``[0, num_slots)`` (``-1`` = padding) are invalid, so no kernel touches memory
    outside the cache whatever the mapping holds.
    """
    in_range = rows < num_rows
    token = rows // num_heads
    head = rows % num_heads
    if HAS_SLOT_MAPPING:
        slot = tl.load(slot_mapping_ptr + token, mask=in_range, other=-1).to(tl.int64)
    else:
        slot = token.to(tl.int64)
    valid = in_range & (slot >= 0) & (slot < num_slots)
    slot = tl.where(valid, slot, 0)
    block = slot // block_size
    offset = slot % block_size
    regions = cache_ptr + block * stride_c_block + head.to(tl.int64) * stride_c_head
    return regions, offset, valid


@triton.jit
def _tq_quantize(y, bnd_ptr, offs_d, BITS: tl.constexpr, HI: tl.constexpr):
    """Code indices (int32) of rotated coordinates ``y`` `[N, BLOCK_D]`: ``#{k : boundary[k] < y}``.

    The same rule as ``torch.bucketize(y, boundaries)`` (a tie goes to the lower cell), found by a
    binary search in the ``[2, 256]`` boundary table (``+inf`` padded, row 1 for the first ``HI``
    coordinates).  NaN compares false everywhere and gets index 0.
    """
    STEPS: tl.constexpr = BITS + (HI > 0)
    base = bnd_ptr + (offs_d < HI).to(tl.int32)[None, :] * 256
    idx = tl.zeros(y.shape, dtype=tl.int32)
    for s in tl.static_range(STEPS):
        step = 1 << (STEPS - 1 - s)  # constexpr: s is a static_range index
        b = tl.load(base + idx + (step - 1))
        idx = tl.where(b < y, idx + step, idx)
    return idx


@triton.jit
def _tq_store_plane(
    slot_ptrs,
    part,
    mask,
    OFF: tl.constexpr,
    W: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Write one ``W``-bit plane (W in 1, 2, 4, 8) of ``part`` `[BLOCK_N, BLOCK_D]` (values < 2**W):
    byte ``i`` gets coordinates ``i * (8 // W) + k`` in bits ``[k W, (k + 1) W)``, the inverse of
    :func:`_tq_plane`; one contiguous `[BLOCK_N, HEAD_DIM * W / 8]` byte store per tile."""
    PER: tl.constexpr = 8 // W
    LP: tl.constexpr = BLOCK_D * W // 8
    sh = tl.arange(0, PER) * W
    b = tl.sum(tl.reshape(part, (BLOCK_N, LP, PER)) << sh[None, None, :], axis=2)  # fields never overlap
    offs = tl.arange(0, LP)
    m = mask[:, None] & (offs < HEAD_DIM * W // 8)[None, :]
    tl.store(slot_ptrs[:, None] + OFF + offs[None, :], b.to(tl.uint8), mask=m)


@triton.jit
def _tq_store_plane_codes(
    slot_ptrs,
    idx,
    mask,
    CODE_OFF: tl.constexpr,
    BITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Pack code indices ``idx`` (int32 `[BLOCK_N, BLOCK_D]`) into the slots ``slot_ptrs`` `[BLOCK_N]`
    (rows where ``mask``) in the plane layout of :func:`tq_core.packing.pack_planes`, the inverse of
    :func:`_tq_load_plane_codes`: plane ``w`` holds bits ``[BITS & (w - 1), +w)`` of every index."""
    OFF4: tl.constexpr = CODE_OFF + HEAD_DIM * (BITS & 8) // 8
    OFF2: tl.constexpr = OFF4 + HEAD_DIM * (BITS & 4) // 8
    OFF1: tl.constexpr = OFF2 + HEAD_DIM * (BITS & 2) // 8
    if BITS & 8:
        _tq_store_plane(slot_ptrs, idx, mask, CODE_OFF, 8, HEAD_DIM, BLOCK_D, BLOCK_N)
    if BITS & 4:
        _tq_store_plane(slot_ptrs, (idx >> (BITS & 3)) & 15, mask, OFF4, 4, HEAD_DIM, BLOCK_D, BLOCK_N)
    if BITS & 2:
        _tq_store_plane(slot_ptrs, (idx >> (BITS & 1)) & 3, mask, OFF2, 2, HEAD_DIM, BLOCK_D, BLOCK_N)
    if BITS & 1:
        _tq_store_plane(slot_ptrs, idx & 1, mask, OFF1, 1, HEAD_DIM, BLOCK_D, BLOCK_N)


@triton.jit
def _tq_f32_to_bf16_bits(x):
    """bfloat16 bit pattern (uint32 holding 16 bits) of float32 ``x``, rounded to nearest even.

    Done with integer arithmetic, as torch does on the CPU, because Triton's interpreter truncates
    float32 -> bfloat16 casts; NaN becomes the quiet NaN 0x7FC0.
    """
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(x != x, 0x7FC0, rounded)


@triton.jit
def _tq_store_norm(slot_ptrs, gamma, mask, NORM_OFF: tl.constexpr, NORM: tl.constexpr):
    """Write the scale ``gamma`` (float32, shaped like ``slot_ptrs``) little-endian; NORM: 0 fp16, 1 bf16, 2 fp32.

    float16 saturates at +-65504 instead of overflowing to inf (NaN stays NaN), like
    ``tq_core.formats._norm_to_bytes``.
    """
    NBYTES: tl.constexpr = 4 if NORM == 2 else 2
    if NORM == 2:
        bits = gamma.to(tl.uint32, bitcast=True)
    elif NORM == 1:
        bits = _tq_f32_to_bf16_bits(gamma)
    else:
        # comparisons, not minimum/maximum: those may drop a NaN on the GPU
        g = tl.where(gamma > 65504.0, 65504.0, tl.where(gamma < -65504.0, -65504.0, gamma))
        bits = g.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
    for i in tl.static_range(NBYTES):
        tl.store(slot_ptrs + NORM_OFF + i, ((bits >> (8 * i)) & 0xFF).to(tl.uint8), mask=mask)


@triton.jit
def _tq_phase_code(words, P: tl.constexpr, BITS: tl.constexpr):
    """Code of phase ``P`` (coordinate ``8w + P``) in words of :func:`_tq_load_words`."""
    if BITS == 4:
        return (words >> (4 * P)) & 15
    else:
        return ((words >> (2 * P)) & 3) * 2 + ((words >> (16 + P)) & 1)


@triton.jit
def _tq_pair_table(lut_ptr):
    """The five int32 table registers of the pair lookup, stored after a byte table's sixteen float16
    entries (:class:`tq_kernels._format.ByteLookup`)."""
    tab = lut_ptr.to(tl.pointer_type(tl.int32)) + 8
    return tl.load(tab), tl.load(tab + 1), tl.load(tab + 2), tl.load(tab + 3), tl.load(tab + 4)


@triton.jit
def _tq_nibble_phases(words, lut_ptr, ASM: tl.constexpr, BITS: tl.constexpr = 4, PAIRS: tl.constexpr = 0,
                      tab=None):  # fmt: skip
    """The eight codes of each int32 word (``tq_kernels._kernels.decode._tq_load_words``: a 4-bit
    plane's word, or a 3-bit row's 2-bit and 1-bit plane bytes) as eight float16 tensors shaped like
    ``words``: tensor ``p`` holds the centroid of coordinate ``8w + p``.

    ``ASM`` (from :func:`tq_kernels._nibble_lut.lut_asm`) looks the codes up in registers on NVIDIA
    GPUs; ``""`` gathers them from the float16 table at ``lut_ptr`` (the interpreter, other GPUs).
    ``PAIRS``: ``ASM`` is :func:`tq_kernels._nibble_lut.pair_lut_asm`, which reads a thread's words two
    at a time and returns float16 pairs, the operand pairs of the tensor-core products where ``words``
    sits in their layout; ``tab`` holds its five table registers (:func:`_tq_pair_table`).
    """
    if ASM != "" and PAIRS:
        # the table registers are operands (loaded once), not constants in the PTX: ptxas re-materialized
        # those before every call
        return tl.inline_asm_elementwise(
            ASM,
            "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r,r",
            [words, tab[0], tab[1], tab[2], tab[3], tab[4]],
            dtype=(
                tl.float16,
                tl.float16,
                tl.float16,
                tl.float16,
                tl.float16,
                tl.float16,
                tl.float16,
                tl.float16,
            ),
            is_pure=True,
            pack=2,
        )
    elif ASM != "":
        return tl.inline_asm_elementwise(
            ASM,
            "=h,=h,=h,=h,=h,=h,=h,=h,r",
            [words],
            dtype=(
                tl.float16,
                tl.float16,
                tl.float16,
                tl.float16,
                tl.float16,
                tl.float16,
                tl.float16,
                tl.float16,
            ),
            is_pure=True,
            pack=1,
        )
    else:
        return (
            tl.load(lut_ptr + _tq_phase_code(words, 0, BITS)),
            tl.load(lut_ptr + _tq_phase_code(words, 1, BITS)),
            tl.load(lut_ptr + _tq_phase_code(words, 2, BITS)),
            tl.load(lut_ptr + _tq_phase_code(words, 3, BITS)),
            tl.load(lut_ptr + _tq_phase_code(words, 4, BITS)),
            tl.load(lut_ptr + _tq_phase_code(words, 5, BITS)),
            tl.load(lut_ptr + _tq_phase_code(words, 6, BITS)),
            tl.load(lut_ptr + _tq_phase_code(words, 7, BITS)),
        )
