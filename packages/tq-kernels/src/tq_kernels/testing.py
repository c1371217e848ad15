"""GPU timing and inputs for the kernels' tests, benchmarks and experiments: CUDA-event timings, CUDA-graph
replays, copy bandwidth, paged caches with known contents, and the byte-table reference.

The kernel tests, the benchmarks (``packages/tq-kernels/benchmarks``) and the kernel experiments share
these, so a timing and a test input mean the same everywhere:

* :func:`gpu_time_ms`: median, 20th and 80th percentile milliseconds of a callable on the GPU, timed with
  CUDA events by :func:`triton.testing.do_bench` (which clears the L2 cache between calls); with
  ``cuda_graph=True`` (the default) of one replay of the callable captured in a CUDA graph, i.e. the GPU
  time without the host's launch overhead, which is how vLLM runs decode (full CUDA graphs).
* :func:`copy_bandwidth_gbps`: the device-to-device copy bandwidth measured on this GPU, the yardstick
  of a memory-bound kernel's GB/s.
* :func:`filled_paged_cache`: a paged cache of any size holding valid slots written by the tq_core
  reference store, so attention over it has finite, meaningful inputs.
* :func:`random_paged_cache`: a small paged cache holding random K/V for sequences of given lengths,
  blocks scattered at random and unused bytes poisoned, returned with the K/V it holds (CPU).
* :func:`reference_on_byte_grid`: a context in which the tq_core reference reads the 256-level centroids
  of the decode kernel's byte-table loop (``LaunchConfig(lut="byte")``), the reference that loop is
  checked against.

Timing needs a CUDA device; the cache builders run on any device torch has.

Example:
    >>> import torch
    >>> from tq_core import named_format
    >>> cache = filled_paged_cache(named_format("turboquant_4bit_nc", 64), 3, 16, 2, device="cpu")
    >>> tuple(cache.shape)
    (3, 2, 16, 70)
    >>> if torch.cuda.is_available():
    ...     x = torch.ones(1 << 20, device="cuda")
    ...     median, p20, p80 = gpu_time_ms(lambda: x.mul_(1.0))
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from unittest import mock

import torch

from tq_core.formats import KVFormat
from tq_core.quantizers import TurboQuantMSE
from tq_core.testing import poisoned

__all__ = [
    "copy_bandwidth_gbps",
    "filled_paged_cache",
    "gpu_time_ms",
    "random_paged_cache",
    "reference_on_byte_grid",
]


def _require_cuda(what: str) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"{what} times work on a CUDA device, and torch sees none; run it on a GPU machine"
        )


def gpu_time_ms(
    fn: Callable[[], object], *, cuda_graph: bool = True, warmup: int = 25, rep: int = 100
) -> tuple[float, float, float]:
    """``(median, p20, p80)`` milliseconds of one call of ``fn`` on the current CUDA device.

    Args:
        fn: a callable with no arguments that launches GPU work on the current stream.
        cuda_graph: time one replay of ``fn`` captured in a CUDA graph (after 3 warm-up calls on a side
            stream, which also compile any Triton kernel); ``False`` times the eager call, host launch
            cost included.
        warmup: milliseconds of warm-up calls before timing (``triton.testing.do_bench``'s ``warmup``).
        rep: milliseconds of timed calls (``do_bench``'s ``rep``).

    Raises:
        RuntimeError: without a CUDA device.
        ValueError: ``fn`` is not callable, or ``warmup``/``rep`` are not positive integers.

    Example:
        >>> import torch
        >>> if torch.cuda.is_available():
        ...     x = torch.ones(1 << 20, device="cuda")
        ...     median, p20, p80 = gpu_time_ms(lambda: x.mul_(1.0), cuda_graph=False)
    """
    if not callable(fn):
        raise ValueError(f"fn must be a callable with no arguments, got {type(fn).__name__}")
    for name, value in (("warmup", warmup), ("rep", rep)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive number of milliseconds (int), got {value!r}")
    _require_cuda("gpu_time_ms")
    import triton.testing

    timed = fn
    if cuda_graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (compiles, allocator) off the capturing stream
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        timed = graph.replay
    med, p20, p80 = triton.testing.do_bench(timed, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return float(med), float(p20), float(p80)


def copy_bandwidth_gbps(nbytes: int = 4 << 30) -> float:
    """Device-to-device copy bandwidth of the current CUDA device in GB/s (bytes read + written per second),
    measured by copying ``nbytes // 2`` bytes into another buffer (eager calls, median).

    Raises:
        RuntimeError: without a CUDA device.
        ValueError: ``nbytes`` is not an integer of at least 2 MiB (smaller copies time the L2 cache).

    Example:
        >>> import torch
        >>> if torch.cuda.is_available():
        ...     assert copy_bandwidth_gbps(1 << 28) > 0
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 2 << 20:
        raise ValueError(
            f"nbytes must be an int >= 2 MiB (2097152) so the copy leaves the L2 cache, got {nbytes!r}"
        )
    _require_cuda("copy_bandwidth_gbps")
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    med, _, _ = gpu_time_ms(lambda: dst.copy_(src), cuda_graph=False)
    return 2 * src.numel() / (med * 1e-3) / 1e9


def filled_paged_cache(
    fmt: KVFormat,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    *,
    device: torch.device | str = "cuda",
    seed: int = 0,
    max_written_blocks: int = 4096,
) -> torch.Tensor:
    """A paged cache `[num_blocks, num_kv_heads, block_size, slot_bytes]` whose every slot is valid.

    Random K/V (bfloat16, unit normal) are written through the tq_core reference store
    (:meth:`~tq_core.formats.KVFormat.store_paged`) into the first ``max_written_blocks`` blocks; the
    rest of the cache repeats those blocks, so a cache of millions of slots costs one reference encode
    of at most ``max_written_blocks * block_size`` tokens.

    Raises:
        ValueError: ``fmt`` is not a KVFormat, or a size is not a positive integer.

    Example:
        >>> from tq_core import named_format
        >>> fmt = named_format("turboquant_3bit_nc", 64)
        >>> cache = filled_paged_cache(fmt, 5, 4, 1, device="cpu", max_written_blocks=2)
        >>> bool((cache[2:4] == cache[:2]).all())
        True
    """
    if not isinstance(fmt, KVFormat):
        raise ValueError(
            f"fmt must be a tq_core KVFormat (see tq_core.named_format), got {type(fmt).__name__}"
        )
    sizes = {
        "num_blocks": num_blocks,
        "block_size": block_size,
        "num_kv_heads": num_kv_heads,
        "max_written_blocks": max_written_blocks,
    }
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    cache = fmt.allocate_cache(num_blocks, block_size, num_kv_heads, device=device)
    filled = min(num_blocks, max_written_blocks)
    n = filled * block_size
    g = torch.Generator(device=cache.device).manual_seed(seed)
    k = torch.randn(n, num_kv_heads, fmt.head_dim, device=cache.device, generator=g).to(torch.bfloat16)
    v = torch.randn(n, num_kv_heads, fmt.head_dim, device=cache.device, generator=g).to(torch.bfloat16)
    fmt.store_paged(cache, k, v, torch.arange(n, device=cache.device))
    for start in range(filled, num_blocks, filled):
        cache[start : start + filled] = cache[: min(filled, num_blocks - start)]
    return cache


def _check_format(fmt: object) -> None:
    if not isinstance(fmt, KVFormat):
        raise ValueError(
            f"fmt must be a tq_core KVFormat (see tq_core.named_format), got {type(fmt).__name__}"
        )


def random_paged_cache(
    fmt: KVFormat,
    lens: Sequence[int],
    num_kv_heads: int,
    page: int,
    *,
    seed: int = 0,
    spare_blocks: int = 3,
    layer: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """A CPU paged cache holding random K/V for sequences of ``lens`` tokens, and the K/V it holds.

    Keys are unit normal times 2, values unit normal (float32, one generator seeded with ``seed``),
    written through the tq_core reference store (:meth:`~tq_core.formats.KVFormat.store_paged`) with
    ``layer``'s rotation.  Every sequence gets ``ceil(max(lens) / page)`` blocks picked at random from
    ``len(lens) * that + spare_blocks``; bytes no token was written to keep
    :data:`tq_core.testing.POISON_BYTE`, so a kernel that reads outside the table's blocks or past a
    sequence's length sees poison.

    Args:
        fmt: the cache's format.
        lens: tokens per sequence (each >= 0; at least one sequence).
        num_kv_heads: KV heads of the cache.
        page: tokens per block.
        seed: seed of the block permutation and the K/V.
        spare_blocks: blocks no sequence uses.
        layer: the layer whose rotation the store uses.

    Returns:
        ``(cache, block_table, keys, values)``: uint8 cache
        `[num_blocks, num_kv_heads, page, slot_bytes]`, int32 block table `[len(lens), max_blocks]`, and per
        sequence float32 keys and values `[lens[b], num_kv_heads, head_dim]`.

    Raises:
        ValueError: ``fmt`` is not a KVFormat, ``lens`` is empty or holds a negative length, or a size is
            not an integer in range.

    Example:
        >>> from tq_core import named_format
        >>> fmt = named_format("turboquant_4bit_nc", 64)
        >>> cache, table, keys, values = random_paged_cache(fmt, [5, 20], 2, 16)
        >>> tuple(table.shape), tuple(keys[1].shape)
        ((2, 2), (20, 2, 64))
        >>> k, _ = fmt.gather_paged(cache, table[1], 20)
        >>> k.shape == keys[1].shape
        True
    """
    _check_format(fmt)
    lens = list(lens)
    if not lens or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in lens):
        raise ValueError(f"lens must be a non-empty list of token counts (ints >= 0), got {lens!r}")
    limits = {"num_kv_heads": (num_kv_heads, 1), "page": (page, 1), "spare_blocks": (spare_blocks, 0),
              "layer": (layer, 0), "seed": (seed, 0)}  # fmt: skip
    for name, (value, low) in limits.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(1, max((n + page - 1) // page for n in lens))
    nblocks = len(lens) * max_blocks + spare_blocks
    table = torch.randperm(nblocks, generator=g)[: len(lens) * max_blocks].view(len(lens), max_blocks)
    cache = poisoned(fmt.cache_shape(nblocks, page, num_kv_heads), dtype=torch.uint8)
    keys, values = [], []
    for b, n in enumerate(lens):
        k = torch.randn(n, num_kv_heads, fmt.head_dim, generator=g) * 2
        v = torch.randn(n, num_kv_heads, fmt.head_dim, generator=g)
        pos = torch.arange(n)
        fmt.store_paged(cache, k, v, table[b][pos // page] * page + pos % page, layer=layer)
        keys.append(k)
        values.append(v)
    return cache, table.to(torch.int32), keys, values


@contextlib.contextmanager
def reference_on_byte_grid(fmt: KVFormat | None) -> Iterator[None]:
    """While inside, the tq_core reference decodes 4-bit codes to the byte-table loop's centroids.

    The decode kernel's byte-table loop (``LaunchConfig(lut="byte")``) reads centroids rounded to a
    256-level grid (``scale * (m - 127.5)``); inside this context
    :meth:`tq_core.quantizers.TurboQuantMSE.centroids` returns those, so the reference
    (:func:`tq_core.paged_decode_attention_ref`) computes the attention that loop must match.  ``fmt``
    None, or a format whose keys and values are not single 4-bit planes (the loop does not read it),
    leaves the reference as it is.  The patch is of the class, process-wide: do not run kernels of other
    threads' tests inside.

    Raises:
        ValueError: ``fmt`` is neither None nor a KVFormat.

    Example:
        >>> import torch
        >>> from tq_core import named_format
        >>> fmt = named_format("turboquant_4bit_nc", 64)
        >>> cache, table, _, _ = random_paged_cache(fmt, [40], 1, 16)
        >>> k, _ = fmt.gather_paged(cache, table[0], 40)
        >>> with reference_on_byte_grid(fmt):
        ...     k_grid, _ = fmt.gather_paged(cache, table[0], 40)
        >>> bool(torch.equal(k, k_grid)), bool(torch.allclose(k, k_grid, atol=0.05 * k.abs().max()))
        (False, True)
    """
    if fmt is not None:
        _check_format(fmt)
    from tq_kernels._format import byte_centroids
    from tq_kernels.ops.decode import nibble_format

    if fmt is None or not nibble_format(fmt):
        yield
        return
    kc, vc = byte_centroids(fmt)
    if not torch.equal(kc, vc):  # one codebook per bit width: keys and values share the grid
        raise AssertionError(
            "the byte tables of keys and values differ; the byte-table reference assumes one"
        )
    with mock.patch.object(TurboQuantMSE, "centroids", lambda self, idx: kc.to(idx.device)[idx.long()]):
        yield
