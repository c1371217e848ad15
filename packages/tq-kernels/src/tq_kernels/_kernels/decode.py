"""Paged decode attention that reads TurboQuant slots directly (flash-decoding, split context).

Everything happens in the rotated space of the layer: the launcher passes ``q_rot = (q R^T) * scale``,
so ``score = gamma_k <q_rot, c[codes_k]>``, and the partial outputs are ``sum p gamma_v c[codes_v]``;
the launcher rotates the final output back once.  Keys and values are dequantized tile by tile in
registers and never written anywhere.

Grid: ``(batch, num_kv_heads, num_splits)``.  The GQA group of a KV head is the M dimension of both
``tl.dot`` calls (padded to ``BLOCK_G >= 16``).  Each split handles a contiguous, BLOCK_N-aligned range
of the sequence and writes ``(acc, m, l)``; ``_tq_decode_reduce_kernel`` merges them.

``NIBBLE`` (formats whose K and V codes are each one 4-bit plane, 4bit_nc, and opt-in for 3-bit
components) reads each code row as int32 words of eight codes and splits the head dim into eight
phases: phase ``p`` is coordinates ``8w + p``, so ``q . k = sum_p q_p . k_p`` and the output is kept
as eight phase accumulators.  The codes of a word are looked up in registers
(``tq_kernels._nibble_lut``: 21 instructions per eight 4-bit codes, 26 per eight 3-bit codes, on
NVIDIA GPUs) instead of one memory gather per element, and no tile is reshaped.
"""

import triton
import triton.language as tl

from tq_kernels._kernels.codes import (
    _tq_centroids,
    _tq_load_norm_rows,
    _tq_load_plane_codes,
    _tq_nibble_phases,
    _tq_pair_table,
)
from tq_kernels._nibble_lut import BYTE_BIAS as _BIAS

BYTE_BIAS = tl.constexpr(_BIAS)


@triton.jit
def _softcap(s, softcap):
    # softcap * tanh(s / softcap), with tanh(x) = 2 sigmoid(2x) - 1 (stable for large |x|)
    return softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)


@triton.jit
def _tq_tile_rows(cache_ptr, block_table_ptr, b, kvh, tok, hi, stride_bt_b, stride_cache_blk, stride_cache_head,
                  PAGE: tl.constexpr):  # fmt: skip
    """(mask, region pointers, row in the page) of the context tokens ``tok`` of sequence ``b``."""
    n_mask = tok < hi
    blk = tl.load(block_table_ptr + b * stride_bt_b + tok // PAGE, mask=n_mask, other=0).to(tl.int64)
    return n_mask, cache_ptr + blk * stride_cache_blk + kvh * stride_cache_head, tok % PAGE


@triton.jit
def _tq_online_softmax(s, k_gamma, n_mask, m_i, l_i, softcap, USE_SOFTCAP: tl.constexpr):
    """One tile of the online softmax: raw scores ``s`` `[G, N]` scaled by the key norms, soft-capped
    and masked; returns (new running max, rescale factor of the old state, probabilities, new sum)."""
    s = s * k_gamma[None, :]
    if USE_SOFTCAP:
        s = _softcap(s, softcap)
    s = tl.where(n_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    return m_new, alpha, p, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _tq_store_ml(part_ml_ptr, b, heads, split, g_mask, m_i, l_i, NUM_HEADS: tl.constexpr,
                 NUM_SPLITS: tl.constexpr):  # fmt: skip
    """A split's running max and sum, for the reduce kernel."""
    ml = part_ml_ptr + ((b * NUM_HEADS + heads) * NUM_SPLITS + split) * 2
    tl.store(ml, m_i, mask=g_mask)
    tl.store(ml + 1, l_i, mask=g_mask)


@triton.jit
def _tq_plane_tile(code_ptrs, n_mask, tile_mask, lut_ptr, BITS: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """float16 `[BLOCK_N, BLOCK_D]` centroids of the code rows at ``code_ptrs`` (plane loop), zero
    outside ``tile_mask``."""
    idx = _tq_load_plane_codes(code_ptrs, n_mask, 0, BITS, HEAD_DIM, BLOCK_D, BLOCK_N)
    return tl.where(tile_mask, _tq_centroids(lut_ptr, idx), 0.0).to(tl.float16)


# The block table's row stride is left unspecialized: Triton would otherwise compile one variant for a
# stride of 1 (a one-column table, as in a warm-up) and another for a serving engine's table, and the
# second compile would land inside the first timed request (see tq_kernels.ops.extend).
@triton.jit(do_not_specialize=["stride_bt_b"])
def _tq_decode_attention_kernel(
    q_ptr,
    cache_ptr,
    block_table_ptr,
    seq_lens_ptr,
    k_lut_ptr,
    v_lut_ptr,
    part_o_ptr,
    part_ml_ptr,
    stride_q_b,
    stride_q_h,
    stride_cache_blk,
    stride_cache_head,
    stride_bt_b,
    stride_po_b,
    stride_po_h,
    stride_po_s,
    softcap,
    sliding_window,
    NUM_HEADS: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    K_BITS: tl.constexpr,
    K_ROW: tl.constexpr,
    K_CODE_OFF: tl.constexpr,
    K_NORM_OFF: tl.constexpr,
    K_NORM: tl.constexpr,
    V_BITS: tl.constexpr,
    V_ROW: tl.constexpr,
    V_CODE_OFF: tl.constexpr,
    V_NORM_OFF: tl.constexpr,
    V_NORM: tl.constexpr,
    NIBBLE: tl.constexpr = 0,
    BLOCK_W: tl.constexpr = 16,
    K_ASM: tl.constexpr = "",
    V_ASM: tl.constexpr = "",
    GROUP_P2: tl.constexpr = 16,
    CHUNKS: tl.constexpr = 1,
    PAIRS: tl.constexpr = 0,
    K_SCALE: tl.constexpr = 1.0,
    V_SCALE: tl.constexpr = 1.0,
    SCORE_CHAINS: tl.constexpr = 1,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    start = 0
    if USE_WINDOW:
        start = tl.maximum(seq_len - sliding_window, 0)
    # a split covers whole loop steps: BLOCK_N tokens, or CHUNKS tiles of them in the NIBBLE loop
    STEP: tl.constexpr = BLOCK_N * CHUNKS if NIBBLE or PAIRS else BLOCK_N
    per_split = tl.cdiv(tl.cdiv(seq_len - start, NUM_SPLITS), STEP) * STEP
    lo = start + split * per_split
    hi = tl.minimum(lo + per_split, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g
    if NIBBLE or PAIRS:
        _tq_decode_nibbles(
            q_ptr, cache_ptr, block_table_ptr, k_lut_ptr, v_lut_ptr, part_o_ptr, part_ml_ptr,
            b, kvh, split, lo, hi, stride_q_b, stride_q_h, stride_cache_blk,
            stride_cache_head, stride_bt_b, stride_po_b, stride_po_h, stride_po_s, softcap,
            NUM_HEADS, NUM_SPLITS, GROUP, GROUP_P2, CHUNKS, BLOCK_G, BLOCK_N, PAGE, USE_SOFTCAP, HEAD_DIM,
            BLOCK_W, K_BITS, K_CODE_OFF, K_NORM_OFF, K_NORM, V_BITS, V_CODE_OFF, V_NORM_OFF, V_NORM, K_ASM,
            V_ASM, PAIRS, K_SCALE, V_SCALE, SCORE_CHAINS,
        )  # fmt: skip
        return
    q = tl.load(
        q_ptr + b * stride_q_b + heads[:, None] * stride_q_h + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    ).to(tl.float16)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)

    for n0 in range(lo, hi, BLOCK_N):
        tok = n0 + offs_n
        n_mask, region, row = _tq_tile_rows(
            cache_ptr,
            block_table_ptr,
            b,
            kvh,
            tok,
            hi,
            stride_bt_b,
            stride_cache_blk,
            stride_cache_head,
            PAGE,
        )
        tile_mask = n_mask[:, None] & d_mask[None, :]
        k_c = _tq_plane_tile(region + K_CODE_OFF + row * K_ROW, n_mask, tile_mask, k_lut_ptr, K_BITS, HEAD_DIM,
                             BLOCK_D, BLOCK_N)  # fmt: skip
        k_gamma = _tq_load_norm_rows(region, row, n_mask, K_NORM_OFF, K_NORM)
        s = tl.dot(q, tl.trans(k_c))
        m_new, alpha, p, l_i = _tq_online_softmax(s, k_gamma, n_mask, m_i, l_i, softcap, USE_SOFTCAP)
        v_c = _tq_plane_tile(region + V_CODE_OFF + row * V_ROW, n_mask, tile_mask, v_lut_ptr, V_BITS, HEAD_DIM,
                             BLOCK_D, BLOCK_N)  # fmt: skip
        v_gamma = _tq_load_norm_rows(region, row, n_mask, V_NORM_OFF, V_NORM)
        v_gamma = tl.where(n_mask, v_gamma, 0.0)
        acc = acc * alpha[:, None] + tl.dot((p * v_gamma[None, :]).to(tl.float16), v_c)
        m_i = m_new

    po = part_o_ptr + b * stride_po_b + heads[:, None] * stride_po_h + split * stride_po_s + offs_d[None, :]
    tl.store(po, acc, mask=g_mask[:, None])
    _tq_store_ml(part_ml_ptr, b, heads, split, g_mask, m_i, l_i, NUM_HEADS, NUM_SPLITS)


@triton.jit
def _tq_load_words(region, row, n_mask, offs_w, OFF: tl.constexpr, W: tl.constexpr, BITS: tl.constexpr):
    """int32 `[BLOCK_N, BLOCK_W]`, eight codes of the code rows at ``OFF`` a word: for 4-bit codes the
    plane's word ``w`` itself; for 3-bit codes (a 2-bit plane of 2W bytes, then a 1-bit plane of W) the
    2-bit plane's bytes ``2w, 2w + 1`` in bits 0-15 and the 1-bit plane's byte ``w`` in bits 16-23."""
    m = n_mask[:, None] & (offs_w < W)[None, :]
    if BITS == 4:
        rows = (region + OFF + row * (4 * W)).to(tl.pointer_type(tl.int32))
        return tl.load(rows[:, None] + offs_w[None, :], mask=m, other=0)
    else:
        base = region + OFF + row * (3 * W)
        hi = tl.load(base.to(tl.pointer_type(tl.int16))[:, None] + offs_w[None, :], mask=m, other=0)
        lo = tl.load(base[:, None] + 2 * W + offs_w[None, :], mask=m, other=0)
        return (hi.to(tl.int32) & 0xFFFF) | (lo.to(tl.int32) << 16)


@triton.jit
def _tq_load_phases(ptrs, mask):
    """Eight float16 tiles of a float row block viewed in phases: tile ``p`` holds coordinates
    ``8w + p`` of ``ptrs`` (a pointer grid ``base + 8 * w``)."""
    return (
        tl.load(ptrs + 0, mask=mask, other=0.0).to(tl.float16),
        tl.load(ptrs + 1, mask=mask, other=0.0).to(tl.float16),
        tl.load(ptrs + 2, mask=mask, other=0.0).to(tl.float16),
        tl.load(ptrs + 3, mask=mask, other=0.0).to(tl.float16),
        tl.load(ptrs + 4, mask=mask, other=0.0).to(tl.float16),
        tl.load(ptrs + 5, mask=mask, other=0.0).to(tl.float16),
        tl.load(ptrs + 6, mask=mask, other=0.0).to(tl.float16),
        tl.load(ptrs + 7, mask=mask, other=0.0).to(tl.float16),
    )


@triton.jit
def _tq_zero_phases(ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
    """Eight float32 `[ROWS, BLOCK_W]` zero tiles: the phase accumulators of the output."""
    return (
        tl.zeros([ROWS, BLOCK_W], tl.float32),
        tl.zeros([ROWS, BLOCK_W], tl.float32),
        tl.zeros([ROWS, BLOCK_W], tl.float32),
        tl.zeros([ROWS, BLOCK_W], tl.float32),
        tl.zeros([ROWS, BLOCK_W], tl.float32),
        tl.zeros([ROWS, BLOCK_W], tl.float32),
        tl.zeros([ROWS, BLOCK_W], tl.float32),
        tl.zeros([ROWS, BLOCK_W], tl.float32),
    )


@triton.jit
def _tq_phase_scores(q0, q1, q2, q3, q4, q5, q6, q7, k0, k1, k2, k3, k4, k5, k6, k7, init=None,
                     CHAINS: tl.constexpr = 1):  # fmt: skip
    """``q . k^T`` from the eight phases of both: ``sum_p q_p k_p^T`` (plus ``init``).

    ``CHAINS`` (1, 2 or 4) independent accumulations summed at the end: each tensor-core product waits
    for the one before it in its chain, so fewer, shorter chains hide their latency with fewer warps."""
    if CHAINS == 4:
        s0 = tl.dot(q4, tl.trans(k4), acc=tl.dot(q0, tl.trans(k0), acc=init))
        s1 = tl.dot(q5, tl.trans(k5), acc=tl.dot(q1, tl.trans(k1)))
        s2 = tl.dot(q6, tl.trans(k6), acc=tl.dot(q2, tl.trans(k2)))
        s3 = tl.dot(q7, tl.trans(k7), acc=tl.dot(q3, tl.trans(k3)))
        return (s0 + s1) + (s2 + s3)
    elif CHAINS == 2:
        s0 = tl.dot(q0, tl.trans(k0), acc=init)
        s1 = tl.dot(q1, tl.trans(k1))
        s0 = tl.dot(q2, tl.trans(k2), acc=s0)
        s1 = tl.dot(q3, tl.trans(k3), acc=s1)
        s0 = tl.dot(q4, tl.trans(k4), acc=s0)
        s1 = tl.dot(q5, tl.trans(k5), acc=s1)
        s0 = tl.dot(q6, tl.trans(k6), acc=s0)
        return s0 + tl.dot(q7, tl.trans(k7), acc=s1)
    else:
        s = tl.dot(q0, tl.trans(k0), acc=init)
        s = tl.dot(q1, tl.trans(k1), acc=s)
        s = tl.dot(q2, tl.trans(k2), acc=s)
        s = tl.dot(q3, tl.trans(k3), acc=s)
        s = tl.dot(q4, tl.trans(k4), acc=s)
        s = tl.dot(q5, tl.trans(k5), acc=s)
        s = tl.dot(q6, tl.trans(k6), acc=s)
        return tl.dot(q7, tl.trans(k7), acc=s)


@triton.jit
def _tq_phase_accumulate(pv, alpha, a0, a1, a2, a3, a4, a5, a6, a7, v0, v1, v2, v3, v4, v5, v6, v7):
    """The eight phase accumulators rescaled by ``alpha`` plus ``pv @ v_p``."""
    return (
        tl.dot(pv, v0, acc=a0 * alpha[:, None]),
        tl.dot(pv, v1, acc=a1 * alpha[:, None]),
        tl.dot(pv, v2, acc=a2 * alpha[:, None]),
        tl.dot(pv, v3, acc=a3 * alpha[:, None]),
        tl.dot(pv, v4, acc=a4 * alpha[:, None]),
        tl.dot(pv, v5, acc=a5 * alpha[:, None]),
        tl.dot(pv, v6, acc=a6 * alpha[:, None]),
        tl.dot(pv, v7, acc=a7 * alpha[:, None]),
    )


@triton.jit
def _tq_store_phases(ptrs, mask, a0, a1, a2, a3, a4, a5, a6, a7):
    """Store eight phase tiles back to coordinates ``8w + p`` of ``ptrs`` (a pointer grid ``base + 8 * w``)."""
    tl.store(ptrs + 0, a0, mask=mask)
    tl.store(ptrs + 1, a1, mask=mask)
    tl.store(ptrs + 2, a2, mask=mask)
    tl.store(ptrs + 3, a3, mask=mask)
    tl.store(ptrs + 4, a4, mask=mask)
    tl.store(ptrs + 5, a5, mask=mask)
    tl.store(ptrs + 6, a6, mask=mask)
    tl.store(ptrs + 7, a7, mask=mask)


@triton.jit
def _tq_phase_accumulate_chunk(pv, a0, a1, a2, a3, a4, a5, a6, a7, v0, v1, v2, v3, v4, v5, v6, v7):
    """The eight phase accumulators plus ``pv @ v_p`` (no rescale: one chunk of a stacked step)."""
    return (
        tl.dot(pv, v0, acc=a0),
        tl.dot(pv, v1, acc=a1),
        tl.dot(pv, v2, acc=a2),
        tl.dot(pv, v3, acc=a3),
        tl.dot(pv, v4, acc=a4),
        tl.dot(pv, v5, acc=a5),
        tl.dot(pv, v6, acc=a6),
        tl.dot(pv, v7, acc=a7),
    )


@triton.jit
def _tq_rescale_phases(alpha, a0, a1, a2, a3, a4, a5, a6, a7):
    """The eight phase accumulators times ``alpha`` (one factor per row)."""
    return (
        a0 * alpha[:, None],
        a1 * alpha[:, None],
        a2 * alpha[:, None],
        a3 * alpha[:, None],
        a4 * alpha[:, None],
        a5 * alpha[:, None],
        a6 * alpha[:, None],
        a7 * alpha[:, None],
    )


@triton.jit
def _tq_merge_chunks(a, w, NCH: tl.constexpr, GROUP_P2: tl.constexpr, BLOCK_W: tl.constexpr):
    """`[NCH * GROUP_P2, BLOCK_W]` rows ``(chunk, head)`` weighted by ``w`` `[NCH, GROUP_P2]` and summed
    over the chunks: `[GROUP_P2, BLOCK_W]`."""
    return tl.sum(tl.reshape(a, [NCH, GROUP_P2, BLOCK_W]) * w[:, :, None], axis=0)


@triton.jit
def _tq_decode_nibbles(
    q_ptr, cache_ptr, block_table_ptr, k_lut_ptr, v_lut_ptr, part_o_ptr, part_ml_ptr,
    b, kvh, split, lo, hi, stride_q_b, stride_q_h, stride_cache_blk,
    stride_cache_head, stride_bt_b, stride_po_b, stride_po_h, stride_po_s, softcap,
    NUM_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr, GROUP: tl.constexpr, GROUP_P2: tl.constexpr,
    CHUNKS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_W: tl.constexpr,
    K_BITS: tl.constexpr, K_CODE_OFF: tl.constexpr, K_NORM_OFF: tl.constexpr, K_NORM: tl.constexpr,
    V_BITS: tl.constexpr, V_CODE_OFF: tl.constexpr, V_NORM_OFF: tl.constexpr, V_NORM: tl.constexpr,
    K_ASM: tl.constexpr, V_ASM: tl.constexpr, PAIRS: tl.constexpr, K_SCALE: tl.constexpr,
    V_SCALE: tl.constexpr, SCORE_CHAINS: tl.constexpr,
):  # fmt: skip
    """The ``NIBBLE`` loop of ``_tq_decode_attention_kernel`` (see the module docstring).

    Chunk stacking: the GQA group fills only ``GROUP_P2`` of the ``BLOCK_G >= 16`` rows that a tensor-core
    product needs, so a step reads ``CHUNKS`` consecutive tiles of ``BLOCK_N`` tokens and row ``i`` of
    the score and output tiles belongs to head ``i % GROUP_P2`` and tile ``i // GROUP_P2``.  Every row is
    its own online softmax over the tokens of its tile column; the rows of one head are merged before
    the split is written.  Per token this divides the softmax, the rescaling of the accumulators and
    the padded rows' work by ``CHUNKS``; the products cost what they cost with one tile.

    ``PAIRS`` (4-bit keys and values): the codes are looked up in byte tables, two words of a thread at
    a time, into float16 ``x = c / scale + BYTE_BIAS`` that are already the products' operand pairs
    (:func:`tq_kernels._nibble_lut.pair_lut_asm`).  The bias leaves in float32, where every product and
    the bias are exact: the score accumulator starts at ``-BYTE_BIAS * sum(q)`` (q as the float16 the
    products read), one more product ``p . 1`` accumulates ``sum(p)`` as the products see it, and the
    output is ``V_SCALE * (acc - BYTE_BIAS * sum)``; ``K_SCALE`` joins the key norms.
    """
    W: tl.constexpr = HEAD_DIM // 8  # int32 words per code row
    offs_w = tl.arange(0, BLOCK_W)
    offs_n = tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_G)
    row_head = rows % GROUP_P2
    row_chunk = rows // GROUP_P2
    row_ok = (row_head < GROUP) & (row_chunk < CHUNKS)
    qm = row_ok[:, None] & (offs_w < W)[None, :]
    q0, q1, q2, q3, q4, q5, q6, q7 = _tq_load_phases(
        q_ptr + b * stride_q_b + (kvh * GROUP + row_head)[:, None] * stride_q_h + 8 * offs_w[None, :], qm
    )

    s_init = tl.zeros([BLOCK_G, BLOCK_N], tl.float32)
    if PAIRS:
        q_sum = tl.sum(
            q0.to(tl.float32) + q1.to(tl.float32) + q2.to(tl.float32) + q3.to(tl.float32)
            + q4.to(tl.float32) + q5.to(tl.float32) + q6.to(tl.float32) + q7.to(tl.float32),
            axis=1,
        )  # fmt: skip
        s_init -= BYTE_BIAS * q_sum[:, None]
    ones = tl.full([BLOCK_N, BLOCK_W], 1.0, tl.float16)
    a_sum = tl.zeros([BLOCK_G, BLOCK_W], tl.float32)
    k_tab = None
    v_tab = None
    if PAIRS and K_ASM != "":
        k_tab = _tq_pair_table(k_lut_ptr)
        v_tab = _tq_pair_table(v_lut_ptr)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    a0, a1, a2, a3, a4, a5, a6, a7 = _tq_zero_phases(BLOCK_G, BLOCK_W)
    for n0 in range(lo, hi, BLOCK_N * CHUNKS):
        s = tl.zeros([BLOCK_G, BLOCK_N], tl.float32)
        for c in tl.static_range(CHUNKS):
            n_mask, region, row = _tq_tile_rows(
                cache_ptr, block_table_ptr, b, kvh, n0 + c * BLOCK_N + offs_n, hi, stride_bt_b,
                stride_cache_blk, stride_cache_head, PAGE,
            )  # fmt: skip
            # masked rows read code 0 (a finite centroid): their scores become -inf and their values get
            # weight 0 below, so the tiles need no masking of their own
            k0, k1, k2, k3, k4, k5, k6, k7 = _tq_nibble_phases(
                _tq_load_words(region, row, n_mask, offs_w, K_CODE_OFF, W, K_BITS),
                k_lut_ptr,
                K_ASM,
                K_BITS,
                PAIRS,
                k_tab,
            )
            s_c = _tq_phase_scores(
                q0,
                q1,
                q2,
                q3,
                q4,
                q5,
                q6,
                q7,
                k0,
                k1,
                k2,
                k3,
                k4,
                k5,
                k6,
                k7,
                init=s_init,
                CHAINS=SCORE_CHAINS,
            )
            k_gamma = _tq_load_norm_rows(region, row, n_mask, K_NORM_OFF, K_NORM) * K_SCALE
            s = tl.where(row_chunk[:, None] == c, s_c * k_gamma[None, :], s)
        if USE_SOFTCAP:
            s = _softcap(s, softcap)
        # rows of empty row blocks (chunk >= CHUNKS) and tokens past the split stay out
        tok = n0 + row_chunk[:, None] * BLOCK_N + offs_n[None, :]
        s = tl.where((tok < hi) & (row_chunk < CHUNKS)[:, None], s, float("-inf"))
        m_i, alpha, p, l_i = _tq_softmax_step(s, m_i, l_i)
        a0, a1, a2, a3, a4, a5, a6, a7 = _tq_rescale_phases(alpha, a0, a1, a2, a3, a4, a5, a6, a7)
        if PAIRS:
            a_sum = a_sum * alpha[:, None]
        for c in tl.static_range(CHUNKS):
            n_mask, region, row = _tq_tile_rows(
                cache_ptr, block_table_ptr, b, kvh, n0 + c * BLOCK_N + offs_n, hi, stride_bt_b,
                stride_cache_blk, stride_cache_head, PAGE,
            )  # fmt: skip
            v0, v1, v2, v3, v4, v5, v6, v7 = _tq_nibble_phases(
                _tq_load_words(region, row, n_mask, offs_w, V_CODE_OFF, W, V_BITS),
                v_lut_ptr,
                V_ASM,
                V_BITS,
                PAIRS,
                v_tab,
            )
            v_gamma = tl.where(n_mask, _tq_load_norm_rows(region, row, n_mask, V_NORM_OFF, V_NORM), 0.0)
            pv = tl.where(row_chunk[:, None] == c, p * v_gamma[None, :], 0.0).to(tl.float16)
            if PAIRS:
                a_sum = tl.dot(pv, ones, acc=a_sum)
            a0, a1, a2, a3, a4, a5, a6, a7 = _tq_phase_accumulate_chunk(
                pv, a0, a1, a2, a3, a4, a5, a6, a7, v0, v1, v2, v3, v4, v5, v6, v7
            )

    if PAIRS:  # o = s_v * (acc - BYTE_BIAS * sum(pv)): every column of a_sum holds its row's sum
        corr = BYTE_BIAS * a_sum
        a0, a1, a2, a3, a4, a5, a6, a7 = (
            a0 - corr,
            a1 - corr,
            a2 - corr,
            a3 - corr,
            a4 - corr,
            a5 - corr,
            a6 - corr,
            a7 - corr,
        )
    _tq_store_merged(
        part_o_ptr, part_ml_ptr, b, kvh, split, stride_po_b, stride_po_h, stride_po_s, m_i, l_i, V_SCALE,
        a0, a1, a2, a3, a4, a5, a6, a7, NUM_HEADS, NUM_SPLITS, GROUP, GROUP_P2, BLOCK_G, HEAD_DIM, BLOCK_W,
    )  # fmt: skip


@triton.jit
def _tq_store_merged(
    part_o_ptr, part_ml_ptr, b, kvh, split, stride_po_b, stride_po_h, stride_po_s, m_i, l_i, scale,
    a0, a1, a2, a3, a4, a5, a6, a7, NUM_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr, GROUP: tl.constexpr,
    GROUP_P2: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """Merge the stacked row blocks of each head (a flash-decoding merge inside the program) and write
    the split's phase accumulators times ``scale``, running max and sum."""
    W: tl.constexpr = HEAD_DIM // 8
    NCH: tl.constexpr = BLOCK_G // GROUP_P2
    offs_w = tl.arange(0, BLOCK_W)
    m2 = tl.reshape(m_i, [NCH, GROUP_P2])
    m_h = tl.max(m2, axis=0)
    w = tl.where(m2 == float("-inf"), 0.0, tl.exp(m2 - tl.where(m_h == float("-inf"), 0.0, m_h)[None, :]))
    l_h = tl.sum(tl.reshape(l_i, [NCH, GROUP_P2]) * w, axis=0)
    w = w * scale
    heads = kvh * GROUP + tl.arange(0, GROUP_P2)
    h_mask = tl.arange(0, GROUP_P2) < GROUP
    po = (
        part_o_ptr
        + b * stride_po_b
        + heads[:, None] * stride_po_h
        + split * stride_po_s
        + 8 * offs_w[None, :]
    )
    _tq_store_phases(
        po,
        h_mask[:, None] & (offs_w < W)[None, :],
        _tq_merge_chunks(a0, w, NCH, GROUP_P2, BLOCK_W),
        _tq_merge_chunks(a1, w, NCH, GROUP_P2, BLOCK_W),
        _tq_merge_chunks(a2, w, NCH, GROUP_P2, BLOCK_W),
        _tq_merge_chunks(a3, w, NCH, GROUP_P2, BLOCK_W),
        _tq_merge_chunks(a4, w, NCH, GROUP_P2, BLOCK_W),
        _tq_merge_chunks(a5, w, NCH, GROUP_P2, BLOCK_W),
        _tq_merge_chunks(a6, w, NCH, GROUP_P2, BLOCK_W),
        _tq_merge_chunks(a7, w, NCH, GROUP_P2, BLOCK_W),
    )
    _tq_store_ml(part_ml_ptr, b, heads, split, h_mask, m_h, l_h, NUM_HEADS, NUM_SPLITS)


@triton.jit
def _tq_softmax_step(s, m_i, l_i):
    """Online softmax of a masked score tile: (new max, rescale of the old state, probabilities, new sum).
    A row whose tiles held no token yet keeps -inf: it shifts by 0 so exp() gives 0, not NaN."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_use)
    p = tl.exp(s - m_use[:, None])
    return m_new, alpha, p, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _tq_decode_reduce_kernel(
    part_o_ptr,
    part_ml_ptr,
    sinks_ptr,
    out_ptr,
    lse_ptr,
    stride_po_b,
    stride_po_h,
    stride_po_s,
    stride_out_b,
    stride_out_h,
    NUM_HEADS: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    USE_SINKS: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NUM_SPLITS
    ml = part_ml_ptr + (b * NUM_HEADS + h) * (NUM_SPLITS * 2) + offs_s * 2
    m = tl.load(ml, mask=s_mask, other=float("-inf"))
    l_ = tl.load(ml + 1, mask=s_mask, other=0.0)
    m_max = tl.max(m, axis=0)
    if USE_SINKS:
        sink = tl.load(sinks_ptr + h).to(tl.float32)
        m_max = tl.maximum(m_max, sink)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.where(s_mask & (m > float("-inf")), tl.exp(m - m_safe), 0.0)
    denom = tl.sum(w * l_, axis=0)
    if WRITE_LSE:  # log-sum-exp of the scores of the visible keys (sinks excluded), -inf for none
        lse = tl.where(denom > 0, m_safe + tl.log(tl.where(denom > 0, denom, 1.0)), float("-inf"))
        tl.store(lse_ptr + b * NUM_HEADS + h, lse)
    if USE_SINKS:
        denom += tl.exp(sink - m_safe)
    o = tl.load(
        part_o_ptr + b * stride_po_b + h * stride_po_h + offs_s[:, None] * stride_po_s + offs_d[None, :],
        mask=s_mask[:, None],
        other=0.0,
    )
    o = tl.sum(o * w[:, None], axis=0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + b * stride_out_b + h * stride_out_h + offs_d, o)
