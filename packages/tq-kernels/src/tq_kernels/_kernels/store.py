"""Fused TurboQuant encode + store of K and V into a paged cache's block regions (or contiguous slots).

One program encodes ``BLOCK_N`` (token, head) rows of one component: program axis 1 picks the key
(0) or the value (1), so a single launch writes both.  Per row: ``norm = ||x||`` (float32),
``u = x / max(norm, 1e-30)``, ``y = u @ R^T`` (``tl.dot`` over ``K_CHUNK`` input coordinates at a
time, float32-accurate: plain TF32 would move codes across decision boundaries), binary search of every coordinate in the
boundary table (with ``GAIN_SEARCH``: of ``y / g`` for each gain ``g`` of the ``NUM_GAINS``-entry
table, keeping the codes of the first best ``(y . c)^2 / (c . c)``, as
:meth:`tq_core.quantizers.TurboQuantMSE.quantize_rotated`), ``gamma = norm`` or ``norm / ||c[idx]||``,
then the code planes and the scale bytes.
A row with any NaN/Inf gets codes 0 and a NaN scale and affects nothing else
(``nonfinite="propagate"``).

Every field of a row lives at ``region + FIELD_OFF + offset * FIELD_ROW`` (see ``_tq_row_regions``):
in a paged cache the arrays of :meth:`tq_core.formats.KVFormat.region_offsets`, in contiguous slots
(``block_size == 1``) the slot's own byte offsets.  Bytes that hold no field (alignment gaps, budget
padding) are zeroed: from ``PAD_OFF + offset * PAD_ROW``, the bytes in ``[G0, G1)``, ``[G2, G3)``
and ``[G4, G5)``.
"""

import triton
import triton.language as tl

from tq_kernels._kernels.codes import (
    _tq_centroids,
    _tq_quantize,
    _tq_row_regions,
    _tq_store_norm,
    _tq_store_plane_codes,
)


@triton.jit
def _tq_store_component(
    x_ptr,
    stride_x_token,
    stride_x_head,
    rows,
    num_rows,
    num_heads,
    code_ptrs,
    norm_ptrs,
    valid,
    rot_ptr,
    bnd_ptr,
    lut_ptr,
    gain_ptr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_CHUNK: tl.constexpr,
    BITS: tl.constexpr,
    NORM: tl.constexpr,
    NORM_CORRECTION: tl.constexpr,
    GAIN_SEARCH: tl.constexpr,
    NUM_GAINS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    token = (rows // num_heads).to(tl.int64)
    head = (rows % num_heads).to(tl.int64)
    row_ptrs = x_ptr + (token * stride_x_token + head * stride_x_head)
    row_ok = rows < num_rows
    x = tl.load(row_ptrs[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    x = x.to(tl.float32)

    bad = tl.sum(((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32), axis=1) > 0
    # correctly rounded sqrt and division (Triton's defaults are approximate on the GPU)
    norm = tl.sqrt_rn(tl.sum(tl.where(bad[:, None], 0.0, x * x), axis=1))
    inv_den = tl.maximum(norm, 1e-30)

    # y = u @ R^T, accumulated over K_CHUNK input coordinates at a time (rt[k, j] = R[j, k]): a whole
    # [BLOCK_D, BLOCK_D] float32 rotation tile would take 128 registers a thread at 4 warps and spill.
    # The chunk of x is loaded again (a cache hit) instead of slicing the register tile.
    y = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for c in tl.static_range(BLOCK_D // K_CHUNK):
        offs_k = c * K_CHUNK + tl.arange(0, K_CHUNK)
        k_ok = offs_k < HEAD_DIM
        # non-finite rows are masked off here (a tl.where on the chunk trips Triton 3.6's tf32 lowering)
        xc = tl.load(
            row_ptrs[:, None] + offs_k[None, :], mask=(row_ok & ~bad)[:, None] & k_ok[None, :], other=0.0
        )
        uc = tl.div_rn(xc.to(tl.float32), inv_den[:, None])
        r_ptrs = rot_ptr + offs_d[None, :] * HEAD_DIM + offs_k[:, None]
        rt = tl.load(r_ptrs, mask=d_ok[None, :] & k_ok[:, None], other=0.0)
        y += tl.dot(uc, rt, input_precision=DOT_PRECISION)

    if GAIN_SEARCH:
        idx = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.int32)
        best = tl.full([BLOCK_N], -1.0, dtype=tl.float32)
        for i in tl.static_range(NUM_GAINS):
            gain = tl.load(gain_ptr + i)
            cand = tl.where(d_ok[None, :], _tq_quantize(tl.div_rn(y, gain), bnd_ptr, offs_d, BITS, 0), 0)
            c = tl.where(d_ok[None, :], _tq_centroids(lut_ptr, cand), 0.0)
            yc = tl.sum(y * c, axis=1)
            score = tl.div_rn(yc * yc, tl.maximum(tl.sum(c * c, axis=1), 1e-30))
            better = score > best
            idx = tl.where(better[:, None], cand, idx)
            best = tl.where(better, score, best)
    else:
        idx = _tq_quantize(y, bnd_ptr, offs_d, BITS, 0)
    idx = tl.where(bad[:, None] | ~d_ok[None, :], 0, idx)
    if NORM_CORRECTION:
        c = tl.where(d_ok[None, :], _tq_centroids(lut_ptr, idx), 0.0)
        gamma = tl.div_rn(norm, tl.maximum(tl.sqrt_rn(tl.sum(c * c, axis=1)), 1e-30))
    else:
        gamma = norm
    gamma = tl.where(bad, float("nan"), gamma)

    _tq_store_plane_codes(code_ptrs, idx, valid, 0, BITS, HEAD_DIM, BLOCK_D, BLOCK_N)
    _tq_store_norm(norm_ptrs, gamma, valid, 0, NORM)


@triton.jit(do_not_specialize=["num_rows"])
def _tq_store_kernel(
    k_ptr,
    v_ptr,
    cache_ptr,
    slot_mapping_ptr,
    rot_ptr,
    k_bnd_ptr,
    v_bnd_ptr,
    k_lut_ptr,
    v_lut_ptr,
    gain_ptr,
    num_rows,
    num_heads,
    num_slots,
    block_size,
    stride_k_token,
    stride_k_head,
    stride_v_token,
    stride_v_head,
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
    K_NC: tl.constexpr,
    K_GS: tl.constexpr,
    V_BITS: tl.constexpr,
    V_CODE_OFF: tl.constexpr,
    V_CODE_ROW: tl.constexpr,
    V_NORM_OFF: tl.constexpr,
    V_NORM: tl.constexpr,
    V_NORM_ROW: tl.constexpr,
    V_NC: tl.constexpr,
    V_GS: tl.constexpr,
    NUM_GAINS: tl.constexpr,
    HAS_PAD: tl.constexpr,
    PAD_OFF: tl.constexpr,
    PAD_ROW: tl.constexpr,
    G0: tl.constexpr,
    G1: tl.constexpr,
    G2: tl.constexpr,
    G3: tl.constexpr,
    G4: tl.constexpr,
    G5: tl.constexpr,
    BLOCK_S: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    K_CHUNK: tl.constexpr,
):
    """Encode K and V `[num_tokens, num_heads, HEAD_DIM]`; grid ``(cdiv(num_rows, BLOCK_N), 2)``.

    ``num_rows = num_tokens * num_heads``; row ``r`` is token ``r // num_heads``, head ``r % num_heads``.
    ``DOT_PRECISION`` of the rotation: ``"ieee"`` (exact float32 products) or ``"tf32x3"`` (float32-level
    accuracy on tensor cores).
    """
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
        _tq_store_component(
            k_ptr,
            stride_k_token,
            stride_k_head,
            rows,
            num_rows,
            num_heads,
            regions + K_CODE_OFF + offset * K_CODE_ROW,
            regions + K_NORM_OFF + offset * K_NORM_ROW,
            valid,
            rot_ptr,
            k_bnd_ptr,
            k_lut_ptr,
            gain_ptr,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_N,
            K_CHUNK,
            K_BITS,
            K_NORM,
            K_NC,
            K_GS,
            NUM_GAINS,
            DOT_PRECISION,
        )
        # The key program also zeroes the bytes no field owns.
        if HAS_PAD:
            offs_s = tl.arange(0, BLOCK_S)
            pad = ((offs_s >= G0) & (offs_s < G1)) | ((offs_s >= G2) & (offs_s < G3))
            pad = pad | ((offs_s >= G4) & (offs_s < G5))
            pad_ptrs = (regions + PAD_OFF + offset * PAD_ROW)[:, None] + offs_s[None, :]
            zeros = tl.zeros([BLOCK_N, BLOCK_S], dtype=tl.uint8)
            tl.store(pad_ptrs, zeros, mask=valid[:, None] & pad[None, :])
    else:
        _tq_store_component(
            v_ptr,
            stride_v_token,
            stride_v_head,
            rows,
            num_rows,
            num_heads,
            regions + V_CODE_OFF + offset * V_CODE_ROW,
            regions + V_NORM_OFF + offset * V_NORM_ROW,
            valid,
            rot_ptr,
            v_bnd_ptr,
            v_lut_ptr,
            gain_ptr,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_N,
            K_CHUNK,
            V_BITS,
            V_NORM,
            V_NC,
            V_GS,
            NUM_GAINS,
            DOT_PRECISION,
        )
