import itertools

import pytest
import torch
from _paged import make_paged

from tq_core import named_format, paged_extend_attention_ref
from tq_core.attention import mm_prefix_key_end
from tq_core.testing import ATTENTION_RTOL, poisoned_like, rel_err
from tq_kernels.ops.extend import tq_extend_attention
from tq_kernels.tuning import LaunchConfig

# 16-key tiles: several tiles per prefix and chunk, so tile boundaries are exercised
SMALL = LaunchConfig(block_n=16, num_warps=4, num_stages=1)
# each loop of the kernel: the plane loop, the eight-phase loop (4-bit formats), the eight-phase loop
# for 3-bit codes too (the loop a format cannot run falls back to the plane loop)
LOOPS = {
    "plane": LaunchConfig(block_n=16, num_warps=4, num_stages=1, nibble=False),
    "nibble": SMALL,
    "nibble3": LaunchConfig(block_n=16, num_warps=4, num_stages=1, nibble_3bit=True),
}

CASES = [
    # id, prefix lens, chunk lens, heads, kv heads, page, format
    ("B1-P0-C5-H2-KV2-P16-4bit", [0], [5], 2, 2, 16, "turboquant_4bit_nc"),
    ("B2-P37.0-C1.9-H4-KV1-P16-3bit", [37, 0], [1, 9], 4, 1, 16, "turboquant_3bit_nc"),
    ("B3-P5.70.16-C17.3.0-H6-KV2-P4-k3v4", [5, 70, 16], [17, 3, 0], 6, 2, 4, "turboquant_k3v4_nc"),
    ("B1-P20-C33-H8-KV8-P32-k8v4", [20], [33], 8, 8, 32, "turboquant_k8v4"),
]


def _setup(prefix, chunk, heads, kv_heads, page, fmt_name, d=64, seed=0):
    fmt = named_format(fmt_name, d)
    lens = [p + c for p, c in zip(prefix, chunk, strict=True)]
    cache, table, keys, values = make_paged(fmt, lens, kv_heads, page, seed=seed, layer=2)
    # the chunk's own K/V: its slots are in the cache too (vLLM stores before attending), but the
    # kernel must use the exact values passed in
    k_new = torch.cat([k[p:] for k, p in zip(keys, prefix, strict=True)])
    v_new = torch.cat([v[p:] for v, p in zip(values, prefix, strict=True)])
    qsl = torch.tensor([0, *torch.tensor(chunk).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), heads, d, generator=torch.Generator().manual_seed(seed + 1))
    return fmt, cache, table, k_new, v_new, torch.tensor(prefix, dtype=torch.int32), qsl, q


@pytest.mark.parametrize("loop", list(LOOPS))
@pytest.mark.parametrize(
    ("prefix", "chunk", "heads", "kv_heads", "page", "fmt_name"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_extend_matches_reference(prefix, chunk, heads, kv_heads, page, fmt_name, loop):
    fmt, cache, table, k_new, v_new, plens, qsl, q = _setup(prefix, chunk, heads, kv_heads, page, fmt_name)
    out = poisoned_like(q)
    tq_extend_attention(
        q, k_new, v_new, cache, table, plens, qsl, max(chunk), fmt, layer=2, block_r=32, config=LOOPS[loop],
        out=out,
    )  # fmt: skip
    ref = paged_extend_attention_ref(q, k_new, v_new, cache, table, plens, qsl, fmt, layer=2)
    assert not out.isnan().any()
    assert rel_err(out, ref) < ATTENTION_RTOL[torch.float32]


@pytest.mark.parametrize(
    "kwargs",
    [{"softcap": 4.0}, {"sliding_window": 7}, {"sinks": "random"}, {"sliding_window": 30, "softcap": 4.0}],
    ids=["softcap", "window7", "sinks", "window30-softcap"],
)
@pytest.mark.parametrize("loop", ["plane", "nibble"])
def test_extend_features(kwargs, loop):
    fmt, cache, table, k_new, v_new, plens, qsl, q = _setup(
        [40, 3], [12, 20], 4, 2, 16, "turboquant_4bit_nc", seed=4
    )
    kw = dict(kwargs)
    if kw.get("sinks") == "random":
        kw["sinks"] = torch.randn(4)
    out = tq_extend_attention(
        q, k_new, v_new, cache, table, plens, qsl, 20, fmt, layer=2, block_r=32, config=LOOPS[loop], **kw
    )
    ref = paged_extend_attention_ref(q, k_new, v_new, cache, table, plens, qsl, fmt, layer=2, **kw)
    assert rel_err(out, ref) < ATTENTION_RTOL[torch.float32]


# media ranges (inclusive absolute positions, vLLM's convention) per sequence of prefixes [40, 3, 0]
# and chunks [12, 20, 33]: a range inside a chunk, one that starts in the cached prefix (a prefix-cache
# hit inside an image), two ranges in one chunk, one ending on the chunk's last token, a range beyond it
MEDIA_CASES = {
    "inside": [[(43, 48)], [], [(5, 20)]],
    "from-prefix": [[(30, 45)], [(0, 9), (12, 21)], [(0, 0), (31, 32)]],
    "to-chunk-end": [[(51, 51), (49, 51)], [(10, 22)], [(1, 40)]],
}


@pytest.mark.parametrize("window", [None, 24], ids=["full", "window24"])
@pytest.mark.parametrize("media", list(MEDIA_CASES))
@pytest.mark.parametrize("loop", ["plane", "nibble"])
def test_extend_media_ranges_match_the_prefix_lm_mask(media, window, loop):
    """Bidirectional media ranges through ``key_end``: the same attention as the reference's explicit
    (causal AND window) OR same-range mask, including ranges that start in the cached prefix."""
    # with a window, vLLM passes only ranges that fit in it (longer ones are dropped unless the model
    # clamps them to the window, where key_end's (causal OR range) AND window is that model's mask)
    ranges = [[r for r in rs if window is None or r[1] - r[0] < window] for rs in MEDIA_CASES[media]]
    prefix, chunk = [40, 3, 0], [12, 20, 33]
    fmt, cache, table, k_new, v_new, plens, qsl, q = _setup(
        prefix, chunk, 4, 2, 16, "turboquant_4bit_nc", seed=8
    )
    key_end = mm_prefix_key_end(ranges, qsl.tolist(), prefix)
    assert key_end is not None
    ref = paged_extend_attention_ref(
        q, k_new, v_new, cache, table, plens, qsl, fmt, layer=2, sliding_window=window, mm_ranges=ranges
    )
    causal = paged_extend_attention_ref(
        q, k_new, v_new, cache, table, plens, qsl, fmt, layer=2, sliding_window=window
    )
    assert rel_err(causal, ref) > 0.05  # the ranges change the answer: the test can fail
    out = poisoned_like(q)
    tq_extend_attention(
        q, k_new, v_new, cache, table, plens, qsl, 33, fmt, layer=2, sliding_window=window,
        key_end=torch.tensor(key_end, dtype=torch.int32), config=LOOPS[loop], block_r=32, out=out,
    )  # fmt: skip
    assert rel_err(out, ref) < ATTENTION_RTOL[torch.float32]


def test_extend_key_end_is_validated():
    fmt, cache, table, k_new, v_new, plens, qsl, q = _setup([3], [5], 2, 2, 16, "turboquant_4bit_nc")
    for bad in (torch.ones(4, dtype=torch.int32), torch.ones(5, dtype=torch.int64), [1, 2, 3, 4, 5]):
        with pytest.raises(ValueError, match="key_end must be an int32"):
            tq_extend_attention(q, k_new, v_new, cache, table, plens, qsl, 5, fmt, key_end=bad)


@pytest.mark.parametrize(
    ("fmt_name", "loop"),
    [("turboquant_4bit_nc", "nibble"), ("turboquant_3bit_nc", "nibble3"), ("turboquant_k3v4_nc", "nibble3")],
)
def test_extend_loops_agree(fmt_name, loop):
    """The eight-phase loop (gathering from the table, as on CPU) reads these caches (no silent fallback)
    and computes what the plane loop computes, up to float32 summation order."""
    from tq_kernels._format import kernel_format
    from tq_kernels.ops.decode import nibble_eligible

    fmt, cache, table, k_new, v_new, plens, qsl, q = _setup(
        [45, 16, 0], [9, 20, 5], 8, 2, 16, fmt_name, seed=9
    )
    assert nibble_eligible(kernel_format(fmt), cache, allow_3bit=LOOPS[loop].nibble_3bit)
    outs = [
        tq_extend_attention(
            q, k_new, v_new, cache, table, plens, qsl, 20, fmt, layer=2, block_r=32, config=LOOPS[name],
            sliding_window=30,
        )
        for name in ("plane", loop)
    ]  # fmt: skip
    ref = paged_extend_attention_ref(
        q, k_new, v_new, cache, table, plens, qsl, fmt, layer=2, sliding_window=30
    )
    for out in outs:
        assert rel_err(out, ref) < ATTENTION_RTOL[torch.float32]
    assert rel_err(outs[0], outs[1]) < 1e-4


def test_extend_bf16_inputs():
    fmt, cache, table, k_new, v_new, plens, qsl, q = _setup([10], [6], 2, 1, 16, "turboquant_3bit_nc", seed=7)
    out = tq_extend_attention(
        q.bfloat16(), k_new.bfloat16(), v_new.bfloat16(), cache, table, plens, qsl, 6, fmt, layer=2
    )
    ref = paged_extend_attention_ref(
        q.bfloat16().float(),
        k_new.bfloat16().float(),
        v_new.bfloat16().float(),
        cache,
        table,
        plens,
        qsl,
        fmt,
        layer=2,
    )
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < ATTENTION_RTOL[torch.bfloat16]


def test_extend_bad_input():
    fmt, cache, table, k_new, v_new, plens, qsl, q = _setup([3], [4], 2, 1, 16, "turboquant_4bit_nc")
    with pytest.raises(ValueError, match="key must be"):
        tq_extend_attention(q, k_new[:2], v_new, cache, table, plens, qsl, 4, fmt)
    with pytest.raises(ValueError, match="query_start_loc must be"):
        tq_extend_attention(q, k_new, v_new, cache, table, plens, qsl[:1], 4, fmt)
    with pytest.raises(ValueError, match="sliding_window"):
        tq_extend_attention(q, k_new, v_new, cache, table, plens, qsl, 4, fmt, sliding_window=0)


GPU_MATRIX = [
    (d, page, group, name)
    for d in (64, 96, 128)
    for page, group in ((16, 1), (64, 4))
    for name in ("turboquant_4bit_nc", "turboquant_3bit_nc", "turboquant_k8v4", "turboquant_k3v4_nc")
]


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("d", "page", "group", "fmt_name"), GPU_MATRIX, ids=[f"D{d}-P{p}-G{g}-{n}" for d, p, g, n in GPU_MATRIX]
)
def test_extend_gpu_matrix(d, page, group, fmt_name):
    prefix, chunk = [0, 700, 2048], [300, 129, 1]
    fmt = named_format(fmt_name, d)
    lens = [p + c for p, c in zip(prefix, chunk, strict=True)]
    cache, table, keys, values = make_paged(fmt, lens, 2, page, seed=d)
    dev = "cuda"
    k_new = torch.cat([k[p:] for k, p in zip(keys, prefix, strict=True)]).to(dev, torch.bfloat16)
    v_new = torch.cat([v[p:] for v, p in zip(values, prefix, strict=True)]).to(dev, torch.bfloat16)
    qsl = torch.tensor([0, *torch.tensor(chunk).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    q = torch.randn(int(qsl[-1]), 2 * group, d, device=dev, dtype=torch.bfloat16)
    plens = torch.tensor(prefix, dtype=torch.int32, device=dev)
    cache, table = cache.to(dev), table.to(dev)
    # the default (plane loop on GPUs), then the opt-in eight-phase loop (3-bit codes too, symmetric lookup)
    configs = (None, LaunchConfig(64, 4, 2, nibble=True, lut="sym", nibble_3bit=True))
    for config, kw in itertools.product(configs, ({}, {"sliding_window": 500, "softcap": 20.0})):
        out = tq_extend_attention(
            q, k_new, v_new, cache, table, plens, qsl, max(chunk), fmt, config=config, **kw
        )
        ref = paged_extend_attention_ref(
            q.float(), k_new.float(), v_new.float(), cache, table, plens, qsl, fmt, **kw
        )
        assert not out.isnan().any()
        assert rel_err(out, ref) < ATTENTION_RTOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("d", [128, 256])
def test_extend_media_ranges_gpu(d):
    """key_end compiled for the GPU (plane loop and the eight-phase loop with its register lookup): a
    10-image prompt cut into chunks at image boundaries, against the reference's prefix-LM mask."""
    prefix, chunk = [0, 1100, 600], [1300, 800, 7]
    ranges = [[(10 + 130 * i, 137 + 130 * i) for i in range(10)], [(1000, 1400), (1500, 1700)], [(590, 604)]]
    fmt = named_format("turboquant_4bit_nc", d)
    lens = [p + c for p, c in zip(prefix, chunk, strict=True)]
    cache, table, keys, values = make_paged(fmt, lens, 2, 16, seed=d)
    dev = "cuda"
    k_new = torch.cat([k[p:] for k, p in zip(keys, prefix, strict=True)]).to(dev, torch.bfloat16)
    v_new = torch.cat([v[p:] for v, p in zip(values, prefix, strict=True)]).to(dev, torch.bfloat16)
    qsl = torch.tensor([0, *torch.tensor(chunk).cumsum(0).tolist()], dtype=torch.int32)
    key_end = torch.tensor(mm_prefix_key_end(ranges, qsl.tolist(), prefix), dtype=torch.int32, device=dev)
    qsl = qsl.to(dev)
    q = torch.randn(int(qsl[-1]), 8, d, device=dev, dtype=torch.bfloat16)
    plens = torch.tensor(prefix, dtype=torch.int32, device=dev)
    cache, table = cache.to(dev), table.to(dev)
    ref = paged_extend_attention_ref(
        q.float(), k_new.float(), v_new.float(), cache, table, plens, qsl, fmt, mm_ranges=ranges
    )
    for config in (None, LaunchConfig(64, 4, 2, nibble=True, lut="sym")):
        out = torch.full_like(q, float("nan"))
        tq_extend_attention(
            q,
            k_new,
            v_new,
            cache,
            table,
            plens,
            qsl,
            max(chunk),
            fmt,
            key_end=key_end,
            config=config,
            out=out,
        )
        assert rel_err(out, ref) < ATTENTION_RTOL[torch.bfloat16]


def test_extend_custom_op_passes_opcheck():
    """tq::extend_attention is a registered custom op (schema, fake tensor and mutation checks)."""
    from tq_kernels.ops._registry import format_key

    fmt, cache, table, k_new, v_new, plens, qsl, q = _setup(
        [9, 0], [5, 7], 4, 2, 16, "turboquant_4bit_nc", seed=6
    )
    out = torch.empty_like(q)
    args = (
        q,
        k_new,
        v_new,
        cache,
        table,
        plens,
        qsl,
        7,
        format_key(fmt),
        1,
        0.125,
        0,
        0.0,
        None,
        # key_end: each row's causal end, as a tensor (the optional tensor argument is checked too)
        torch.tensor([1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 6, 7], dtype=torch.int32),
        32,
        32,
        4,
        1,
        True,
        "exact",
        False,
        out,
    )
    torch.library.opcheck(torch.ops.tq.extend_attention.default, args)
    torch.ops.tq.extend_attention(*args)
    ref = paged_extend_attention_ref(q, k_new, v_new, cache, table, plens, qsl, fmt, layer=1, scale=0.125)
    assert rel_err(out, ref) < ATTENTION_RTOL[torch.float32]


def test_block_table_stride_is_not_specialized():
    """Triton compiles a separate variant for an integer argument equal to 1; a one-column warm-up
    table would then not warm the variant a serving engine's table needs, and the compile would land in
    the first timed request (it did in vLLM on 2026-11-28).  The paged kernels keep that stride generic."""
    from tq_kernels._kernels.decode import _tq_decode_attention_kernel
    from tq_kernels._kernels.extend import _tq_extend_attention_kernel

    for kernel in (_tq_decode_attention_kernel, _tq_extend_attention_kernel):
        # a JITFunction keeps the list; under TRITON_INTERPRET=1 the wrapper keeps the decorator's kwargs
        names = getattr(kernel, "do_not_specialize", None) or kernel.kwargs.get("do_not_specialize", [])
        names = [kernel.arg_names[n] if isinstance(n, int) else n for n in names]
        assert "stride_bt_b" in names, kernel.fn.__name__
