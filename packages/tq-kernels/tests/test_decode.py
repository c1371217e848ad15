import pytest
import torch
from _paged import make_paged

from tq_core import named_format, paged_decode_attention_ref
from tq_core.formats import ComponentFormat, KVFormat
from tq_core.testing import ATTENTION_RTOL, poisoned, poisoned_like, rel_err
from tq_kernels.ops.decode import tq_decode_attention
from tq_kernels.testing import reference_on_byte_grid as byte_grid
from tq_kernels.tuning import MAX_SPLITS, LaunchConfig

FORMATS = {
    "4bit": named_format("turboquant_4bit_nc", 64),
    "3bit": named_format("turboquant_3bit_nc", 64),
    "k8v4": named_format("turboquant_k8v4", 64),
    "k3v4": named_format("turboquant_k3v4_nc", 64),
    "bf16norm-raw": KVFormat(64, ComponentFormat(2, 0, "bfloat16", False), ComponentFormat(5, 0, "float32")),
}

CASES = [
    # name, lens, heads, kv_heads, page, fmt
    ("B1-L1-H2-KV2-P16", [1], 2, 2, 16, "4bit"),
    ("B3-L1.37.70-H4-KV2-P16", [1, 37, 70], 4, 2, 16, "3bit"),
    ("B2-L63.5-H8-KV1-P4", [63, 5], 8, 1, 4, "k8v4"),
    ("B2-L33.0-H6-KV2-P32", [33, 0], 6, 2, 32, "k3v4"),
    ("B2-L20.65-H2-KV1-P16-mixednorm", [20, 65], 2, 1, 16, "bf16norm-raw"),
]


@pytest.mark.parametrize(
    ("lens", "heads", "kv_heads", "page", "fmt_name"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_matches_reference(lens, heads, kv_heads, page, fmt_name, num_splits):
    fmt = FORMATS[fmt_name]
    cache, table, _, _ = make_paged(fmt, lens, kv_heads, page, seed=len(lens) + heads, layer=1)
    q = torch.randn(len(lens), heads, 64)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    out = poisoned_like(q)
    tq_decode_attention(q, cache, table, seq_lens, fmt, layer=1, num_splits=num_splits, out=out)
    ref = paged_decode_attention_ref(q, cache, table, seq_lens, fmt, layer=1)
    assert not out.isnan().any()
    assert rel_err(out, ref) < ATTENTION_RTOL[torch.float32]
    assert bool((out[seq_lens == 0] == 0).all())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"softcap": 3.0},
        {"sliding_window": 9},
        {"sinks": "random"},
        {"scale": 0.3},
        {"softcap": 3.0, "sliding_window": 40, "sinks": "random"},
    ],
    ids=["softcap", "window", "sinks", "scale", "all"],
)
def test_decode_features(kwargs):
    fmt = FORMATS["4bit"]
    lens = [50, 7]
    cache, table, _, _ = make_paged(fmt, lens, 2, 16, seed=3)
    q = torch.randn(2, 4, 64) * 2
    kw = dict(kwargs)
    if kw.get("sinks") == "random":
        kw["sinks"] = torch.randn(4)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    out = tq_decode_attention(q, cache, table, seq_lens, fmt, num_splits=2, **kw)
    ref = paged_decode_attention_ref(q, cache, table, seq_lens, fmt, **kw)
    assert rel_err(out, ref) < ATTENTION_RTOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_decode_half_precision_queries(dtype):
    fmt = FORMATS["4bit"]
    cache, table, _, _ = make_paged(fmt, [30], 1, 16, seed=5)
    q = torch.randn(1, 2, 64).to(dtype)
    seq_lens = torch.tensor([30], dtype=torch.int32)
    out = tq_decode_attention(q, cache, table, seq_lens, fmt)
    assert out.dtype == dtype
    ref = paged_decode_attention_ref(q.float(), cache, table, seq_lens, fmt)
    assert rel_err(out, ref) < ATTENTION_RTOL[dtype]


@pytest.mark.parametrize("d", [80, 96, 128])
def test_decode_head_dims(d):
    fmt = named_format("turboquant_4bit_nc", d)
    cache, table, _, _ = make_paged(fmt, [17], 1, 16, seed=d)
    q = torch.randn(1, 2, d)
    seq_lens = torch.tensor([17], dtype=torch.int32)
    ref = paged_decode_attention_ref(q, cache, table, seq_lens, fmt)
    assert rel_err(tq_decode_attention(q, cache, table, seq_lens, fmt), ref) < ATTENTION_RTOL[torch.float32]


def test_decode_close_to_exact_attention():
    # the kernel and the reference agree, and both approximate uncompressed attention
    from tq_core import attention_ref

    fmt = named_format("turboquant_k8v4", 64)
    cache, table, keys, values = make_paged(fmt, [64], 2, 16, seed=9)
    q = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(9))
    out = tq_decode_attention(q, cache, table, torch.tensor([64], dtype=torch.int32), fmt)
    exact = attention_ref(q, keys[0], values[0])
    # 6-bit keys and values: ~2.5% error per vector, a few percent on the output
    assert rel_err(out, exact) < 0.08


def test_decode_permuted_cache_strides():
    # vLLM may hand us another order of blocks and heads: the kernel must follow strides, not assume contiguity
    fmt = FORMATS["3bit"]
    cache, table, _, _ = make_paged(fmt, [25], 2, 8, seed=2)
    head_major = cache.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)  # heads outermost in memory
    assert head_major.stride() != cache.stride()
    q = torch.randn(1, 2, 64)
    seq_lens = torch.tensor([25], dtype=torch.int32)
    ref = paged_decode_attention_ref(q, cache, table, seq_lens, fmt)
    assert (
        rel_err(tq_decode_attention(q, head_major, table, seq_lens, fmt), ref) < ATTENTION_RTOL[torch.float32]
    )


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda a: a.update(q=a["q"].to(torch.int32)), "float16, bfloat16 or float32"),
        (lambda a: a.update(q=a["q"][..., :32]), "head_dim 32 does not match"),
        (
            lambda a: a.update(cache=a["cache"][..., :-1]),
            r"cache must be \[num_blocks, num_kv_heads, block_size, 70\]",
        ),
        (lambda a: a.update(block_table=a["block_table"].float()), "block_table must be an int32"),
        (lambda a: a.update(seq_lens=a["seq_lens"][:0]), "sequence lengths must be"),
        (lambda a: a.update(q=a["q"][:, :3]), "multiple of num_kv_heads"),
        (lambda a: a.update(fmt="turboquant_4bit_nc"), "KVFormat"),
    ],
    ids=["int-q", "head-dim", "slot-bytes", "float-table", "lens-shape", "gqa", "fmt-type"],
)
def test_decode_bad_input(mutate, match):
    fmt = FORMATS["4bit"]
    cache, table, _, _ = make_paged(fmt, [5], 2, 16)
    args = {
        "q": torch.randn(1, 4, 64),
        "cache": cache,
        "block_table": table,
        "seq_lens": torch.tensor([5], dtype=torch.int32),
        "fmt": fmt,
    }
    mutate(args)
    with pytest.raises(ValueError, match=match):
        tq_decode_attention(args["q"], args["cache"], args["block_table"], args["seq_lens"], args["fmt"])


def test_unsupported_head_dim():
    fmt = named_format("turboquant_4bit_nc", 32)
    cache = fmt.allocate_cache(1, 16, 1)
    with pytest.raises(ValueError, match="head_dim 32 is not supported"):
        tq_decode_attention(
            torch.randn(1, 1, 32),
            cache,
            torch.zeros(1, 1, dtype=torch.int32),
            torch.ones(1, dtype=torch.int32),
            fmt,
        )


GPU_MATRIX = [
    (d, page, group, name)
    for d in (64, 80, 96, 128, 256)
    for page, group in ((16, 1), (32, 5), (128, 8))
    for name in ("turboquant_4bit_nc", "turboquant_3bit_nc", "turboquant_k8v4", "turboquant_k3v4_nc")
]


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("d", "page", "group", "fmt_name"), GPU_MATRIX, ids=[f"D{d}-P{p}-G{g}-{n}" for d, p, g, n in GPU_MATRIX]
)
def test_decode_gpu_matrix(d, page, group, fmt_name):
    fmt = named_format(fmt_name, d)
    lens = [1, 300, 1025, 4000]
    kv_heads = 2
    cache, table, _, _ = make_paged(fmt, lens, kv_heads, page, seed=d + page)
    cache, table = cache.cuda(), table.cuda()
    q = torch.randn(len(lens), kv_heads * group, d, device="cuda", dtype=torch.bfloat16)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    from tq_kernels.tuning import LaunchConfig

    configs = (
        None,
        # the symmetric-table lookup, and for 3-bit codes the opt-in eight-phase loop
        LaunchConfig(32, 1, 3, lut="sym", nibble_3bit=True),
        LaunchConfig(64, 4, 2, nibble=False),
        # the byte tables read in pairs, four tiles stacked a step (4-bit formats; others ignore both)
        LaunchConfig(32, 1, 3, lut="byte", chunks=4),
    )
    for config in configs:  # the default (NIBBLE for 4-bit), the opt-in lookups, the plane loop
        for kw in (
            {},
            {"sliding_window": 700, "softcap": 20.0, "sinks": torch.randn(kv_heads * group, device="cuda")},
        ):
            out = poisoned_like(q)
            tq_decode_attention(q, cache, table, seq_lens, fmt, out=out, config=config, **kw)
            with byte_grid(fmt if config is not None and config.lut == "byte" else None):
                ref = paged_decode_attention_ref(q.float(), cache, table, seq_lens, fmt, **kw)
            assert not out.isnan().any()
            assert rel_err(out, ref) < ATTENTION_RTOL[torch.bfloat16]


@pytest.mark.parametrize(
    ("d", "lens", "heads", "kwargs"),
    [
        (64, [45, 3, 70], 6, {}),
        (80, [33, 1], 4, {"softcap": 3.0, "sliding_window": 20}),
        (128, [70, 16, 0], 8, {"sinks": "random"}),
    ],
    ids=["d64", "d80-softcap-window", "d128-sinks"],
)
def test_decode_nibble_loop_matches_plane_loop(d, lens, heads, kwargs):
    """The eight-phase 4-bit loop (here gathering from the table, as on CPU and ROCm) and the plane
    loop compute the same attention, and both match the reference."""
    from tq_kernels.tuning import LaunchConfig

    fmt = named_format("turboquant_4bit_nc", d)
    cache, table, _, _ = make_paged(fmt, lens, 2, 16, seed=d)
    q = torch.randn(len(lens), heads, d)
    _check_loops_agree(
        fmt,
        cache,
        table,
        lens,
        q,
        kwargs,
        LaunchConfig(block_n=32, num_warps=4, num_stages=1, nibble=True),
        LaunchConfig(block_n=32, num_warps=4, num_stages=1, nibble=False),
    )


def _check_loops_agree(fmt, cache, table, lens, q, kwargs, cfg_a, cfg_b) -> None:
    """Both launch configurations (two decode loops) match the reference and each other."""
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    kw = dict(kwargs)
    if kw.get("sinks") == "random":
        kw["sinks"] = torch.randn(q.shape[1])
    outs = []
    for cfg in (cfg_a, cfg_b):
        out = poisoned_like(q)
        tq_decode_attention(q, cache, table, seq_lens, fmt, num_splits=2, config=cfg, out=out, **kw)
        outs.append(out)
    ref = paged_decode_attention_ref(q, cache, table, seq_lens, fmt, **kw)
    for out in outs:
        assert not out.isnan().any()
        assert rel_err(out, ref) < ATTENTION_RTOL[torch.float32]
    # Not bit-equal: both loops feed the P@V product float16 operands (p rescaled by each loop's own
    # running maximum, so rounded differently; float16's unit roundoff is 2**-11). Seen up to 1.6e-4 on
    # random inputs (and 7e-5 in 60 seeds of the d128 case); bounded here by two units of roundoff.
    assert rel_err(outs[0], outs[1]) < 2 * 2.0**-11


@pytest.mark.parametrize(
    ("fmt_name", "d", "kwargs"),
    [
        ("turboquant_3bit_nc", 64, {}),
        ("turboquant_k3v4_nc", 128, {"softcap": 3.0, "sliding_window": 30}),
        ("turboquant_3bit_nc", 96, {"sinks": "random"}),
    ],
    ids=["3bit-d64", "k3v4-d128-softcap-window", "3bit-d96-sinks"],
)
def test_decode_nibble_loop_reads_3bit_codes(fmt_name, d, kwargs):
    """With ``nibble_3bit`` the eight-phase loop also reads 3-bit codes (2-bit and 1-bit planes merged
    into one word per eight coordinates) and matches the plane loop and the reference."""
    from tq_kernels.ops.decode import nibble_format
    from tq_kernels.tuning import LaunchConfig

    fmt = named_format(fmt_name, d)
    assert not nibble_format(fmt) and nibble_format(fmt, allow_3bit=True)
    lens = [50, 7, 33]
    cache, table, _, _ = make_paged(fmt, lens, 2, 16, seed=d + 1)
    q = torch.randn(3, 4, d)
    _check_loops_agree(
        fmt, cache, table, lens, q, kwargs, LaunchConfig(32, 4, 1, nibble_3bit=True), LaunchConfig(32, 4, 1)
    )


def test_decode_rejects_an_unknown_lookup():
    from tq_kernels.tuning import LaunchConfig

    fmt = FORMATS["4bit"]
    cache, table, _, _ = make_paged(fmt, [5], 1, 16, seed=4)
    with pytest.raises(ValueError, match=r"config\.lut"):
        tq_decode_attention(
            torch.randn(1, 2, 64),
            cache,
            table,
            torch.tensor([5]),
            fmt,
            config=LaunchConfig(32, 1, 1, lut="fast"),
        )


def test_decode_nibble_loop_skips_misaligned_caches():
    """A cache whose code rows are not 4-byte aligned falls back to the byte-wise loop."""
    from tq_kernels._format import kernel_format
    from tq_kernels.ops.decode import nibble_eligible

    fmt = named_format("turboquant_4bit_nc", 64)
    kf = kernel_format(fmt)
    cache, table, _, _ = make_paged(fmt, [20], 1, 16, seed=2)
    assert nibble_eligible(kf, cache)
    shifted = torch.empty(cache.numel() + 1, dtype=torch.uint8)[1:].view(cache.shape)
    shifted.copy_(cache)
    assert not nibble_eligible(kf, shifted)
    assert not nibble_eligible(kernel_format(named_format("turboquant_3bit_nc", 64)), cache)
    q = torch.randn(1, 2, 64, generator=torch.Generator().manual_seed(5))
    seq_lens = torch.tensor([20], dtype=torch.int32)
    # the two loops sum in different orders: equal to float32 rounding, not bit for bit
    plane = tq_decode_attention(q, shifted, table, seq_lens, fmt)
    assert rel_err(plane, tq_decode_attention(q, cache, table, seq_lens, fmt)) < 1e-4
    assert (
        rel_err(plane, paged_decode_attention_ref(q, cache, table, seq_lens, fmt))
        < ATTENTION_RTOL[torch.float32]
    )


@pytest.mark.gpu
@pytest.mark.parametrize("symmetric", [False, True], ids=["exact", "sym"])
@pytest.mark.parametrize("d", [64, 96, 128, 256])
def test_decode_nibble_register_lookup_equals_gather(d, symmetric):
    """On the GPU the register lookup (PTX byte permutes) yields the same float16 centroids as the
    memory gather, so both runs of the same loop give identical outputs."""
    import triton
    import triton.language as tl

    from tq_kernels._format import kernel_format
    from tq_kernels._kernels.codes import _tq_nibble_phases

    @triton.jit
    def lookup(words_ptr, lut_ptr, out_ptr, ASM: tl.constexpr, N: tl.constexpr):
        offs = tl.arange(0, N)
        phases = _tq_nibble_phases(tl.load(words_ptr + offs), lut_ptr, ASM)
        for p in tl.static_range(8):
            tl.store(out_ptr + offs * 8 + p, phases[p])

    fmt = named_format("turboquant_4bit_nc", d)
    kf = kernel_format(fmt)
    gen = torch.Generator().manual_seed(d)
    words = torch.randint(0, 2**32, (4096,), dtype=torch.int64, generator=gen)
    lut = kf.centroids(torch.device("cuda"), torch.float16)[0][0].contiguous()  # row 0 of the key table
    got = poisoned((4096 * 8,), dtype=torch.float16, device="cuda")
    words_dev = (words - (words >= 2**31).long() * 2**32).to(torch.int32).cuda()  # same bits, as int32
    lookup[(1,)](words_dev, lut, got, ASM=kf.nibble_asm(symmetric=symmetric)[0], N=4096)
    codes = (words[:, None] >> (4 * torch.arange(8))) & 15  # on the host: bits [4p, 4p + 4) of each word
    assert torch.equal(got.cpu().view(4096, 8), lut.cpu()[codes])


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
def test_decode_nibble_register_lookup_reads_3bit_words(d):
    """The 3-bit register lookup (plane bytes spread to nibbles, 8-entry table) on the GPU equals the
    host's table lookup of the same codes."""
    import random

    import triton
    import triton.language as tl

    from tq_kernels._format import kernel_format
    from tq_kernels._kernels.codes import _tq_nibble_phases
    from tq_kernels._nibble_lut import word_3bit

    @triton.jit
    def lookup(words_ptr, lut_ptr, out_ptr, ASM: tl.constexpr, N: tl.constexpr):
        offs = tl.arange(0, N)
        phases = _tq_nibble_phases(tl.load(words_ptr + offs), lut_ptr, ASM, 3)
        for p in tl.static_range(8):
            tl.store(out_ptr + offs * 8 + p, phases[p])

    kf = kernel_format(named_format("turboquant_3bit_nc", d))
    rng = random.Random(d)
    codes = [[rng.randrange(8) for _ in range(8)] for _ in range(4096)]
    words = torch.tensor([word_3bit(c) for c in codes], dtype=torch.int32, device="cuda")
    lut = kf.centroids(torch.device("cuda"), torch.float16)[0][0].contiguous()  # row 0 of the key table
    got = poisoned((4096 * 8,), dtype=torch.float16, device="cuda")
    lookup[(1,)](words, lut, got, ASM=kf.nibble_asm()[0], N=4096)
    assert torch.equal(got.cpu().view(4096, 8), lut.cpu()[torch.tensor(codes)])


def test_decode_returns_log_sum_exp():
    fmt = FORMATS["4bit"]
    lens = [40, 0, 9]
    cache, table, _, _ = make_paged(fmt, lens, 2, 16, seed=11)
    q = torch.randn(3, 4, 64)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    out, lse = tq_decode_attention(q, cache, table, seq_lens, fmt, num_splits=3, softcap=5.0, return_lse=True)
    assert lse.shape == (3, 4) and lse.dtype == torch.float32
    for b, n in enumerate(lens):
        if n == 0:
            assert bool(torch.isneginf(lse[b]).all())
            continue
        k, _ = fmt.gather_paged(cache, table[b], n)
        kk = k.repeat_interleave(2, dim=1)  # [n, heads, d]
        s = torch.einsum("hd,nhd->hn", q[b], kk) * 64**-0.5
        s = 5.0 * torch.tanh(s / 5.0)
        torch.testing.assert_close(lse[b], torch.logsumexp(s, dim=-1), atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(
        out, tq_decode_attention(q, cache, table, seq_lens, fmt, num_splits=3, softcap=5.0)
    )


def test_decode_custom_op_passes_opcheck():
    """tq::decode_attention is a registered custom op (schema, fake tensor and mutation checks)."""
    from tq_kernels.ops._registry import format_key
    from tq_kernels.tuning import LaunchConfig, launch_key

    fmt = FORMATS["4bit"]
    cache, table, _, _ = make_paged(fmt, [20, 5], 2, 16, seed=13)
    q = torch.randn(2, 4, 64)
    seq_lens = torch.tensor([20, 5], dtype=torch.int32)
    out, lse = torch.empty_like(q), torch.empty(2, 4)
    args = (q, cache, table, seq_lens, None, out, lse)
    kwargs = dict(
        fmt_key=format_key(fmt),
        launch=launch_key(LaunchConfig(32, 4, 1, lut="exact")),
        num_splits=2,
        layer=0,
        scale=0.125,
        sliding_window=0,
        softcap=0.0,
    )
    torch.library.opcheck(torch.ops.tq.decode_attention.default, args, kwargs)
    ref = paged_decode_attention_ref(q, cache, table, seq_lens, fmt, scale=0.125)
    torch.ops.tq.decode_attention(*args, **kwargs)
    assert rel_err(out, ref) < ATTENTION_RTOL[torch.float32]


@pytest.mark.parametrize(
    ("d", "group", "lens", "kwargs"),
    [
        (128, 4, [45, 3, 200, 0], {}),
        (64, 7, [70, 33], {"softcap": 3.0, "sliding_window": 20}),
        (128, 1, [100, 1], {"sinks": "random"}),
        (64, 5, [130], {}),
    ],
    ids=["d128-g4", "d64-g7-softcap-window", "d128-g1-sinks", "d64-g5"],
)
@pytest.mark.parametrize("chunks", [1, 2, 4])
def test_decode_stacked_tiles_and_byte_tables(d, group, lens, kwargs, chunks):
    """Stacking 1, 2 or 4 tiles in the score tile's rows gives the reference's attention; the byte
    tables (``lut="byte"``) give the reference's attention over their 256-level centroids (the bias
    correction of scores and outputs is exact), for GQA groups that fill the rows or not."""
    fmt = named_format("turboquant_4bit_nc", d)
    cache, table, _, _ = make_paged(fmt, lens, 2, 16, seed=d + group)
    q = torch.randn(len(lens), 2 * group, d)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    kw = {"sinks": torch.randn(2 * group)} if kwargs.get("sinks") else kwargs
    for lut in ("exact", "byte"):
        cfg = LaunchConfig(16, 4, 1, lut=lut, chunks=chunks)
        out = poisoned_like(q)
        tq_decode_attention(q, cache, table, seq_lens, fmt, out=out, config=cfg, num_splits=2, **kw)
        with byte_grid(fmt if lut == "byte" else None):
            ref = paged_decode_attention_ref(q, cache, table, seq_lens, fmt, **kw)
        assert not out.isnan().any()
        assert rel_err(out, ref) < ATTENTION_RTOL[torch.float32], lut


def test_byte_grid_adds_little_attention_error():
    """The byte tables' centroids (256 levels) move the attention output by far less than the 4-bit
    quantization itself: the error against attention over the unquantized K/V grows by under 3% (1.4% on
    this seed: the encoder's gain search picks codes for the exact centroids, which the grid rounds)."""
    d, n = 128, 512
    fmt = named_format("turboquant_4bit_nc", d)
    torch.manual_seed(0)
    k, v, q = torch.randn(n, 2, d), torch.randn(n, 2, d), torch.randn(1, 2, d)
    cache = fmt.allocate_cache(n // 16, 16, 2)
    fmt.store_paged(cache, k, v, torch.arange(n))
    table, seq_lens = torch.arange(n // 16)[None], torch.tensor([n])
    truth = torch.softmax(torch.einsum("hd,nhd->hn", q[0], k) / d**0.5, -1)
    truth = torch.einsum("hn,nhd->hd", truth, v)[None]
    ref = paged_decode_attention_ref(q, cache, table, seq_lens, fmt)
    with byte_grid(fmt):
        grid = paged_decode_attention_ref(q, cache, table, seq_lens, fmt)
    base, moved = rel_err(ref, truth), rel_err(grid, truth)
    assert base > 0.05  # the 4-bit error this compares with is real
    assert moved < 1.03 * base, (moved, base)


def test_plan_decode_is_what_the_launcher_runs(monkeypatch):
    """The launcher plans through plan_decode: a plan passed in gives the same output as the launcher's
    own choice, and the split count follows the SM count, the loop's tokens per step and the bound."""
    from tq_kernels.ops import decode as decode_ops
    from tq_kernels.ops.decode import plan_decode

    fmt = FORMATS["4bit"]
    lens = [40, 3]
    cache, table, _, _ = make_paged(fmt, lens, 2, 16, seed=21)
    q = torch.randn(2, 4, 64)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    plan = plan_decode(fmt, 4, 2, 2, 64, "cpu", num_splits=3)
    assert (plan.num_splits, plan.nibble, plan.config.block_n) == (3, True, 32)
    torch.testing.assert_close(
        tq_decode_attention(q, cache, table, seq_lens, fmt, plan=plan),
        tq_decode_attention(q, cache, table, seq_lens, fmt, num_splits=3),
        rtol=0,
        atol=0,
    )
    monkeypatch.setattr(decode_ops, "sm_count", lambda device: 132)
    # 132 SMs x 16 warps over 2 x 2 programs of 4 warps: 132 wanted, capped by 8192 / 256 tokens = 32
    assert plan_decode(fmt, 4, 2, 2, 8192, "cpu").num_splits == 32
    assert plan_decode(fmt, 4, 2, 2, 1000, "cpu").num_splits == 4  # ceil(1000 / 256) -> 4
    assert plan_decode(fmt, 4, 2, 64, 8192, "cpu").num_splits == 8  # ceil(2112 / 512) = 5 -> 8
    assert plan_decode(fmt, 4, 2, 512, 8192, "cpu").num_splits == 1  # the batch fills the GPU
    assert plan_decode(fmt, 4, 2, 1, 1 << 17, "cpu").num_splits == MAX_SPLITS


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((4, 3, 2, 64), {}, "multiple of num_kv_heads"),
        ((4, 2, 0, 64), {}, "batch must be"),
        ((4, 2, 2, 0), {}, "max_seq_len must be"),
        ((4, 2, 2, 64), {"num_splits": 0}, "num_splits must be"),
        ((4, 2, 2, 64), {"config": "fast"}, "LaunchConfig"),
    ],
    ids=["heads", "batch", "length", "splits", "config"],
)
def test_plan_decode_rejects_bad_arguments(args, kwargs, match):
    from tq_kernels.ops.decode import plan_decode

    with pytest.raises(ValueError, match=match):
        plan_decode(FORMATS["4bit"], *args, "cpu", **kwargs)


def test_decode_rejects_a_plan_of_another_layer_shape():
    from tq_kernels.ops.decode import plan_decode

    fmt = FORMATS["4bit"]
    cache, table, _, _ = make_paged(fmt, [5], 2, 16, seed=4)
    q, seq_lens = torch.randn(1, 4, 64), torch.tensor([5])
    with pytest.raises(ValueError, match="plan each layer shape"):
        tq_decode_attention(q, cache, table, seq_lens, fmt, plan=plan_decode(fmt, 8, 2, 1, 64, "cpu"))
    with pytest.raises(ValueError, match="either plan or"):
        tq_decode_attention(
            q, cache, table, seq_lens, fmt, plan=plan_decode(fmt, 4, 2, 1, 64, "cpu"), num_splits=2
        )


def test_plan_decode_checks_the_cache_alignment():
    """Planned with the cache, a misaligned one gets the plane loop (as the launcher gives it)."""
    from tq_kernels.ops.decode import plan_decode

    fmt = named_format("turboquant_4bit_nc", 64)
    cache, _, _, _ = make_paged(fmt, [20], 1, 16, seed=2)
    shifted = torch.empty(cache.numel() + 1, dtype=torch.uint8)[1:].view(cache.shape)
    assert plan_decode(fmt, 2, 1, 1, 64, "cpu", cache=cache).nibble
    assert not plan_decode(fmt, 2, 1, 1, 64, "cpu", cache=shifted).nibble
