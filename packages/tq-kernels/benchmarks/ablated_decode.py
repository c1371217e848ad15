"""The decode kernel's plane loop with stages left out, to time the rest (benchmarks only, never shipped).

    ABLATE 1: codes are loaded but not looked up (the code value itself is the centroid)
    ABLATE 2: no code loads (codes made up from the token and coordinate), centroids looked up
    ABLATE 3: neither

The kernel below is the production plane loop (``tq_kernels._kernels.decode``) spelled with the same
pieces, with made-up stages where ``ABLATE`` says; the launch is the production launcher's
(``tq_kernels.ops.decode._run_decode``), so queries, splits, reduce and output rotation are identical.
Outputs of ABLATE > 0 are meaningless; ABLATE 0 equals the production kernel's plane loop.  It lives
beside the benchmarks, outside the package's source, because it reuses the kernel's private pieces; the
production op carries no ablation knob.  ``ablate_decode.py`` times it, ``aot_report.py --ablate`` compiles it.

    from ablated_decode import ablated_decode_attention
    ablated_decode_attention(q, cache, block_table, seq_lens, fmt, ablate=2, config=LaunchConfig(64, 4, 2, nibble=False))
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from tq_core.formats import KVFormat
from tq_kernels._kernels.codes import _tq_centroids, _tq_load_norm_rows, _tq_load_plane_codes
from tq_kernels._kernels.decode import _tq_online_softmax, _tq_plane_tile, _tq_store_ml, _tq_tile_rows
from tq_kernels.ops.decode import _run_decode, plan_decode
from tq_kernels.tuning import LaunchConfig

__all__ = ["ABLATIONS", "ablated_decode_attention"]

ABLATIONS = (0, 1, 2, 3)


@triton.jit
def _ablated_tile(code_ptrs, tok, offs_d, n_mask, tile_mask, lut_ptr, SALT: tl.constexpr, BITS: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  ABLATE: tl.constexpr):  # fmt: skip
    if ABLATE == 0:
        return _tq_plane_tile(code_ptrs, n_mask, tile_mask, lut_ptr, BITS, HEAD_DIM, BLOCK_D, BLOCK_N)
    if ABLATE == 2 or ABLATE == 3:
        idx = (offs_d[None, :] + tok[:, None] * SALT) & 15
    else:
        idx = _tq_load_plane_codes(code_ptrs, n_mask, 0, BITS, HEAD_DIM, BLOCK_D, BLOCK_N)
    if ABLATE == 1 or ABLATE == 3:
        return idx.to(tl.float16)
    return tl.where(tile_mask, _tq_centroids(lut_ptr, idx), 0.0).to(tl.float16)


@triton.jit(do_not_specialize=["stride_bt_b"])
def _tq_decode_ablated_kernel(
    q_ptr, cache_ptr, block_table_ptr, seq_lens_ptr, k_lut_ptr, v_lut_ptr, part_o_ptr, part_ml_ptr,
    stride_q_b, stride_q_h, stride_cache_blk, stride_cache_head, stride_bt_b, stride_po_b, stride_po_h,
    stride_po_s, softcap, sliding_window,
    NUM_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, K_BITS: tl.constexpr, K_ROW: tl.constexpr,
    K_CODE_OFF: tl.constexpr, K_NORM_OFF: tl.constexpr, K_NORM: tl.constexpr, V_BITS: tl.constexpr,
    V_ROW: tl.constexpr, V_CODE_OFF: tl.constexpr, V_NORM_OFF: tl.constexpr, V_NORM: tl.constexpr,
    ABLATE: tl.constexpr = 0, NIBBLE: tl.constexpr = 0, BLOCK_W: tl.constexpr = 16, K_ASM: tl.constexpr = "",
    V_ASM: tl.constexpr = "", GROUP_P2: tl.constexpr = 16, CHUNKS: tl.constexpr = 1, PAIRS: tl.constexpr = 0,
    K_SCALE: tl.constexpr = 1.0, V_SCALE: tl.constexpr = 1.0, SCORE_CHAINS: tl.constexpr = 1,
):  # fmt: skip
    """The production kernel's arguments plus ``ABLATE``; the plane loop only (``NIBBLE`` must be 0)."""
    tl.static_assert(NIBBLE == 0 and PAIRS == 0, "the ablations time the plane loop: pass nibble=False")
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    start = 0
    if USE_WINDOW:
        start = tl.maximum(seq_len - sliding_window, 0)
    per_split = tl.cdiv(tl.cdiv(seq_len - start, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = start + split * per_split
    hi = tl.minimum(lo + per_split, seq_len)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g
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
        n_mask, region, row = _tq_tile_rows(cache_ptr, block_table_ptr, b, kvh, tok, hi, stride_bt_b,
                                            stride_cache_blk, stride_cache_head, PAGE)  # fmt: skip
        tile_mask = n_mask[:, None] & d_mask[None, :]
        k_c = _ablated_tile(region + K_CODE_OFF + row * K_ROW, tok, offs_d, n_mask, tile_mask, k_lut_ptr, 1,
                            K_BITS, HEAD_DIM, BLOCK_D, BLOCK_N, ABLATE)  # fmt: skip
        k_gamma = _tq_load_norm_rows(region, row, n_mask, K_NORM_OFF, K_NORM)
        s = tl.dot(q, tl.trans(k_c))
        m_new, alpha, p, l_i = _tq_online_softmax(s, k_gamma, n_mask, m_i, l_i, softcap, USE_SOFTCAP)
        v_c = _ablated_tile(region + V_CODE_OFF + row * V_ROW, tok, offs_d, n_mask, tile_mask, v_lut_ptr, 3,
                            V_BITS, HEAD_DIM, BLOCK_D, BLOCK_N, ABLATE)  # fmt: skip
        v_gamma = tl.where(n_mask, _tq_load_norm_rows(region, row, n_mask, V_NORM_OFF, V_NORM), 0.0)
        acc = acc * alpha[:, None] + tl.dot((p * v_gamma[None, :]).to(tl.float16), v_c)
        m_i = m_new
    po = part_o_ptr + b * stride_po_b + heads[:, None] * stride_po_h + split * stride_po_s + offs_d[None, :]
    tl.store(po, acc, mask=g_mask[:, None])
    _tq_store_ml(part_ml_ptr, b, heads, split, g_mask, m_i, l_i, NUM_HEADS, NUM_SPLITS)


def ablated_decode_attention(
    q: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    fmt: KVFormat,
    *,
    ablate: int,
    config: LaunchConfig,
    max_seq_len: int,
    num_splits: int | None = None,
) -> torch.Tensor:
    """``tq_decode_attention`` (layer 0, default scale) through the ablated plane loop."""
    if ablate not in ABLATIONS:
        raise ValueError(f"ablate must be one of {ABLATIONS}, got {ablate}")
    cfg = dataclasses.replace(config, nibble=False)  # the ablations are of the plane loop
    plan = plan_decode(fmt, q.shape[1], cache.shape[1], q.shape[0], max_seq_len, q.device, config=cfg,
                       num_splits=num_splits, cache=cache)  # fmt: skip
    out = torch.empty_like(q)
    _run_decode(q, cache, block_table, seq_lens, fmt, plan.config, plan.num_splits, layer=0,
                scale=fmt.head_dim**-0.5, sliding_window=0, softcap=0.0, sinks=None, out=out, lse=None,
                kernel=_tq_decode_ablated_kernel, constexprs={"ABLATE": ablate})  # fmt: skip
    return out
