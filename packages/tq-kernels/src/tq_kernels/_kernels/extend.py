"""Extend (chunked prefill / prefix-cache hit) attention: new queries over a compressed prefix plus the
chunk's own keys and values, causal, in the layer's rotated space.

Grid: ``(batch, cdiv(max_query_len, M_TOK), num_kv_heads)``.  A program owns ``M_TOK`` query tokens of
one sequence times the ``GROUP`` query heads of one KV head, flattened into ``BLOCK_R`` rows
(row ``r``: token ``r // GROUP_P2``, head ``r % GROUP_P2``), so the tensor cores see a tall M dimension
even for decode-like chunks.  Phase 1 streams the compressed prefix (dequantized in registers); phase 2
the chunk's rotated float32 K/V with the causal mask, or, given ``key_end``, with each query row's own
end (a vision-language model's bidirectional image range: a query inside it also sees the range's later
keys).  The launcher rotates the output back.
"""

import triton
import triton.language as tl

from tq_kernels._kernels.codes import (
    _tq_centroids,
    _tq_load_norm_rows,
    _tq_load_plane_codes,
    _tq_nibble_phases,
)
from tq_kernels._kernels.decode import (
    _softcap,
    _tq_load_phases,
    _tq_load_words,
    _tq_phase_accumulate,
    _tq_phase_scores,
    _tq_store_phases,
    _tq_tile_rows,
    _tq_zero_phases,
)


@triton.jit
def _tq_prefix_start(prefix, tile, sliding_window, M_TOK: tl.constexpr, BLOCK_N: tl.constexpr,
                     USE_WINDOW: tl.constexpr):  # fmt: skip
    """First prefix token (tile-aligned) that the window lets the tile's first query see."""
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(prefix + tile * M_TOK - sliding_window + 1, 0)
        lo = lo // BLOCK_N * BLOCK_N
    return lo


@triton.jit
def _tq_chunk_range(key_end_ptr, q_start, i, r_mask, q_len, tile, sliding_window, M_TOK: tl.constexpr,
                    BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr, USE_KEY_END: tl.constexpr):  # fmt: skip
    """(first, end) chunk positions the tile's queries can see, and each row's exclusive end ``kend``:
    ``i + 1`` (causal), or the row's ``key_end`` entry (a bidirectional image range reaches past the
    query); both windowed from below."""
    hi = tl.minimum(q_len, (tile + 1) * M_TOK)
    kend = i + 1
    if USE_KEY_END:
        kend = tl.load(key_end_ptr + q_start + i, mask=r_mask, other=0)
        hi = tl.minimum(q_len, tl.maximum(hi, tl.max(kend, axis=0)))
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(tile * M_TOK - sliding_window + 1, 0)
        lo = lo // BLOCK_N * BLOCK_N
    return lo, hi, kend


@triton.jit
def _tq_masked_softmax(s, visible, m_i, l_i, softcap, USE_SOFTCAP: tl.constexpr):
    """One tile of the online softmax: scores ``s`` `[R, N]` soft-capped and masked to ``visible``;
    returns (new running max, rescale factor of the old state, probabilities, new sum).  A row that has
    seen no visible key yet keeps a running max of -inf and probabilities 0."""
    if USE_SOFTCAP:
        s = _softcap(s, softcap)
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    return m_new, alpha, p, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _tq_sinks(sinks_ptr, head, r_mask, m_i, l_i):
    """Each head's sink logit joins the softmax sum: (rescale factor of the accumulators, new sum)."""
    sink = tl.load(sinks_ptr + head, mask=r_mask, other=float("-inf")).to(tl.float32)
    m_new = tl.maximum(m_i, sink)
    alpha = tl.exp(m_i - m_new)
    return alpha, l_i * alpha + tl.exp(sink - m_new)


# The block table's row stride is left unspecialized (Triton specializes integers equal to 1 and
# multiples of 16): a warm-up with a one-column table then compiles the same variant that a serving
# engine's table uses.  On 2026-11-28 the specialized stride made vLLM recompile this kernel inside the
# anchor's timed generate (experiments/results/superseded/vllm_anchor_h200_2026-11-28_nibble.log, "JIT
# compilation during inference: _tq_extend_attention_kernel").
@triton.jit(do_not_specialize=["stride_bt_b"])
def _tq_extend_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    cache_ptr,
    block_table_ptr,
    prefix_lens_ptr,
    qsl_ptr,
    key_end_ptr,
    k_lut_ptr,
    v_lut_ptr,
    sinks_ptr,
    out_ptr,
    stride_q_t,
    stride_q_h,
    stride_k_t,
    stride_k_h,
    stride_cache_blk,
    stride_cache_head,
    stride_bt_b,
    stride_o_t,
    stride_o_h,
    softcap,
    sliding_window,
    GROUP: tl.constexpr,
    GROUP_P2: tl.constexpr,
    BLOCK_R: tl.constexpr,
    M_TOK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SINKS: tl.constexpr,
    USE_KEY_END: tl.constexpr,
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
):
    b = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    kvh = tl.program_id(2).to(tl.int64)
    q_start = tl.load(qsl_ptr + b).to(tl.int64)
    q_len = (tl.load(qsl_ptr + b + 1) - q_start).to(tl.int32)
    prefix = tl.load(prefix_lens_ptr + b).to(tl.int32)
    if tile * M_TOK >= q_len:
        return
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_mask = offs_d < HEAD_DIM
    i = tile * M_TOK + offs_r // GROUP_P2  # query index within the chunk
    g = offs_r % GROUP_P2
    r_mask = (i < q_len) & (g < GROUP)
    head = kvh * GROUP + g
    pos = prefix + i  # absolute position of each row's query
    if NIBBLE:
        _tq_extend_nibbles(
            q_ptr, k_ptr, v_ptr, cache_ptr, block_table_ptr, key_end_ptr, k_lut_ptr, v_lut_ptr, sinks_ptr,
            out_ptr, b, kvh, tile, q_start, q_len, prefix, i, head, r_mask, pos,
            stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_cache_blk, stride_cache_head,
            stride_bt_b, stride_o_t, stride_o_h, softcap, sliding_window,
            BLOCK_R, M_TOK, BLOCK_N, PAGE, USE_SOFTCAP, USE_WINDOW, USE_SINKS, USE_KEY_END, HEAD_DIM, BLOCK_W,
            K_BITS, K_CODE_OFF, K_NORM_OFF, K_NORM, V_BITS, V_CODE_OFF, V_NORM_OFF, V_NORM, K_ASM, V_ASM,
        )  # fmt: skip
        return
    q = tl.load(
        q_ptr + (q_start + i)[:, None] * stride_q_t + head[:, None] * stride_q_h + offs_d[None, :],
        mask=r_mask[:, None] & d_mask[None, :],
        other=0.0,
    ).to(tl.float16)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)

    # phase 1: the compressed prefix [lo, prefix)
    lo = _tq_prefix_start(prefix, tile, sliding_window, M_TOK, BLOCK_N, USE_WINDOW)
    for n0 in range(lo, prefix, BLOCK_N):
        tok = n0 + offs_n
        n_mask = tok < prefix
        blk = tl.load(block_table_ptr + b * stride_bt_b + tok // PAGE, mask=n_mask, other=0).to(tl.int64)
        region = cache_ptr + blk * stride_cache_blk + kvh * stride_cache_head
        row = tok % PAGE
        tile_mask = n_mask[:, None] & d_mask[None, :]
        k_idx = _tq_load_plane_codes(
            region + K_CODE_OFF + row * K_ROW, n_mask, 0, K_BITS, HEAD_DIM, BLOCK_D, BLOCK_N
        )
        k_c = tl.where(tile_mask, _tq_centroids(k_lut_ptr, k_idx), 0.0).to(tl.float16)
        k_gamma = _tq_load_norm_rows(region, row, n_mask, K_NORM_OFF, K_NORM)
        s = tl.dot(q, tl.trans(k_c)) * k_gamma[None, :]
        visible = n_mask[None, :]
        if USE_WINDOW:
            visible = visible & ((pos[:, None] - tok[None, :]) < sliding_window)
        m_new, alpha, p, l_i = _tq_masked_softmax(s, visible, m_i, l_i, softcap, USE_SOFTCAP)
        v_idx = _tq_load_plane_codes(
            region + V_CODE_OFF + row * V_ROW, n_mask, 0, V_BITS, HEAD_DIM, BLOCK_D, BLOCK_N
        )
        v_c = tl.where(tile_mask, _tq_centroids(v_lut_ptr, v_idx), 0.0).to(tl.float16)
        v_gamma = tl.where(n_mask, _tq_load_norm_rows(region, row, n_mask, V_NORM_OFF, V_NORM), 0.0)
        acc = acc * alpha[:, None] + tl.dot((p * v_gamma[None, :]).to(tl.float16), v_c)
        m_i = m_new

    # phase 2: the chunk itself, causal (or up to each row's key_end)
    lo2, hi, kend = _tq_chunk_range(
        key_end_ptr, q_start, i, r_mask, q_len, tile, sliding_window, M_TOK, BLOCK_N, USE_WINDOW, USE_KEY_END
    )
    for n0 in range(lo2, hi, BLOCK_N):
        j = n0 + offs_n
        n_mask = j < hi
        kv_off = (q_start + j)[:, None] * stride_k_t + kvh * stride_k_h + offs_d[None, :]
        tile_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + kv_off, mask=tile_mask, other=0.0).to(tl.float16)
        s = tl.dot(q, tl.trans(k))
        visible = n_mask[None, :] & (j[None, :] < kend[:, None])
        if USE_WINDOW:
            visible = visible & ((i[:, None] - j[None, :]) < sliding_window)
        m_new, alpha, p, l_i = _tq_masked_softmax(s, visible, m_i, l_i, softcap, USE_SOFTCAP)
        v = tl.load(v_ptr + kv_off, mask=tile_mask, other=0.0).to(tl.float16)
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v)
        m_i = m_new

    if USE_SINKS:
        alpha, l_i = _tq_sinks(sinks_ptr, head, r_mask, m_i, l_i)
        acc = acc * alpha[:, None]
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + (q_start + i)[:, None] * stride_o_t + head[:, None] * stride_o_h + offs_d[None, :],
        o,
        mask=r_mask[:, None] & d_mask[None, :],
    )


@triton.jit
def _tq_extend_nibbles(
    q_ptr, k_ptr, v_ptr, cache_ptr, block_table_ptr, key_end_ptr, k_lut_ptr, v_lut_ptr, sinks_ptr,
    out_ptr, b, kvh, tile, q_start, q_len, prefix, i, head, r_mask, pos,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_cache_blk, stride_cache_head,
    stride_bt_b, stride_o_t, stride_o_h, softcap, sliding_window,
    BLOCK_R: tl.constexpr, M_TOK: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SINKS: tl.constexpr, USE_KEY_END: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_W: tl.constexpr, K_BITS: tl.constexpr, K_CODE_OFF: tl.constexpr, K_NORM_OFF: tl.constexpr,
    K_NORM: tl.constexpr, V_BITS: tl.constexpr, V_CODE_OFF: tl.constexpr, V_NORM_OFF: tl.constexpr,
    V_NORM: tl.constexpr, K_ASM: tl.constexpr, V_ASM: tl.constexpr,
):  # fmt: skip
    """The extend kernel with the decode kernel's eight-phase loop (``NIBBLE``): queries, keys, values
    and the output are all handled as eight phase tiles (coordinates ``8w + p``), the compressed prefix's
    codes are read as int32 words and looked up in registers, the chunk's own K/V are loaded in the same
    phases."""
    W: tl.constexpr = HEAD_DIM // 8  # int32 words per code row
    offs_w = tl.arange(0, BLOCK_W)
    offs_n = tl.arange(0, BLOCK_N)
    w_mask = offs_w < W
    rows_q = (q_start + i)[:, None] * stride_q_t + head[:, None] * stride_q_h + 8 * offs_w[None, :]
    q0, q1, q2, q3, q4, q5, q6, q7 = _tq_load_phases(q_ptr + rows_q, r_mask[:, None] & w_mask[None, :])
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    a0, a1, a2, a3, a4, a5, a6, a7 = _tq_zero_phases(BLOCK_R, BLOCK_W)

    # phase 1: the compressed prefix [lo, prefix)
    lo = _tq_prefix_start(prefix, tile, sliding_window, M_TOK, BLOCK_N, USE_WINDOW)
    for n0 in range(lo, prefix, BLOCK_N):
        tok = n0 + offs_n
        n_mask, region, row = _tq_tile_rows(
            cache_ptr, block_table_ptr, b, kvh, tok, prefix, stride_bt_b, stride_cache_blk, stride_cache_head, PAGE
        )  # fmt: skip
        # masked rows read code 0 (a finite centroid); their scores become -inf and their values weight 0
        k0, k1, k2, k3, k4, k5, k6, k7 = _tq_nibble_phases(
            _tq_load_words(region, row, n_mask, offs_w, K_CODE_OFF, W, K_BITS), k_lut_ptr, K_ASM, K_BITS
        )
        s = _tq_phase_scores(q0, q1, q2, q3, q4, q5, q6, q7, k0, k1, k2, k3, k4, k5, k6, k7)
        s = s * _tq_load_norm_rows(region, row, n_mask, K_NORM_OFF, K_NORM)[None, :]
        visible = n_mask[None, :]
        if USE_WINDOW:
            visible = visible & ((pos[:, None] - tok[None, :]) < sliding_window)
        m_new, alpha, p, l_i = _tq_masked_softmax(s, visible, m_i, l_i, softcap, USE_SOFTCAP)
        v0, v1, v2, v3, v4, v5, v6, v7 = _tq_nibble_phases(
            _tq_load_words(region, row, n_mask, offs_w, V_CODE_OFF, W, V_BITS), v_lut_ptr, V_ASM, V_BITS
        )
        v_gamma = tl.where(n_mask, _tq_load_norm_rows(region, row, n_mask, V_NORM_OFF, V_NORM), 0.0)
        a0, a1, a2, a3, a4, a5, a6, a7 = _tq_phase_accumulate(
            (p * v_gamma[None, :]).to(tl.float16), alpha, a0, a1, a2, a3, a4, a5, a6, a7,
            v0, v1, v2, v3, v4, v5, v6, v7,
        )  # fmt: skip
        m_i = m_new

    # phase 2: the chunk itself, causal (or up to each row's key_end)
    lo2, hi, kend = _tq_chunk_range(
        key_end_ptr, q_start, i, r_mask, q_len, tile, sliding_window, M_TOK, BLOCK_N, USE_WINDOW, USE_KEY_END
    )
    for n0 in range(lo2, hi, BLOCK_N):
        j = n0 + offs_n
        n_mask = j < hi
        kv_rows = ((q_start + j) * stride_k_t + kvh * stride_k_h)[:, None] + 8 * offs_w[None, :]
        tile_mask = n_mask[:, None] & w_mask[None, :]
        k0, k1, k2, k3, k4, k5, k6, k7 = _tq_load_phases(k_ptr + kv_rows, tile_mask)
        s = _tq_phase_scores(q0, q1, q2, q3, q4, q5, q6, q7, k0, k1, k2, k3, k4, k5, k6, k7)
        visible = n_mask[None, :] & (j[None, :] < kend[:, None])
        if USE_WINDOW:
            visible = visible & ((i[:, None] - j[None, :]) < sliding_window)
        m_new, alpha, p, l_i = _tq_masked_softmax(s, visible, m_i, l_i, softcap, USE_SOFTCAP)
        v0, v1, v2, v3, v4, v5, v6, v7 = _tq_load_phases(v_ptr + kv_rows, tile_mask)
        a0, a1, a2, a3, a4, a5, a6, a7 = _tq_phase_accumulate(
            p.to(tl.float16), alpha, a0, a1, a2, a3, a4, a5, a6, a7, v0, v1, v2, v3, v4, v5, v6, v7
        )
        m_i = m_new

    if USE_SINKS:
        alpha, l_i = _tq_sinks(sinks_ptr, head, r_mask, m_i, l_i)
        a0, a1, a2, a3 = a0 * alpha[:, None], a1 * alpha[:, None], a2 * alpha[:, None], a3 * alpha[:, None]
        a4, a5, a6, a7 = a4 * alpha[:, None], a5 * alpha[:, None], a6 * alpha[:, None], a7 * alpha[:, None]
    inv = 1.0 / tl.where(l_i > 0, l_i, 1.0)[:, None]
    rows_o = (q_start + i)[:, None] * stride_o_t + head[:, None] * stride_o_h + 8 * offs_w[None, :]
    _tq_store_phases(
        out_ptr + rows_o, r_mask[:, None] & w_mask[None, :],
        a0 * inv, a1 * inv, a2 * inv, a3 * inv, a4 * inv, a5 * inv, a6 * inv, a7 * inv,
    )  # fmt: skip
