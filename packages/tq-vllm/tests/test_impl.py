"""The impl's store and forward on CPU (Triton interpreter) against tq_core's reference attention.

Each case is one engine step of mixed requests (decodes first, then a prefill chunk over a cached
prefix and a fresh prefill), written through ``do_kv_cache_update`` into a cache shaped and strided
the way vLLM allocates it, then attended with ``forward`` into a NaN-filled output buffer.

Compressed layers: the cache must hold exactly the bytes tq_core's reference store writes, untouched
slots (padding tokens, spare blocks) must keep their fill, and the output must match
``paged_decode_attention_ref`` / ``paged_extend_attention_ref`` on the reference cache.
Uncompressed (boundary) layers: the output must match exact attention on the unpaged K/V.
"""

from __future__ import annotations

from itertools import pairwise

import pytest

pytest.importorskip("vllm")

import torch
from _steps import PAD, Layer, attention_kwargs, build_layer, make_step, run_uncompressed_step, vllm_cache
from vllm.config import VllmConfig, set_current_vllm_config

from tq_core import (
    named_format,
    paged_decode_attention_ref,
    paged_extend_attention_ref,
)
from tq_core.testing import ATTENTION_RTOL, POISON_BYTE, poisoned, rel_err
from tq_vllm.backend import TurboQuantBackend
from tq_vllm.impl import TurboQuantImpl, compressed_cache_view

LAYER_NAME = "model.layers.7.self_attn.attn"
LAYER = 7
BLOCK = 16
STORE_TOL = 1e-3  # decoded K/V of the kernel's slots vs the reference's (boundary ties only)
# decodes (one new token over a cached context), a chunk over a cached prefix, a fresh prefill
REQUESTS = [(20, 1), (37, 1), (16, 9), (0, 13)]


def _case_id(case: dict) -> str:
    parts = [
        case["kv"].removeprefix("turboquant_"),
        f"D{case['d']}",
        f"H{case['h']}-{case['hkv']}",
        str(case["dtype"]).removeprefix("torch.").replace("bfloat", "bf").replace("float", "fp"),
    ]
    parts += [k for k in ("window", "softcap", "sinks") if case.get(k)]
    if case.get("layout", "LBHNC") != "LBHNC":
        parts.append(case["layout"])
    return "-".join(parts)


COMPRESSED_CASES = [
    dict(kv="turboquant_k8v4", d=128, h=4, hkv=2, dtype=torch.bfloat16),
    dict(kv="turboquant_4bit_nc", d=128, h=4, hkv=2, dtype=torch.bfloat16),
    dict(kv="turboquant_k3v4_nc", d=128, h=4, hkv=2, dtype=torch.bfloat16),
    dict(kv="turboquant_3bit_nc", d=128, h=4, hkv=2, dtype=torch.bfloat16),
    dict(kv="turboquant_4bit_nc", d=128, h=4, hkv=2, dtype=torch.bfloat16, layout="BLHNC"),
    dict(kv="turboquant_4bit_nc", d=64, h=4, hkv=1, dtype=torch.float16, window=8, softcap=30.0),
    dict(kv="turboquant_3bit_nc", d=96, h=6, hkv=2, dtype=torch.bfloat16, sinks=True),
    dict(kv="turboquant_k8v4", d=256, h=2, hkv=2, dtype=torch.float16),
]
DENSE_CASES = [
    dict(kv="auto", d=128, h=4, hkv=2, dtype=torch.bfloat16),
    dict(kv="auto", d=64, h=4, hkv=1, dtype=torch.float16, window=8, softcap=30.0, sinks=True),
    dict(kv="auto", d=80, h=6, hkv=3, dtype=torch.bfloat16, layout="LBNHC"),
    dict(kv="auto", d=128, h=8, hkv=8, dtype=torch.float16, layout="BLHNC"),
]


@pytest.mark.parametrize("case", COMPRESSED_CASES, ids=_case_id)
def test_compressed_layer_matches_reference(case: dict) -> None:
    d, h, hkv, dtype = case["d"], case["h"], case["hkv"], case["dtype"]
    fmt = named_format(case["kv"], d)
    step = make_step(
        REQUESTS, num_heads=h, num_kv_heads=hkv, head_size=d, block_size=BLOCK, dtype=dtype, seed=d + h
    )
    builder, impl, spec, sinks = build_layer(case, LAYER_NAME, BLOCK)
    assert isinstance(impl, TurboQuantImpl) and impl.fmt == fmt
    assert spec.page_size_bytes == BLOCK * hkv * fmt.slot_bytes
    layer = Layer(LAYER_NAME)
    _, kv_cache = vllm_cache(
        step.num_blocks, BLOCK, hkv, fmt.slot_bytes, torch.uint8, case.get("layout", "LBHNC")
    )

    # earlier steps' tokens, then this step's (with padding tokens at slot -1)
    hist_k, hist_v = step.history()
    impl.do_kv_cache_update(layer, hist_k, hist_v, kv_cache, step.history_slots)
    impl.do_kv_cache_update(layer, step.new_keys, step.new_values, kv_cache, step.new_slots)

    ref_cache = poisoned(fmt.cache_shape(step.num_blocks, BLOCK, hkv), dtype=torch.uint8)
    n = step.num_tokens
    all_k = torch.cat([hist_k, step.new_keys[:n]]).float()
    all_v = torch.cat([hist_v, step.new_values[:n]]).float()
    all_slots = torch.cat([step.history_slots, step.new_slots[:n]])
    fmt.store_paged(ref_cache, all_k, all_v, all_slots, layer=LAYER)
    # Bytes the reference writes for these slots: the same in a cache filled with 0x00 and with 0xFF.
    lo, hi = torch.zeros_like(ref_cache), torch.full_like(ref_cache, 0xFF)
    for blank in (lo, hi):
        fmt.store_paged(blank, all_k, all_v, all_slots, layer=LAYER)
    unwritten = lo != hi
    view = compressed_cache_view(kv_cache, fmt.slot_bytes)
    assert bool((view[unwritten] == POISON_BYTE).all()), "a byte outside the slot mapping's slots was written"
    # The kernel and the reference may round a coordinate sitting on a code boundary differently, or
    # pick another gain of the encoder's search where two score alike (tq-kernels' store tests bound
    # those ties): few bytes differ, and the slots reconstruct the K/V equally well.
    assert float((view != ref_cache)[~unwritten].float().mean()) < 0.01
    for b in range(len(REQUESTS)):
        seq = int(step.seq_lens[b])
        got = fmt.gather_paged(view, step.block_table[b], seq, layer=LAYER)
        want = fmt.gather_paged(ref_cache, step.block_table[b], seq, layer=LAYER)
        for g, w, x in zip(got, want, (step.keys[b], step.values[b]), strict=True):
            if rel_err(g, w) < STORE_TOL:
                continue
            e_got, e_want = rel_err(g, x[:seq].float()), rel_err(w, x[:seq].float())
            assert abs(e_got - e_want) < STORE_TOL * e_want, (b, e_got, e_want)

    meta = builder.build(0, step.common_metadata())
    assert (meta.num_decodes, meta.num_prefills) == (2, 2)
    output = poisoned((n + PAD, h * d), dtype=dtype)
    impl.forward(layer, step.query, step.new_keys, step.new_values, kv_cache, meta, output=output)
    out = output.view(-1, h, d)

    kw = attention_kwargs(case, sinks)
    nd = meta.num_decode_tokens
    ref_dec = paged_decode_attention_ref(
        step.query[:nd], ref_cache, step.block_table[:nd], step.seq_lens[:nd], fmt, layer=LAYER, **kw
    )
    qsl = step.query_start_loc[nd:] - nd
    ref_pre = paged_extend_attention_ref(
        step.query[nd:n],
        step.new_keys[nd:n],
        step.new_values[nd:n],
        ref_cache,
        step.block_table[nd:],
        step.cached_lens[nd:],
        qsl,
        fmt,
        layer=LAYER,
        **kw,
    )
    assert bool(out[:n].isfinite().all()), "a row of the step was not written"
    assert bool(out[n:].isnan().all()), "padding rows were written"
    assert rel_err(out[:nd], ref_dec) < ATTENTION_RTOL[dtype]
    assert rel_err(out[nd:n], ref_pre) < ATTENTION_RTOL[dtype]


@pytest.mark.parametrize("case", DENSE_CASES, ids=_case_id)
def test_uncompressed_layer_matches_exact_attention(case: dict) -> None:
    """Boundary layers on the CPU path (torch); `test_vllm_kernels.py` runs vLLM's Triton path."""
    output, ref, n = run_uncompressed_step(case, REQUESTS, LAYER_NAME, BLOCK)
    assert bool(output[:n].isfinite().all())
    assert bool(output[n:].isnan().all())
    assert rel_err(output[:n], ref) < ATTENTION_RTOL[case["dtype"]]


def test_compressed_layer_rejects_a_token_major_layout() -> None:
    """LBNHC interleaves heads inside tokens; the region layout cannot live there (the backend does
    not declare it, so vLLM never picks it), and the impl says so instead of writing garbage."""
    case = COMPRESSED_CASES[1]
    _, impl, _, _ = build_layer(case, LAYER_NAME, BLOCK)
    _, kv_cache = vllm_cache(4, BLOCK, case["hkv"], 134, torch.uint8, "LBNHC")
    kv = torch.zeros(2, case["hkv"], case["d"], dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="LBHNC"):
        impl.do_kv_cache_update(Layer(LAYER_NAME), kv, kv, kv_cache, torch.tensor([0, 1]))


def test_profiling_run_without_metadata_returns_zeros() -> None:
    case = COMPRESSED_CASES[1]
    _, impl, _, _ = build_layer(case, LAYER_NAME, BLOCK)
    output = poisoned((3, case["h"] * case["d"]), dtype=torch.bfloat16)
    q = torch.zeros(3, case["h"], case["d"], dtype=torch.bfloat16)
    kv = torch.zeros(3, case["hkv"], case["d"], dtype=torch.bfloat16)
    cache = torch.zeros(4, case["hkv"], BLOCK, 134, dtype=torch.uint8)
    assert impl.forward(Layer(LAYER_NAME), q, kv, kv, cache, None, output=output) is output
    assert bool((output == 0).all())


def test_builder_prepares_its_layers_before_graph_capture() -> None:
    """The builder finds its layers' impls in vLLM's static forward context and prepares them (on
    CUDA that warms the kernels' device tables; here the warm-up runs under the interpreter)."""
    case = COMPRESSED_CASES[1]
    _, impl, spec, _ = build_layer(case, LAYER_NAME, BLOCK)
    module = Layer(LAYER_NAME)
    module.impl = impl
    config = VllmConfig()
    config.compilation_config.static_forward_context[LAYER_NAME] = module
    impl.layer = None  # as constructed by vLLM: the impl learns its layer from the builder
    with set_current_vllm_config(config):
        TurboQuantBackend.get_builder_cls()(spec, [LAYER_NAME], config, torch.device("cpu"))
    assert impl.layer == LAYER
    impl.prepare(LAYER_NAME, torch.device("cpu"), BLOCK, warm=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prepare_compiles_every_kernel_with_the_model_dtype(monkeypatch, dtype) -> None:
    """vLLM captures decode batches only, so the warm-up must also run the extend kernel, with K/V of
    the model's dtype (Triton compiles one variant per dtype), or it compiles inside a timed prefill."""
    import tq_vllm.impl

    seen: dict[str, torch.dtype] = {}
    for name in ("tq_store_paged", "tq_decode_attention", "tq_extend_attention"):
        real = getattr(tq_vllm.impl, name)

        def record(*args, _name=name, _real=real, **kwargs):
            seen[_name] = args[0].dtype
            return _real(*args, **kwargs)

        monkeypatch.setattr(tq_vllm.impl, name, record)
    _, impl, _, _ = build_layer(COMPRESSED_CASES[1], LAYER_NAME, BLOCK)
    impl.prepare(LAYER_NAME, torch.device("cpu"), BLOCK, warm=True, dtype=dtype)
    assert seen == dict.fromkeys(("tq_store_paged", "tq_decode_attention", "tq_extend_attention"), dtype)


def test_shared_kv_layer_reads_with_the_owner_rotation() -> None:
    """A layer that reuses another layer's cache must decode it with the owner's layer number."""
    with set_current_vllm_config(VllmConfig()):
        impl = TurboQuantImpl(
            4, 128, 128**-0.5, 2, kv_cache_dtype="turboquant_4bit_nc",
            kv_sharing_target_layer_name="model.layers.3.self_attn.attn",
        )  # fmt: skip
    impl.prepare("model.layers.11.self_attn.attn", torch.device("cpu"), BLOCK)
    assert impl.layer == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(alibi_slopes=[0.5] * 4), "ALiBi"),
        (dict(attn_type="encoder_only"), "attention type"),
        (dict(head_size=48), "head_dim 48"),
        (dict(kv_cache_dtype="fp8"), "kv_cache_dtype 'fp8'"),
    ],
    ids=["alibi", "encoder", "head48", "fp8"],
)
def test_impl_rejects_what_it_does_not_serve(kwargs: dict, match: str) -> None:
    args = dict(num_heads=4, head_size=128, scale=0.1, num_kv_heads=2, kv_cache_dtype="turboquant_4bit_nc")
    args.update(kwargs)
    with (
        set_current_vllm_config(VllmConfig()),
        pytest.raises((ValueError, NotImplementedError), match=match) as err,
    ):
        TurboQuantImpl(**args)
    assert "head_dim 64, 80, 96" in str(err.value)  # the message lists what is supported


def test_each_layer_sizes_decode_splits_for_its_kernel_launch(monkeypatch) -> None:
    """The split count is a compile-time constant of the decode kernel, planned once per batch size by
    each layer for the launch its format actually gets (one warp per program for 3- and 4-bit codes on
    the GPU, four for 8-bit keys), so a one-warp launch gets four times the splits of a four-warp one,
    whatever other layers the builder's group holds."""
    import tq_kernels.ops.decode
    from tq_kernels.tuning import LaunchConfig

    seen = []

    def config(head_dim, group, device, nibble=False):
        seen.append((head_dim, group, nibble))
        return LaunchConfig(32, 1 if nibble else 4, 3)

    monkeypatch.setattr(tq_kernels.ops.decode, "decode_config", config)
    monkeypatch.setattr(tq_kernels.ops.decode, "sm_count", lambda device: 132)
    config_ = VllmConfig()
    impls = {}
    for i, name in enumerate(("turboquant_4bit_nc", "turboquant_3bit_nc", "turboquant_k8v4")):
        case = dict(COMPRESSED_CASES[1], kv=name)
        _, impl, spec, _ = build_layer(case, f"model.layers.{i}.self_attn.attn", BLOCK)
        module = Layer(f"model.layers.{i}.self_attn.attn")
        module.impl = impl
        config_.compilation_config.static_forward_context[module.layer_name] = module
        impls[name] = impl
    with set_current_vllm_config(config_):  # one builder over the three layers: no layer's plan wins
        TurboQuantBackend.get_builder_cls()(spec, list(config_.compilation_config.static_forward_context),
                                            config_, torch.device("cpu"))  # fmt: skip
    splits = {}
    for name, impl in impls.items():
        cache = impl.fmt.allocate_cache(1, BLOCK, impl.num_kv_heads)
        splits[name] = impl.decode_plan(32, 8192, cache).num_splits
        assert impl.decode_plan(32, 8192, cache) is impl.decode_plan(32, 8192, cache)  # planned once
    group = COMPRESSED_CASES[1]["h"] // COMPRESSED_CASES[1]["hkv"]
    assert seen == [(128, group, True), (128, group, True), (128, group, False)]
    # 32 requests x 2 KV heads on 132 SMs: 33 splits with one warp, at most 32 of 256 tokens in 8192;
    # 9 -> 16 (power of two) with four
    assert splits == {"turboquant_4bit_nc": 32, "turboquant_3bit_nc": 32, "turboquant_k8v4": 16}


class PagedFakeFlash:
    """flash_attn_varlen_func's keyword interface for a paged cache (block_table, seqused_k, causal
    aligned to the end of each sequence) over tq_core's exact attention; records its calls."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, *, q, k, v, out, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k, softmax_scale,
                 causal, window_size, block_table, softcap):  # fmt: skip
        from tq_core import attention_ref

        assert causal and k.stride(-1) == 1 and v.stride(-1) == 1 and k.shape == v.shape
        loc, lens = cu_seqlens_q.tolist(), seqused_k.tolist()
        assert max_seqlen_q >= max(b - a for a, b in pairwise(loc))
        assert max_seqlen_k >= max(lens)
        self.calls.append(dict(window_size=list(window_size), softcap=softcap, scale=softmax_scale))
        window = None if window_size[0] < 0 else window_size[0] + 1
        block = k.shape[1]
        for i in range(len(loc) - 1):
            a, b = loc[i], loc[i + 1]
            if a == b:
                continue
            pos = torch.arange(lens[i])
            blocks = block_table[i].long()[pos // block]
            o = attention_ref(q[a:b], k[blocks, pos % block], v[blocks, pos % block], scale=softmax_scale,
                              causal=True, sliding_window=window, softcap=softcap or None)  # fmt: skip
            out[a:b] = o.to(out.dtype)


FLASH_DENSE_CASES = [
    DENSE_CASES[0],
    dict(kv="auto", d=64, h=4, hkv=1, dtype=torch.float16, window=8, softcap=30.0),
    DENSE_CASES[2],
]


@pytest.mark.parametrize("case", FLASH_DENSE_CASES, ids=_case_id)
def test_uncompressed_layer_on_flash_attention_passes_the_paged_cache(case: dict) -> None:
    """TQ_VLLM_DENSE_ATTENTION=flash: the boundary layers hand vLLM's FlashAttention the K and V halves
    of their paged cache with the step's block table, lengths, window, soft-cap and scale.  FlashAttention
    is CUDA-only, so a stand-in with its keyword interface computes exact attention from what it is
    given; it must reproduce the exact attention of the step."""
    fake = PagedFakeFlash()
    output, ref, n = run_uncompressed_step(case, REQUESTS, LAYER_NAME, BLOCK, flash=fake)
    assert len(fake.calls) == 1
    window = case.get("window")
    assert fake.calls[0]["window_size"] == ([-1, -1] if window is None else [window - 1, 0])
    assert bool(output[n:].isnan().all())
    assert rel_err(output[:n], ref) < ATTENTION_RTOL[case["dtype"]]


def test_dense_attention_mode_is_validated(monkeypatch) -> None:
    monkeypatch.setenv("TQ_VLLM_DENSE_ATTENTION", "cudnn")
    with pytest.raises(ValueError, match="TQ_VLLM_DENSE_ATTENTION must be one of triton, flash"):
        build_layer(DENSE_CASES[0], LAYER_NAME, BLOCK)
    monkeypatch.setenv("TQ_VLLM_DENSE_ATTENTION", "flash")
    _, impl, _, _ = build_layer(DENSE_CASES[0], LAYER_NAME, BLOCK)
    assert impl.dense is not None and impl.dense.flash is None  # vLLM has no FlashAttention on CPU
