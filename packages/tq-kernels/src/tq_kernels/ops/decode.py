"""``tq_decode_attention``: one decode step of paged attention over a TurboQuant-compressed cache."""

from __future__ import annotations

import math

import torch
import triton

from tq_core.formats import KVFormat
from tq_kernels._format import KernelFormat, kernel_format, rotation_for
from tq_kernels._kernels.decode import _tq_decode_attention_kernel, _tq_decode_reduce_kernel
from tq_kernels.ops._attn_checks import check_attention_common, check_paged_cache, sm_count
from tq_kernels.ops._registry import format_key, lookup_format
from tq_kernels.tuning import MAX_SPLITS, MIN_SPLIT_TOKENS, LaunchConfig, decode_config

__all__ = ["tq_decode_attention", "default_num_splits", "nibble_format"]


def default_num_splits(
    batch: int,
    num_kv_heads: int,
    max_seq_len: int,
    device: torch.device,
    block_n: int = 64,
    num_warps: int = 4,
) -> int:
    """Splits of the context: enough that the grid puts about 16 warps on every SM (1 split when the
    batch alone does), at most one per ``max(block_n, MIN_SPLIT_TOKENS)`` tokens, rounded up to a power
    of two and at most ``MAX_SPLITS``; ``block_n`` and ``num_warps`` are the launch configuration's.

    The split count is a compile-time constant of the kernel, so powers of two bound the variants a
    serving engine compiles (vLLM captures a graph per batch size).  Pass the result (or any fixed
    number) explicitly when capturing CUDA graphs, so the grid does not depend on the batch.
    """
    programs = max(batch * num_kv_heads, 1)
    want = max(1, math.ceil(16 * sm_count(device) / (programs * num_warps)))
    want = min(want, math.ceil(max(max_seq_len, 1) / max(block_n, MIN_SPLIT_TOKENS)))
    return int(min(1 << (max(want, 1) - 1).bit_length(), MAX_SPLITS))


def nibble_format(fmt: KVFormat, allow_3bit: bool = False) -> bool:
    """Whether the eight-phase decode loop reads ``fmt``: K and V codes single 4-bit planes (the
    default :class:`~tq_kernels.tuning.LaunchConfig` runs it with one warp per program), or, with
    ``allow_3bit``, 3-bit codes for either component."""
    widths = (3, 4) if allow_3bit else (4,)
    return all(c.bits in widths and not c.hi_bits_coords for c in (fmt.key, fmt.value))


def nibble_eligible(kf: KernelFormat, cache: torch.Tensor, allow_3bit: bool = False) -> bool:
    """Whether the eight-phase loop can read ``cache``: :func:`nibble_format`, and every code row
    starts on a 4-byte boundary (the loop loads int32 and int16 words)."""
    return (
        nibble_format(kf.fmt, allow_3bit)
        and cache.data_ptr() % 4 == 0
        and cache.stride(0) % 4 == 0
        and cache.stride(1) % 4 == 0
    )


def stacked_chunks(group: int, chunks: int) -> int:
    """Tiles a step of the eight-phase loop stacks in the score tile's rows: ``chunks`` (the launch
    configuration's), at most as many as the 16 rows hold GQA groups of ``group`` padded to a power of 2."""
    return max(1, min(chunks, 16 // triton.next_power_of_2(group)))


# -- custom op --------------------------------------------------------------------------------------
@torch.library.custom_op("tq::decode_attention", mutates_args=("out", "lse"))
def _decode_op(
    q: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    fmt_key: str,
    layer: int,
    scale: float,
    sliding_window: int,
    softcap: float,
    sinks: torch.Tensor | None,
    num_splits: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
    nibble: bool,
    lut: str,
    nibble_3bit: bool,
    chunks: int,
    score_chains: int,
    maxnreg: int,
    ablate: int,
    out: torch.Tensor,
    lse: torch.Tensor | None,
) -> None:
    """Launch the decode and reduce kernels on validated inputs (``tq_decode_attention`` checks them);
    ``sliding_window`` 0 and ``softcap`` 0.0 mean none; ``lse`` None skips the log-sum-exp."""
    fmt = lookup_format(fmt_key)
    kf = kernel_format(fmt)
    batch, num_heads = q.shape[0], q.shape[1]
    num_kv_heads = cache.shape[1]
    group = num_heads // num_kv_heads
    d, bd = kf.head_dim, kf.block_d
    rot = rotation_for(fmt, layer, q.device)
    q_rot = ((q.to(torch.float32) @ rot.T) * scale).contiguous()
    part_o = torch.empty(batch, num_heads, num_splits, bd, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(batch, num_heads, num_splits, 2, dtype=torch.float32, device=q.device)
    k_lut, v_lut = kf.centroids(q.device, torch.float16)
    group_p2 = triton.next_power_of_2(group)
    block_g = max(16, group_p2)
    nibble = nibble and ablate == 0 and nibble_eligible(kf, cache, nibble_3bit)
    pairs = nibble and lut == "byte" and kf.key.bits == kf.value.bits == 4
    on_nvidia = q.device.type == "cuda" and torch.version.hip is None
    k_asm = v_asm = ""
    k_scale = v_scale = 1.0
    if pairs:
        kb, vb = kf.byte_lookup(q.device)
        k_lut, v_lut, k_scale, v_scale = kb.table, vb.table, kb.scale, vb.scale
        if on_nvidia:
            k_asm, v_asm = kb.asm, vb.asm
    elif nibble and on_nvidia:
        k_asm, v_asm = kf.nibble_asm(symmetric=lut == "sym")
    _tq_decode_attention_kernel[(batch, num_kv_heads, num_splits)](
        q_rot,
        cache,
        block_table,
        seq_lens,
        k_lut,
        v_lut,
        part_o,
        part_ml,
        q_rot.stride(0),
        q_rot.stride(1),
        cache.stride(0),
        cache.stride(1),
        block_table.stride(0),
        part_o.stride(0),
        part_o.stride(1),
        part_o.stride(2),
        softcap,
        sliding_window,
        NUM_HEADS=num_heads,
        NUM_SPLITS=num_splits,
        GROUP=group,
        BLOCK_G=block_g,
        BLOCK_N=block_n,
        USE_SOFTCAP=softcap != 0.0,
        USE_WINDOW=sliding_window > 0,
        **kf.region_constexprs(cache.shape[2]),
        num_warps=num_warps,
        num_stages=num_stages,
        ABLATE=ablate,  # experiments only: drop a stage to time the rest
        NIBBLE=nibble,
        BLOCK_W=max(16, triton.next_power_of_2(d // 8)),
        K_ASM=k_asm,
        V_ASM=v_asm,
        GROUP_P2=group_p2,
        CHUNKS=stacked_chunks(group, chunks) if nibble else 1,
        PAIRS=pairs,
        K_SCALE=k_scale,
        V_SCALE=v_scale,
        SCORE_CHAINS=score_chains if nibble else 1,
        **({"maxnreg": maxnreg} if maxnreg else {}),
    )
    o_rot = torch.empty(batch, num_heads, bd, dtype=torch.float32, device=q.device)
    _tq_decode_reduce_kernel[(batch, num_heads)](
        part_o,
        part_ml,
        sinks if sinks is not None else part_ml,
        o_rot,
        lse if lse is not None else o_rot,
        part_o.stride(0),
        part_o.stride(1),
        part_o.stride(2),
        o_rot.stride(0),
        o_rot.stride(1),
        NUM_HEADS=num_heads,
        NUM_SPLITS=num_splits,
        BLOCK_S=triton.next_power_of_2(num_splits),
        USE_SINKS=sinks is not None,
        WRITE_LSE=lse is not None,
        BLOCK_D=bd,
    )
    out.copy_(o_rot[..., :d] @ rot)  # rotate the output back once


@_decode_op.register_fake
def _(
    q: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    fmt_key: str,
    layer: int,
    scale: float,
    sliding_window: int,
    softcap: float,
    sinks: torch.Tensor | None,
    num_splits: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
    nibble: bool,
    lut: str,
    nibble_3bit: bool,
    chunks: int,
    score_chains: int,
    maxnreg: int,
    ablate: int,
    out: torch.Tensor,
    lse: torch.Tensor | None,
) -> None:
    return None


def tq_decode_attention(
    q: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    fmt: KVFormat,
    *,
    layer: int = 0,
    scale: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    num_splits: int | None = None,
    max_seq_len: int | None = None,
    config: LaunchConfig | None = None,
    out: torch.Tensor | None = None,
    return_lse: bool = False,
    _ablate: int = 0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of one new token per sequence, reading compressed K/V in place.

    Args:
        q: `[batch, num_heads, head_dim]` float16/bfloat16/float32.
        cache: uint8 `[num_blocks, num_kv_heads, block_size, slot_bytes]` written by ``tq_store_paged``
            (any strides on the first three dims, the slot contiguous).
        block_table: int32/int64 `[batch, max_blocks]`.
        seq_lens: int32/int64 `[batch]`, tokens per sequence including the new one (0 gives zeros).
        fmt: the cache's :class:`~tq_core.formats.KVFormat`.
        layer: selects the layer's rotation.
        scale: softmax scale, default ``head_dim ** -0.5``.
        sliding_window: attend to the last ``sliding_window`` tokens only.
        softcap: tanh logit soft-capping.
        sinks: float `[num_heads]` attention-sink logits.
        num_splits: context splits (flash-decoding); fixed values keep CUDA graphs valid.
        max_seq_len: an upper bound of ``seq_lens`` known on the host, for the split heuristic only.
        config: tile and pipelining override (default: :func:`tq_kernels.tuning.decode_config`).
        out: optional output `[batch, num_heads, head_dim]` of ``q``'s dtype.
        return_lse: also return the natural log-sum-exp of the (scaled, soft-capped) scores of the
            visible keys, float32 `[batch, num_heads]` (``-inf`` where none is visible; sinks are not
            included), for merging with attention over other keys.

    Returns:
        `[batch, num_heads, head_dim]` in ``q``'s dtype, and the log-sum-exp with ``return_lse``.

    Example:
        >>> from tq_core import named_format
        >>> fmt = named_format("turboquant_4bit_nc", 64)
        >>> cache = fmt.allocate_cache(4, 16, 2)
        >>> o = tq_decode_attention(
        ...     torch.randn(1, 4, 64), cache, torch.tensor([[0, 1]]), torch.tensor([20]), fmt
        ... )  # doctest: +SKIP
    """
    batch, num_heads, num_kv_heads, group = check_attention_common(q, cache, fmt, "q")
    kf = kernel_format(fmt)  # rejects layouts the kernels do not read (raises before any launch)
    check_paged_cache(cache, block_table, seq_lens, batch)
    if sinks is not None and (sinks.shape != (num_heads,) or sinks.device != q.device):
        raise ValueError(f"sinks must be a [{num_heads}] tensor on {q.device}, got {tuple(sinks.shape)}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    cfg = config or decode_config(
        fmt.head_dim, group, q.device, nibble=nibble_eligible(kf, cache, allow_3bit=True)
    )
    runs_nibble = cfg.nibble and _ablate == 0 and nibble_eligible(kf, cache, cfg.nibble_3bit)
    block_n = cfg.block_n
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device}")
    page = cache.shape[2]
    if num_splits is None:
        bound = max_seq_len if max_seq_len is not None else block_table.shape[1] * page
        step = block_n * (stacked_chunks(group, cfg.chunks) if runs_nibble else 1)  # tokens per loop step
        num_splits = default_num_splits(batch, num_kv_heads, bound, q.device, step, cfg.num_warps)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if cfg.score_chains not in (1, 2, 4):
        raise ValueError(f"config.score_chains must be 1, 2 or 4, got {cfg.score_chains}")
    if cfg.maxnreg < 0:
        raise ValueError(f"config.maxnreg must be >= 0, got {cfg.maxnreg}")
    if cfg.chunks not in (1, 2, 4):
        raise ValueError(f"config.chunks must be 1, 2 or 4, got {cfg.chunks}")
    if cfg.lut not in ("exact", "sym", "byte"):
        raise ValueError(f"config.lut must be 'exact', 'sym' or 'byte', got {cfg.lut!r}")

    if out is None:
        out = torch.empty_like(q)
    lse = torch.empty(batch, num_heads, dtype=torch.float32, device=q.device) if return_lse else None
    _decode_op(
        q,
        cache,
        block_table,
        seq_lens,
        format_key(fmt),
        layer,
        fmt.head_dim**-0.5 if scale is None else float(scale),
        int(sliding_window or 0),
        float(softcap or 0.0),
        sinks,
        num_splits,
        cfg.block_n,
        cfg.num_warps,
        cfg.num_stages,
        cfg.nibble,
        cfg.lut,
        cfg.nibble_3bit,
        cfg.chunks,
        cfg.score_chains,
        cfg.maxnreg,
        _ablate,
        out,
        lse,
    )
    return (out, lse) if lse is not None else out
