"""Extend (chunked prefill / prefix-cache hit) attention: new queries over a compressed prefix plus the
chunk's own keys and values, causal, in the layer's rotated space.

Grid: ``(batch, cdiv(max_query_len, M_TOK), num_kv_heads)``.  A program owns ``M_TOK`` query tokens of
one sequence times the ``GROUP`` query heads of one KV head, flattened into ``BLOCK_R`` rows
(row ``r``: token ``r // GROUP_P2``, head ``r % GROUP_P2``), so the tensor cores see a tall M dimension
even for decode-like chunks.  Phase 1 streams the compressed prefix (dequantized in registers); phase 2
the chunk's rotated float32 K/V with the causal mask.  The launcher rotates the output back.
"""

import triton
import triton.language as tl

from tq_kernels._kernels.codes import _tq_centroids, _tq_load_norm_rows, _tq_load_plane_codes
from tq_kernels._kernels.decode import _softcap


# The block table's row stride is left unspecialized (Triton specializes integers equal to 1 and
# multiples of 16): a warm-up with a one-column table then compiles the same variant that a serving
# engine's table uses.  On 2026-11-28 the specialized stride made vLLM recompile this kernel inside the
# anchor's timed generate (experiments/results/vllm_anchor_h200_nibble.log, "JIT compilation during
# inference: _tq_extend_attention_kernel").
@triton.jit(do_not_specialize=["stride_bt_b"])
def _tq_extend_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    cache_ptr,
    block_table_ptr,
    prefix_lens_ptr,
    qsl_ptr,
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
):
    b = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    kvh = tl.program_id(2).to(tl.int64)
    q_start = tl.load(qsl_ptr + b).to(tl.int64)
    q_len = (tl.load(qsl_ptr + b + 1) - q_start).to(tl.int32)
    prefix = tl.load(prefix_lens_ptr + b).to(tl.int32)
    if tile * M_TOK < q_len:
        offs_r = tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        d_mask = offs_d < HEAD_DIM
        i = tile * M_TOK + offs_r // GROUP_P2  # query index within the chunk
        g = offs_r % GROUP_P2
        r_mask = (i < q_len) & (g < GROUP)
        head = kvh * GROUP + g
        pos = prefix + i  # absolute position of each row's query
        q = tl.load(
            q_ptr + (q_start + i)[:, None] * stride_q_t + head[:, None] * stride_q_h + offs_d[None, :],
            mask=r_mask[:, None] & d_mask[None, :],
            other=0.0,
        ).to(tl.float16)
        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)

        # phase 1: the compressed prefix [lo, prefix)
        lo = 0
        if USE_WINDOW:
            lo = tl.maximum(prefix + tile * M_TOK - sliding_window + 1, 0)
            lo = lo // BLOCK_N * BLOCK_N
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
            if USE_SOFTCAP:
                s = _softcap(s, softcap)
            visible = n_mask[None, :]
            if USE_WINDOW:
                visible = visible & ((pos[:, None] - tok[None, :]) < sliding_window)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v_idx = _tq_load_plane_codes(
                region + V_CODE_OFF + row * V_ROW, n_mask, 0, V_BITS, HEAD_DIM, BLOCK_D, BLOCK_N
            )
            v_c = tl.where(tile_mask, _tq_centroids(v_lut_ptr, v_idx), 0.0).to(tl.float16)
            v_gamma = tl.where(n_mask, _tq_load_norm_rows(region, row, n_mask, V_NORM_OFF, V_NORM), 0.0)
            acc = acc * alpha[:, None] + tl.dot((p * v_gamma[None, :]).to(tl.float16), v_c)
            m_i = m_new

        # phase 2: the chunk itself, causal
        hi = tl.minimum(q_len, (tile + 1) * M_TOK)
        lo2 = 0
        if USE_WINDOW:
            lo2 = tl.maximum(tile * M_TOK - sliding_window + 1, 0)
            lo2 = lo2 // BLOCK_N * BLOCK_N
        for n0 in range(lo2, hi, BLOCK_N):
            j = n0 + offs_n
            n_mask = j < hi
            kv_off = (q_start + j)[:, None] * stride_k_t + kvh * stride_k_h + offs_d[None, :]
            tile_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_ptr + kv_off, mask=tile_mask, other=0.0).to(tl.float16)
            s = tl.dot(q, tl.trans(k))
            if USE_SOFTCAP:
                s = _softcap(s, softcap)
            visible = n_mask[None, :] & (j[None, :] <= i[:, None])
            if USE_WINDOW:
                visible = visible & ((i[:, None] - j[None, :]) < sliding_window)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + kv_off, mask=tile_mask, other=0.0).to(tl.float16)
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v)
            m_i = m_new

        if USE_SINKS:
            sink = tl.load(sinks_ptr + head, mask=r_mask, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m_i, sink)
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.exp(sink - m_new)
            acc = acc * alpha[:, None]
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + (q_start + i)[:, None] * stride_o_t + head[:, None] * stride_o_h + offs_d[None, :],
            o,
            mask=r_mask[:, None] & d_mask[None, :],
        )
