"""``tq_extend_attention``: causal attention of new chunks over a compressed prefix plus the chunk."""

from __future__ import annotations

import torch
import triton

from tq_core.formats import KVFormat
from tq_kernels._format import kernel_format, rotation_for
from tq_kernels._kernels.extend import _tq_extend_attention_kernel
from tq_kernels.ops._attn_checks import check_attention_common, check_paged_cache
from tq_kernels.ops._registry import format_key, lookup_format
from tq_kernels.ops.decode import nibble_eligible
from tq_kernels.tuning import LaunchConfig, extend_config

__all__ = ["tq_extend_attention"]


# -- custom op --------------------------------------------------------------------------------------
@torch.library.custom_op("tq::extend_attention", mutates_args=("out",))
def _extend_op(
    q: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    prefix_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    fmt_key: str,
    layer: int,
    scale: float,
    sliding_window: int,
    softcap: float,
    sinks: torch.Tensor | None,
    key_end: torch.Tensor | None,
    block_r: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
    nibble: bool,
    lut: str,
    nibble_3bit: bool,
    out: torch.Tensor,
) -> None:
    """Launch the extend kernel on validated inputs (``tq_extend_attention`` checks them);
    ``sliding_window`` 0 and ``softcap`` 0.0 mean none."""
    fmt = lookup_format(fmt_key)
    kf = kernel_format(fmt)
    total_q, num_heads = q.shape[0], q.shape[1]
    batch, num_kv_heads = prefix_lens.shape[0], cache.shape[1]
    group = num_heads // num_kv_heads
    d = kf.head_dim
    rot = rotation_for(fmt, layer, q.device)
    q_rot = ((q.to(torch.float32) @ rot.T) * scale).contiguous()
    # the chunk's K/V enter the tensor cores as float16, like the compressed prefix and the queries
    k_rot = (key.to(torch.float32) @ rot.T).to(torch.float16).contiguous()
    v_rot = (value.to(torch.float32) @ rot.T).to(torch.float16).contiguous()
    group_p2 = triton.next_power_of_2(group)
    block_r = max(block_r, 16, group_p2)
    m_tok = block_r // group_p2
    o_rot = torch.zeros(total_q, num_heads, d, dtype=torch.float32, device=q.device)
    if total_q and max_query_len:
        k_lut, v_lut = kf.centroids(q.device, torch.float16)
        nibble = nibble and nibble_eligible(kf, cache, nibble_3bit)
        k_asm = v_asm = ""
        if nibble and q.device.type == "cuda" and torch.version.hip is None:
            k_asm, v_asm = kf.nibble_asm(symmetric=lut == "sym")
        grid = (batch, triton.cdiv(max_query_len, m_tok), num_kv_heads)
        _tq_extend_attention_kernel[grid](
            q_rot,
            k_rot,
            v_rot,
            cache,
            block_table,
            prefix_lens,
            query_start_loc,
            key_end if key_end is not None else query_start_loc,
            k_lut,
            v_lut,
            sinks if sinks is not None else q_rot,
            o_rot,
            q_rot.stride(0),
            q_rot.stride(1),
            k_rot.stride(0),
            k_rot.stride(1),
            cache.stride(0),
            cache.stride(1),
            block_table.stride(0),
            o_rot.stride(0),
            o_rot.stride(1),
            softcap,
            sliding_window,
            GROUP=group,
            GROUP_P2=group_p2,
            BLOCK_R=block_r,
            M_TOK=m_tok,
            BLOCK_N=block_n,
            USE_SOFTCAP=softcap != 0.0,
            USE_WINDOW=sliding_window > 0,
            USE_SINKS=sinks is not None,
            USE_KEY_END=key_end is not None,
            **kf.region_constexprs(cache.shape[2]),
            num_warps=num_warps,
            num_stages=num_stages,
            NIBBLE=nibble,
            BLOCK_W=max(16, triton.next_power_of_2(d // 8)),
            K_ASM=k_asm,
            V_ASM=v_asm,
        )
    out.copy_(o_rot @ rot)


@_extend_op.register_fake
def _(
    q: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    prefix_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    fmt_key: str,
    layer: int,
    scale: float,
    sliding_window: int,
    softcap: float,
    sinks: torch.Tensor | None,
    key_end: torch.Tensor | None,
    block_r: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
    nibble: bool,
    lut: str,
    nibble_3bit: bool,
    out: torch.Tensor,
) -> None:
    return None


def tq_extend_attention(
    q: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    prefix_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    fmt: KVFormat,
    *,
    layer: int = 0,
    scale: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    key_end: torch.Tensor | None = None,
    block_r: int = 64,
    config: LaunchConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of chunks of new tokens: prefix from the compressed cache, chunk K/V exact, causal.

    Args:
        q: `[total_q, num_heads, head_dim]` (sequence ``b`` owns rows
            ``query_start_loc[b]:query_start_loc[b+1]``, at positions ``prefix_lens[b] + i``).
        key, value: `[total_q, num_kv_heads, head_dim]`, the chunk's own keys and values.
        cache: uint8 `[num_blocks, num_kv_heads, block_size, slot_bytes]` holding each prefix.
        block_table: int `[batch, max_blocks]`.
        prefix_lens: int `[batch]`, cached tokens before each chunk.
        query_start_loc: int `[batch + 1]`, cumulative chunk lengths from 0.
        max_query_len: the longest chunk (a host int: it sizes the grid).
        fmt, layer, scale, sliding_window, softcap, sinks: as for ``tq_decode_attention``.
        key_end: optional int32 `[total_q]`: query row ``t`` (chunk index ``i``) sees the chunk's keys
            ``j < key_end[t]`` instead of ``j <= i`` (entries are chunk-relative and clamped to the chunk;
            the sliding window still bounds them from below).  A vision-language model's bidirectional
            image range ``[s, e]`` inside the chunk gives its queries ``key_end = e + 1``
            (``tq_core.attention.mm_prefix_key_end``); None is causal.
        block_r: query rows (tokens x heads of a group) per program.
        config: key tile, pipelining and loop override (default: :func:`tq_kernels.tuning.extend_config`);
            ``config.nibble`` runs the prefix with the decode kernel's eight-phase loop for 4-bit formats
            (and with ``config.nibble_3bit`` for 3-bit ones), ``config.lut`` picks its register lookup.
        out: optional `[total_q, num_heads, head_dim]` output of ``q``'s dtype.

    Returns:
        `[total_q, num_heads, head_dim]` in ``q``'s dtype.
    """
    total_q, num_heads, num_kv_heads, group = check_attention_common(q, cache, fmt, "q")
    kernel_format(fmt)  # rejects layouts the kernels do not read (raises before any launch)
    batch = prefix_lens.shape[0] if isinstance(prefix_lens, torch.Tensor) else -1
    check_paged_cache(cache, block_table, prefix_lens, batch)
    for name, t in (("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.shape != (total_q, num_kv_heads, fmt.head_dim):
            raise ValueError(
                f"{name} must be [{total_q}, {num_kv_heads}, {fmt.head_dim}], got "
                f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
            )
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32) or t.device != q.device:
            raise ValueError(f"{name} must be a float16/bfloat16/float32 tensor on {q.device}")
    if (
        not isinstance(query_start_loc, torch.Tensor)
        or query_start_loc.shape != (batch + 1,)
        or query_start_loc.dtype not in (torch.int32, torch.int64)
        or query_start_loc.device != q.device
    ):
        raise ValueError(f"query_start_loc must be an int32/int64 [{batch + 1}] tensor on {q.device}")
    if max_query_len < 0:
        raise ValueError(f"max_query_len must be >= 0, got {max_query_len}")
    if sinks is not None and (sinks.shape != (num_heads,) or sinks.device != q.device):
        raise ValueError(f"sinks must be a [{num_heads}] tensor on {q.device}")
    if key_end is not None and (
        not isinstance(key_end, torch.Tensor)
        or key_end.shape != (total_q,)
        or key_end.dtype != torch.int32
        or key_end.device != q.device
    ):
        raise ValueError(
            f"key_end must be an int32 [{total_q}] tensor on {q.device} (one chunk-relative end per query "
            f"row), got {type(key_end).__name__ if not isinstance(key_end, torch.Tensor) else (key_end.dtype, tuple(key_end.shape))}"
        )
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device}")

    cfg = config or extend_config(fmt.head_dim, group, q.device)
    if cfg.lut not in ("exact", "sym"):
        raise ValueError(f"config.lut must be 'exact' or 'sym', got {cfg.lut!r}")
    if out is None:
        out = torch.empty_like(q)
    _extend_op(
        q,
        key,
        value,
        cache,
        block_table,
        prefix_lens,
        query_start_loc,
        max_query_len,
        format_key(fmt),
        layer,
        fmt.head_dim**-0.5 if scale is None else float(scale),
        int(sliding_window or 0),
        float(softcap or 0.0),
        sinks,
        key_end.contiguous() if key_end is not None else None,
        block_r,
        cfg.block_n,
        cfg.num_warps,
        cfg.num_stages,
        cfg.nibble,
        cfg.lut,
        cfg.nibble_3bit,
        out,
    )
    return out
