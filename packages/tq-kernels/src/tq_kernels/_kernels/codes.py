"""Device helpers shared by every kernel that reads or writes TurboQuant slots.

A component (key or value) stores coordinate ``j`` at bit ``j * BITS + min(j, HI)`` of its code bytes,
``BITS + (j < HI)`` bits wide; its scale ``gamma`` is a float16/bfloat16/float32 at ``NORM_OFF``.
"""

import triton
import triton.language as tl


@triton.jit
def _bit_offset(offs_d, BITS: tl.constexpr, HI: tl.constexpr):
    return offs_d * BITS + tl.minimum(offs_d, HI)


@triton.jit
def _tq_load_codes(
    slot_ptrs,
    offs_d,
    mask,
    CODE_OFF: tl.constexpr,
    BITS: tl.constexpr,
    HI: tl.constexpr,
    TWO_BYTES: tl.constexpr,
):
    """Code indices (int32) of tile `[N, BLOCK_D]`; ``slot_ptrs`` `[N, 1]` point at slot starts."""
    bit = _bit_offset(offs_d, BITS, HI)[None, :]
    byte_ptrs = slot_ptrs + CODE_OFF + (bit >> 3)
    word = tl.load(byte_ptrs, mask=mask, other=0).to(tl.int32)
    if TWO_BYTES:
        word = word | (tl.load(byte_ptrs + 1, mask=mask, other=0).to(tl.int32) << 8)
    width = BITS + (offs_d < HI).to(tl.int32)[None, :]
    return (word >> (bit & 7)) & ((1 << width) - 1)


@triton.jit
def _tq_centroids(lut_ptr, idx, offs_d, HI: tl.constexpr):
    """Centroid values (float32) for code indices ``idx`` `[N, BLOCK_D]` from a `[2, 256]` table."""
    row = (offs_d < HI).to(tl.int32)[None, :] * 256
    return tl.load(lut_ptr + row + idx)


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
def _tq_row_slots(
    cache_ptr,
    slot_mapping_ptr,
    rows,
    num_rows,
    num_heads,
    num_slots,
    block_size,
    stride_c_block,
    stride_c_offset,
    stride_c_head,
    HAS_SLOT_MAPPING: tl.constexpr,
):
    """Slot pointers `[N, 1]` and a validity mask `[N, 1]` for flattened (token, head) ``rows`` `[N]`.

    Row ``r`` is token ``r // num_heads`` of head ``r % num_heads``; its slot is
    ``slot_mapping[token]`` (``block * block_size + offset``), or the token itself without a mapping.
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
    ptrs = cache_ptr + block * stride_c_block + offset * stride_c_offset + head.to(tl.int64) * stride_c_head
    return ptrs[:, None], valid[:, None]


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
        step: tl.constexpr = 1 << (STEPS - 1 - s)
        b = tl.load(base + idx + (step - 1))
        idx = tl.where(b < y, idx + step, idx)
    return idx


@triton.jit
def _tq_store_codes(
    slot_ptrs,
    idx,
    mask,
    CODE_OFF: tl.constexpr,
    CODE_BYTES: tl.constexpr,
    BITS: tl.constexpr,
    HI: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Pack code indices ``idx`` `[BLOCK_N, BLOCK_D]` (zero past head_dim) into the slots ``slot_ptrs``.

    ``HI`` is a multiple of 8, so each group of 8 coordinates has one width ``w``: its codes make
    exactly ``w`` bytes, assembled in one int64 word (fields do not overlap, so a sum is an OR).
    ``mask`` `[BLOCK_N, 1]` selects the rows to write; bytes past ``CODE_BYTES`` are never written.
    """
    NG: tl.constexpr = BLOCK_D // 8
    offs_d = tl.arange(0, BLOCK_D)
    width = BITS + (offs_d < HI).to(tl.int32)
    shift = ((offs_d % 8) * width).to(tl.int64)
    fields = idx.to(tl.int64) << shift[None, :]
    words = tl.sum(tl.reshape(fields, [BLOCK_N, NG, 8]), axis=2)  # [BLOCK_N, NG]
    g = tl.arange(0, NG)
    g_width = BITS + (g < HI // 8).to(tl.int32)
    g_byte = g * BITS + tl.minimum(g, HI // 8)
    k = tl.arange(0, 8)
    byte_off = g_byte[:, None] + k[None, :]  # [NG, 8]
    byte_ok = (k[None, :] < g_width[:, None]) & (byte_off < CODE_BYTES)
    vals = (words[:, :, None] >> (k * 8).to(tl.int64)[None, None, :]) & 0xFF
    ptrs = slot_ptrs[:, :, None] + CODE_OFF + byte_off[None, :, :]
    tl.store(ptrs, vals.to(tl.uint8), mask=mask[:, :, None] & byte_ok[None, :, :])


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
    """Write the scale ``gamma`` (float32 `[N, 1]`) little-endian; NORM: 0 fp16, 1 bf16, 2 fp32.

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
