"""Fused TurboQuant encode + store of K and V into slots (paged cache or a contiguous buffer).

One program encodes ``BLOCK_N`` (token, head) rows of one component: program axis 1 picks the key
(0) or the value (1), so a single launch writes both.  Per row: ``norm = ||x||`` (float32),
``u = x / max(norm, 1e-30)``, ``y = u @ R^T`` (one ``tl.dot`` over the tile, IEEE float32, since TF32
would move codes across decision boundaries), binary search of every coordinate in the boundary
table, ``gamma = norm`` or ``norm / ||c[idx]||``, then packed codes and the scale bytes.  A row with
any NaN/Inf gets codes 0 and a NaN scale and affects nothing else (``nonfinite="propagate"``).
"""

import triton
import triton.language as tl

from tq_kernels._kernels.codes import (
    _tq_centroids,
    _tq_quantize,
    _tq_row_slots,
    _tq_store_codes,
    _tq_store_norm,
)


@triton.jit
def _tq_store_component(x_ptr, stride_x_token, stride_x_head, rows, num_rows, num_heads, slot_ptrs, valid,
                        rot_ptr, bnd_ptr, lut_ptr,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                        BITS: tl.constexpr, HI: tl.constexpr, CODE_OFF: tl.constexpr,
                        CODE_BYTES: tl.constexpr, NORM_OFF: tl.constexpr, NORM: tl.constexpr,
                        NORM_CORRECTION: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    token = (rows // num_heads).to(tl.int64)
    head = (rows % num_heads).to(tl.int64)
    x_ptrs = x_ptr + (token * stride_x_token + head * stride_x_head)[:, None] + offs_d[None, :]
    x = tl.load(x_ptrs, mask=(rows < num_rows)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)

    bad = tl.sum(((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32), axis=1) > 0
    x = tl.where(bad[:, None], 0.0, x)
    norm = tl.sqrt_rn(tl.sum(x * x, axis=1))
    u = tl.div_rn(x, tl.maximum(norm, 1e-30)[:, None])

    # rt[k, j] = R[j, k], so y = u @ rt = u @ R^T; zero padding keeps the padded columns of y at 0.
    r_ptrs = rot_ptr + offs_d[None, :] * HEAD_DIM + offs_d[:, None]
    rt = tl.load(r_ptrs, mask=d_ok[None, :] & d_ok[:, None], other=0.0)
    y = tl.dot(u, rt, input_precision="ieee")

    idx = _tq_quantize(y, bnd_ptr, offs_d, BITS, HI)
    idx = tl.where(bad[:, None] | ~d_ok[None, :], 0, idx)
    if NORM_CORRECTION:
        c = tl.where(d_ok[None, :], _tq_centroids(lut_ptr, idx, offs_d, HI), 0.0)
        gamma = tl.div_rn(norm, tl.maximum(tl.sqrt_rn(tl.sum(c * c, axis=1)), 1e-30))
    else:
        gamma = norm
    gamma = tl.where(bad, float("nan"), gamma)

    _tq_store_codes(slot_ptrs, idx, valid, CODE_OFF, CODE_BYTES, BITS, HI, BLOCK_N, BLOCK_D)
    _tq_store_norm(slot_ptrs, gamma[:, None], valid, NORM_OFF, NORM)


@triton.jit(do_not_specialize=["num_rows"])
def _tq_store_kernel(
    k_ptr, v_ptr, cache_ptr, slot_mapping_ptr, rot_ptr, k_bnd_ptr, v_bnd_ptr, k_lut_ptr, v_lut_ptr,
    num_rows, num_heads, num_slots, block_size,
    stride_k_token, stride_k_head, stride_v_token, stride_v_head,
    stride_c_block, stride_c_offset, stride_c_head,
    HAS_SLOT_MAPPING: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    SLOT_BYTES: tl.constexpr, BLOCK_S: tl.constexpr, USED_BYTES: tl.constexpr,
    K_BITS: tl.constexpr, K_HI: tl.constexpr, K_CODE_OFF: tl.constexpr, K_CODE_BYTES: tl.constexpr,
    K_NORM_OFF: tl.constexpr, K_NORM: tl.constexpr, K_NORM_BYTES: tl.constexpr, K_NC: tl.constexpr,
    V_BITS: tl.constexpr, V_HI: tl.constexpr, V_CODE_OFF: tl.constexpr, V_CODE_BYTES: tl.constexpr,
    V_NORM_OFF: tl.constexpr, V_NORM: tl.constexpr, V_NC: tl.constexpr,
):
    """Encode K and V `[num_tokens, num_heads, HEAD_DIM]` into slots; grid ``(cdiv(num_rows, BLOCK_N), 2)``.

    ``num_rows = num_tokens * num_heads``; row ``r`` is token ``r // num_heads``, head ``r % num_heads``.
    """
    pid = tl.program_id(0).to(tl.int64)
    component = tl.program_id(1)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    slot_ptrs, valid = _tq_row_slots(cache_ptr, slot_mapping_ptr, rows, num_rows, num_heads, num_slots,
                                     block_size, stride_c_block, stride_c_offset, stride_c_head,
                                     HAS_SLOT_MAPPING)
    if component == 0:
        _tq_store_component(k_ptr, stride_k_token, stride_k_head, rows, num_rows, num_heads, slot_ptrs, valid,
                            rot_ptr, k_bnd_ptr, k_lut_ptr, HEAD_DIM, BLOCK_D, BLOCK_N,
                            K_BITS, K_HI, K_CODE_OFF, K_CODE_BYTES, K_NORM_OFF, K_NORM, K_NC)
        # The key program also zeroes the bytes no component owns: alignment gaps and the padding.
        offs_s = tl.arange(0, BLOCK_S)
        CODES_END: tl.constexpr = V_CODE_OFF + V_CODE_BYTES
        K_NORM_END: tl.constexpr = K_NORM_OFF + K_NORM_BYTES
        gap = ((offs_s >= CODES_END) & (offs_s < K_NORM_OFF)) | ((offs_s >= K_NORM_END) & (offs_s < V_NORM_OFF))
        gap = gap | ((offs_s >= USED_BYTES) & (offs_s < SLOT_BYTES))
        zeros = tl.zeros([BLOCK_N, BLOCK_S], dtype=tl.uint8)
        tl.store(slot_ptrs + offs_s[None, :], zeros, mask=valid & gap[None, :])
    else:
        _tq_store_component(v_ptr, stride_v_token, stride_v_head, rows, num_rows, num_heads, slot_ptrs, valid,
                            rot_ptr, v_bnd_ptr, v_lut_ptr, HEAD_DIM, BLOCK_D, BLOCK_N,
                            V_BITS, V_HI, V_CODE_OFF, V_CODE_BYTES, V_NORM_OFF, V_NORM, V_NC)
