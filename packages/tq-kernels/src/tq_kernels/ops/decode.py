"""``tq_decode_attention``: one decode step of paged attention over a TurboQuant-compressed cache.

:func:`plan_decode` is the launch plan of a layer and batch size (launch configuration and context
splits): the launcher uses it, and a serving engine that captures CUDA graphs calls it once per layer
and batch size and passes the plan back, so every step of a captured batch launches the same grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import triton

from tq_core.formats import KVFormat
from tq_kernels._format import KernelFormat, kernel_format, rotation_for
from tq_kernels._kernels.decode import _tq_decode_attention_kernel, _tq_decode_reduce_kernel
from tq_kernels.ops._attn_checks import check_attention_common, check_paged_cache, sm_count
from tq_kernels.ops._registry import format_key, lookup_format
from tq_kernels.tuning import (
    MAX_SPLITS,
    MIN_SPLIT_TOKENS,
    LaunchConfig,
    decode_config,
    launch_key,
    lookup_launch,
)

__all__ = ["DecodePlan", "default_num_splits", "nibble_format", "plan_decode", "tq_decode_attention"]


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


@dataclass(frozen=True)
class DecodePlan:
    """How :func:`tq_decode_attention` launches for one layer shape and batch size (from
    :func:`plan_decode`).

    Attributes:
        fmt: the cache's format.
        num_heads, num_kv_heads: query and KV heads of the layer.
        config: tile, warps and loop of the decode kernel.
        num_splits: context splits (a compile-time constant of the kernel and the grid's third axis).
        nibble: whether the eight-phase loop runs (for a cache whose code rows are 4-byte aligned; the
            launcher checks the cache it gets and runs the plane loop otherwise).
    """

    fmt: KVFormat
    num_heads: int
    num_kv_heads: int
    config: LaunchConfig
    num_splits: int
    nibble: bool


def _check_config(cfg: LaunchConfig) -> None:
    if not isinstance(cfg, LaunchConfig):
        raise ValueError(f"config must be a tq_kernels.tuning.LaunchConfig, got {type(cfg).__name__}")
    if cfg.block_n < 16 or cfg.block_n & (cfg.block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {cfg.block_n}")
    if cfg.num_warps < 1 or cfg.num_stages < 1:
        raise ValueError(
            f"config.num_warps and num_stages must be >= 1, got {cfg.num_warps}, {cfg.num_stages}"
        )
    if cfg.score_chains not in (1, 2, 4):
        raise ValueError(f"config.score_chains must be 1, 2 or 4, got {cfg.score_chains}")
    if cfg.maxnreg < 0:
        raise ValueError(f"config.maxnreg must be >= 0, got {cfg.maxnreg}")
    if cfg.chunks not in (1, 2, 4):
        raise ValueError(f"config.chunks must be 1, 2 or 4, got {cfg.chunks}")
    if cfg.lut not in ("exact", "sym", "byte"):
        raise ValueError(f"config.lut must be 'exact', 'sym' or 'byte', got {cfg.lut!r}")


def _positive(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def plan_decode(
    fmt: KVFormat,
    num_heads: int,
    num_kv_heads: int,
    batch: int,
    max_seq_len: int,
    device: torch.device | str,
    *,
    config: LaunchConfig | None = None,
    num_splits: int | None = None,
    cache: torch.Tensor | None = None,
) -> DecodePlan:
    """The launch of :func:`tq_decode_attention` for ``batch`` sequences of at most ``max_seq_len``
    tokens: the configuration (:func:`tq_kernels.tuning.decode_config` unless ``config`` is given) and
    the context splits (:func:`default_num_splits` for that configuration's loop, unless
    ``num_splits`` is given).

    Everything here is host arithmetic on its arguments; nothing reads a tensor's values.  The split
    count is a compile-time constant of the kernel: plan once per batch size with a fixed
    ``max_seq_len`` (the model's maximum length) and pass the plan to every launch, so a CUDA graph
    captured for that batch keeps its grid and the kernel compiles once per distinct split count.

    Args:
        fmt: the cache's :class:`~tq_core.formats.KVFormat`.
        num_heads: query heads (a multiple of ``num_kv_heads``).
        num_kv_heads: KV heads of the cache.
        batch: sequences of a launch (decode tokens), >= 1.
        max_seq_len: an upper bound of the sequence lengths, >= 1.
        device: the device the kernel runs on (its SM count sizes the splits).
        config: a launch configuration to use instead of the tuned one.
        num_splits: a fixed split count instead of the heuristic.
        cache: the cache the launches will read, when known: the eight-phase loop needs its code rows
            on 4-byte boundaries; None plans for an aligned cache (``KVFormat.allocate_cache`` and
            vLLM's allocations are).

    Returns:
        A :class:`DecodePlan` for ``tq_decode_attention(..., plan=plan)``.

    Raises:
        ValueError: for a format the kernels do not read, non-positive sizes, heads that do not
            divide, or an invalid ``config`` / ``num_splits``.

    Example:
        >>> from tq_core import named_format
        >>> plan = plan_decode(named_format("turboquant_4bit_nc", 128), 32, 8, 4, 8192, "cpu")
        >>> plan.num_splits, plan.config.block_n
        (1, 32)
    """
    kf = kernel_format(fmt)  # rejects formats and layouts the kernels do not read
    _positive("num_heads", num_heads)
    _positive("num_kv_heads", num_kv_heads)
    _positive("batch", batch)
    _positive("max_seq_len", max_seq_len)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    device = torch.device(device)
    group = num_heads // num_kv_heads

    def eligible(allow_3bit: bool) -> bool:
        return nibble_format(fmt, allow_3bit) if cache is None else nibble_eligible(kf, cache, allow_3bit)

    cfg = config if config is not None else decode_config(fmt.head_dim, group, device, nibble=eligible(True))
    _check_config(cfg)
    nibble = cfg.nibble and eligible(cfg.nibble_3bit)
    if num_splits is None:
        step = cfg.block_n * (stacked_chunks(group, cfg.chunks) if nibble else 1)  # tokens per loop step
        num_splits = default_num_splits(batch, num_kv_heads, max_seq_len, device, step, cfg.num_warps)
    _positive("num_splits", num_splits)
    return DecodePlan(fmt, num_heads, num_kv_heads, cfg, num_splits, nibble)


# -- launch -----------------------------------------------------------------------------------------
def _run_decode(
    q: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    fmt: KVFormat,
    cfg: LaunchConfig,
    num_splits: int,
    *,
    layer: int,
    scale: float,
    sliding_window: int,
    softcap: float,
    sinks: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor | None,
    kernel: Any = _tq_decode_attention_kernel,
    constexprs: dict[str, Any] | None = None,
) -> None:
    """Rotate the queries, launch ``kernel`` and the reduce, rotate the output back into ``out``.

    ``kernel`` takes the decode kernel's arguments (a variant built from its pieces, as the experiments'
    ablations are) and ``constexprs`` adds compile-time arguments of such a variant.
    """
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
    nibble = cfg.nibble and nibble_eligible(kf, cache, cfg.nibble_3bit)  # the cache's alignment decides
    pairs = nibble and cfg.lut == "byte" and kf.key.bits == kf.value.bits == 4
    on_nvidia = q.device.type == "cuda" and torch.version.hip is None
    k_asm = v_asm = ""
    k_scale = v_scale = 1.0
    if pairs:
        kb, vb = kf.byte_lookup(q.device)
        k_lut, v_lut, k_scale, v_scale = kb.table, vb.table, kb.scale, vb.scale
        if on_nvidia:
            k_asm, v_asm = kb.asm, vb.asm
    elif nibble and on_nvidia:
        k_asm, v_asm = kf.nibble_asm(symmetric=cfg.lut == "sym")
    kernel[(batch, num_kv_heads, num_splits)](
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
        BLOCK_N=cfg.block_n,
        USE_SOFTCAP=softcap != 0.0,
        USE_WINDOW=sliding_window > 0,
        **kf.region_constexprs(cache.shape[2]),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        NIBBLE=nibble,
        BLOCK_W=max(16, triton.next_power_of_2(d // 8)),
        K_ASM=k_asm,
        V_ASM=v_asm,
        GROUP_P2=group_p2,
        CHUNKS=stacked_chunks(group, cfg.chunks) if nibble else 1,
        PAIRS=pairs,
        K_SCALE=k_scale,
        V_SCALE=v_scale,
        SCORE_CHAINS=cfg.score_chains if nibble else 1,
        **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}),
        **(constexprs or {}),
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


# -- custom op --------------------------------------------------------------------------------------
@torch.library.custom_op("tq::decode_attention", mutates_args=("out", "lse"))
def _decode_op(
    q: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    sinks: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor | None,
    *,
    fmt_key: str,
    launch: str,
    num_splits: int,
    layer: int,
    scale: float,
    sliding_window: int,
    softcap: float,
) -> None:
    """Launch the decode and reduce kernels on validated inputs (``tq_decode_attention`` checks them).

    Tensors are positional (custom ops take no keyword-only tensors), everything else keyword-only:
    ``launch`` is the :func:`~tq_kernels.tuning.launch_key` of the configuration, ``sliding_window`` 0
    and ``softcap`` 0.0 mean none; ``lse`` None skips the log-sum-exp."""
    _run_decode(
        q, cache, block_table, seq_lens, lookup_format(fmt_key), lookup_launch(launch), num_splits,
        layer=layer, scale=scale, sliding_window=sliding_window, softcap=softcap, sinks=sinks, out=out,
        lse=lse,
    )  # fmt: skip


@_decode_op.register_fake
def _(
    q: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    sinks: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor | None,
    *,
    fmt_key: str,
    launch: str,
    num_splits: int,
    layer: int,
    scale: float,
    sliding_window: int,
    softcap: float,
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
    plan: DecodePlan | None = None,
    out: torch.Tensor | None = None,
    return_lse: bool = False,
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
        plan: a :func:`plan_decode` plan for this layer shape, instead of ``num_splits``,
            ``max_seq_len`` and ``config`` (serving engines plan once per batch size).
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
    batch, num_heads, num_kv_heads, _ = check_attention_common(q, cache, fmt, "q")
    kernel_format(fmt)  # rejects layouts the kernels do not read (raises before any launch)
    check_paged_cache(cache, block_table, seq_lens, batch)
    if sinks is not None and (sinks.shape != (num_heads,) or sinks.device != q.device):
        raise ValueError(f"sinks must be a [{num_heads}] tensor on {q.device}, got {tuple(sinks.shape)}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device}")
    if plan is None:
        bound = max_seq_len if max_seq_len is not None else block_table.shape[1] * cache.shape[2]
        plan = plan_decode(
            fmt, num_heads, num_kv_heads, max(batch, 1), max(bound, 1), q.device,
            config=config, num_splits=num_splits, cache=cache,
        )  # fmt: skip
    elif not isinstance(plan, DecodePlan):
        raise ValueError(f"plan must be a DecodePlan from plan_decode, got {type(plan).__name__}")
    elif num_splits is not None or config is not None or max_seq_len is not None:
        raise ValueError("pass either plan or num_splits/max_seq_len/config (the plan holds them)")
    elif (plan.fmt, plan.num_heads, plan.num_kv_heads) != (fmt, num_heads, num_kv_heads):
        raise ValueError(
            f"plan was made for {plan.fmt.name or 'another format'} with {plan.num_heads} heads and "
            f"{plan.num_kv_heads} KV heads, the launch has {fmt.name or 'its format'} with {num_heads} and "
            f"{num_kv_heads}: plan each layer shape with plan_decode"
        )

    if out is None:
        out = torch.empty_like(q)
    lse = torch.empty(batch, num_heads, dtype=torch.float32, device=q.device) if return_lse else None
    _decode_op(
        q,
        cache,
        block_table,
        seq_lens,
        sinks,
        out,
        lse,
        fmt_key=format_key(fmt),
        launch=launch_key(plan.config),
        num_splits=plan.num_splits,
        layer=layer,
        scale=fmt.head_dim**-0.5 if scale is None else float(scale),
        sliding_window=int(sliding_window or 0),
        softcap=float(softcap or 0.0),
    )
    return (out, lse) if lse is not None else out
