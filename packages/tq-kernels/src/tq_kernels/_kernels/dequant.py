"""TurboQuant slots back to K and V: ``x = (gamma * c[idx]) @ R`` (``R^T c`` per row, IEEE float32).

One program decodes ``BLOCK_N`` (token, head) rows of one component; program axis 1 picks the key (0)
or the value (1).  Rows whose slot is ``-1`` (or outside the cache) come out as zeros.  Fields are
addressed as in :mod:`tq_kernels._kernels.store` (``region + FIELD_OFF + offset * FIELD_ROW``).
"""

import triton
import triton.language as tl

from tq_kernels._kernels.codes import (
    _tq_centroids,
    _tq_f32_to_bf16_bits,
    _tq_load_norm,
    _tq_load_plane_codes,
    _tq_row_regions,
)


@triton.jit
def _tq_dequant_component(
    out_ptr,
    rows,
    num_rows,
    code_ptrs,
    norm_ptrs,
    valid,
    rot_ptr,
    lut_ptr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BITS: tl.constexpr,
    NORM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    idx = _tq_load_plane_codes(code_ptrs, valid, 0, BITS, HEAD_DIM, BLOCK_D, BLOCK_N)
    gamma = _tq_load_norm(norm_ptrs, valid, 0, NORM)
    mask = valid[:, None] & d_ok[None, :]
    c = tl.where(mask, _tq_centroids(lut_ptr, idx) * gamma[:, None], 0.0)
    # the rotation in column blocks of at most 128: at head_dim 256 the whole float32 matrix (256 KiB)
    # exceeds Hopper's shared memory (227 KiB); a 256 x 128 block takes half
    COLS: tl.constexpr = BLOCK_D if BLOCK_D <= 128 else 128
    for j in tl.static_range(0, BLOCK_D, COLS):
        offs_o = j + tl.arange(0, COLS)
        o_ok = offs_o < HEAD_DIM
        rot = tl.load(
            rot_ptr + offs_d[:, None] * HEAD_DIM + offs_o[None, :],
            mask=d_ok[:, None] & o_ok[None, :],
            other=0.0,
        )
        x = tl.dot(c, rot, input_precision=DOT_PRECISION)
        x = tl.where(valid[:, None], x, 0.0)
        out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * HEAD_DIM + offs_o[None, :]
        out_mask = (rows < num_rows)[:, None] & o_ok[None, :]
        if out_ptr.dtype.element_ty == tl.bfloat16:
            # the interpreter truncates float32 -> bfloat16 casts; round to nearest even on every backend
            x = _tq_f32_to_bf16_bits(x).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        tl.store(out_ptrs, x.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=["num_rows"])
def _tq_dequant_kernel(
    cache_ptr,
    slot_mapping_ptr,
    rot_ptr,
    k_lut_ptr,
    v_lut_ptr,
    k_out_ptr,
    v_out_ptr,
    num_rows,
    num_heads,
    num_slots,
    block_size,
    stride_c_block,
    stride_c_head,
    HAS_SLOT_MAPPING: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_BITS: tl.constexpr,
    K_CODE_OFF: tl.constexpr,
    K_CODE_ROW: tl.constexpr,
    K_NORM_OFF: tl.constexpr,
    K_NORM: tl.constexpr,
    K_NORM_ROW: tl.constexpr,
    V_BITS: tl.constexpr,
    V_CODE_OFF: tl.constexpr,
    V_CODE_ROW: tl.constexpr,
    V_NORM_OFF: tl.constexpr,
    V_NORM: tl.constexpr,
    V_NORM_ROW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Decode rows into contiguous K and V `[num_tokens, num_heads, HEAD_DIM]`; grid ``(cdiv(num_rows, BLOCK_N), 2)``."""
    pid = tl.program_id(0).to(tl.int64)
    component = tl.program_id(1)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    regions, offset, valid = _tq_row_regions(
        cache_ptr,
        slot_mapping_ptr,
        rows,
        num_rows,
        num_heads,
        num_slots,
        block_size,
        stride_c_block,
        stride_c_head,
        HAS_SLOT_MAPPING,
    )
    if component == 0:
        _tq_dequant_component(
            k_out_ptr, rows, num_rows, regions + K_CODE_OFF + offset * K_CODE_ROW,
            regions + K_NORM_OFF + offset * K_NORM_ROW, valid, rot_ptr, k_lut_ptr, HEAD_DIM, BLOCK_D, BLOCK_N,
            K_BITS, K_NORM, DOT_PRECISION,
        )  # fmt: skip
    else:
        _tq_dequant_component(
            v_out_ptr, rows, num_rows, regions + V_CODE_OFF + offset * V_CODE_ROW,
            regions + V_NORM_OFF + offset * V_NORM_ROW, valid, rot_ptr, v_lut_ptr, HEAD_DIM, BLOCK_D, BLOCK_N,
            V_BITS, V_NORM, DOT_PRECISION,
        )  # fmt: skip
