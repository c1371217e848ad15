"""Prefill chunks on FlashAttention: first chunks over their exact K/V, chunks with a cached prefix over
the prefix decoded from the compressed cache followed by their exact K/V (tq_vllm.prefix).

vLLM's FlashAttention exists only on CUDA, so here the impl's ``flash`` hook is a stand-in with the
same keyword interface, computing causal attention (aligned to the bottom right, as FlashAttention
does when a sequence has more keys than queries) with tq_core's reference per sequence.  The tests
check the routing (the host-side metadata and the impl's choice), the arguments the impl passes
(cu_seqlens, window, softcap, scale, out), that a prefix read this way gives the extend kernel's
attention, and that the decodes of the same batch still run on the compressed cache.
"""

from __future__ import annotations

from itertools import pairwise

import pytest

pytest.importorskip("vllm")

import torch
from _steps import PAD, Layer, attention_kwargs, build_layer, make_step, vllm_cache

from tq_core import attention_ref, named_format, paged_decode_attention_ref
from tq_core.testing import ATTENTION_RTOL, poisoned, rel_err
from tq_vllm.impl import TurboQuantImpl
from tq_vllm.prefix import plan_prefix_gather, prefix_flash_budget

LAYER_NAME = "model.layers.3.self_attn.attn"
BLOCK = 16


class FakeFlash:
    """flash_attn_varlen_func's keyword interface over tq_core's exact attention; records its calls."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, *, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                 causal, window_size, softcap, out):  # fmt: skip
        loc, kloc = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        self.calls.append(dict(cu_seqlens_q=loc, cu_seqlens_k=kloc, window_size=window_size, softcap=softcap))
        assert causal and len(loc) == len(kloc) and k.shape[0] == kloc[-1] == v.shape[0]
        assert max_seqlen_q >= max(b - a for a, b in pairwise(loc))
        assert max_seqlen_k >= max(b - a for a, b in pairwise(kloc))
        window = None if window_size[0] < 0 else window_size[0] + 1
        for i in range(len(loc) - 1):
            a, b = loc[i], loc[i + 1]
            # exactly the K/V handed over; queries are the sequence's last b - a tokens
            o = attention_ref(q[a:b], k[kloc[i] : kloc[i + 1]], v[kloc[i] : kloc[i + 1]], scale=softmax_scale,
                              sliding_window=window, softcap=softcap or None)  # fmt: skip
            out[a:b] = o.to(out.dtype)


def _run(case: dict, requests: list[tuple[int, int]], *, flash: bool = True, budget: int | None = None):
    d, h, hkv, dtype = case["d"], case["h"], case["hkv"], case["dtype"]
    fmt = named_format(case["kv"], d)
    step = make_step(
        requests, num_heads=h, num_kv_heads=hkv, head_size=d, block_size=BLOCK, dtype=dtype, seed=5
    )
    builder, impl, _, sinks = build_layer(case, LAYER_NAME, BLOCK)
    assert isinstance(impl, TurboQuantImpl)
    assert impl.flash is None, "vLLM has no FlashAttention on the CPU platform"
    fake = FakeFlash()
    if flash:
        impl.flash = fake
    if budget is not None:
        impl.prefix_budget = budget
    layer = Layer(LAYER_NAME)
    _, kv_cache = vllm_cache(step.num_blocks, BLOCK, hkv, fmt.slot_bytes, torch.uint8)
    hist_k, hist_v = step.history()
    impl.do_kv_cache_update(layer, hist_k, hist_v, kv_cache, step.history_slots)
    impl.do_kv_cache_update(layer, step.new_keys, step.new_values, kv_cache, step.new_slots)
    meta = builder.build(0, step.common_metadata())
    n = step.num_tokens
    output = poisoned((n + PAD, h, d), dtype=dtype)
    impl.forward(layer, step.query, step.new_keys, step.new_values, kv_cache, meta, output=output)
    return step, meta, fake, output, sinks


@pytest.mark.parametrize(
    ("requests", "expected"),
    [
        ([(20, 1), (37, 1), (16, 9), (0, 13)], True),  # one chunk continues a cached prefix
        ([(20, 1), (0, 9), (0, 13)], False),  # decodes, then first chunks only
        ([(0, 9), (0, 13)], False),
        ([(5, 1), (7, 1)], True),  # no prefill at all: nothing to route
    ],
)
def test_prefix_flag_is_decided_on_the_host(requests, expected) -> None:
    step = make_step(
        requests, num_heads=4, num_kv_heads=2, head_size=64, block_size=BLOCK, dtype=torch.float16, seed=1
    )
    cam = step.common_metadata()
    builder = build_layer(
        dict(kv="turboquant_4bit_nc", d=64, h=4, hkv=2, dtype=torch.float16), LAYER_NAME, BLOCK
    )[0]
    assert builder.build(0, cam).prefill_has_prefix is expected
    assert builder.build(0, cam.replace(seq_lens_cpu_upper_bound=None)).prefill_has_prefix is True


@pytest.mark.parametrize(
    "case",
    [
        dict(kv="turboquant_4bit_nc", d=128, h=4, hkv=2, dtype=torch.bfloat16),
        dict(kv="turboquant_3bit_nc", d=64, h=4, hkv=1, dtype=torch.float16, window=8, softcap=30.0),
    ],
    ids=["4bit", "3bit-window-softcap"],
)
def test_first_chunks_run_on_flash_and_decodes_on_the_cache(case: dict) -> None:
    requests = [(20, 1), (37, 1), (0, 9), (0, 13)]
    step, meta, fake, output, sinks = _run(case, requests)
    assert meta.prefill_has_prefix is False and len(fake.calls) == 1
    call = fake.calls[0]
    assert call["cu_seqlens_q"] == [0, 9, 22]
    assert call["window_size"] == ([-1, -1] if "window" not in case else [case["window"] - 1, 0])
    assert call["softcap"] == (case.get("softcap") or 0.0)
    n, nd = step.num_tokens, meta.num_decode_tokens
    kw = attention_kwargs(case, sinks)
    fmt = named_format(case["kv"], case["d"])
    ref_pre = torch.cat(
        [
            attention_ref(step.query[a:b], step.keys[i], step.values[i], **kw)
            for i, (a, b) in enumerate(
                zip(step.query_start_loc.tolist(), step.query_start_loc.tolist()[1:], strict=False)
            )
            if i >= nd
        ]
    )
    out = output.view(-1, case["h"], case["d"])
    assert bool(out[:n].isfinite().all()) and bool(out[n:].isnan().all())
    assert rel_err(out[nd:n], ref_pre) < ATTENTION_RTOL[case["dtype"]]
    # The decodes of the same batch read the compressed cache: compare with the reference on it.
    ref_cache = fmt.allocate_cache(step.num_blocks, BLOCK, case["hkv"])
    hist_k, hist_v = step.history()
    all_k = torch.cat([hist_k, step.new_keys[:n]]).float()
    all_v = torch.cat([hist_v, step.new_values[:n]]).float()
    fmt.store_paged(ref_cache, all_k, all_v, torch.cat([step.history_slots, step.new_slots[:n]]), layer=3)
    ref_dec = paged_decode_attention_ref(
        step.query[:nd], ref_cache, step.block_table[:nd], step.seq_lens[:nd], fmt, layer=3, **kw
    )
    assert rel_err(out[:nd], ref_dec) < ATTENTION_RTOL[case["dtype"]]


PREFIX_CASES = [
    dict(kv="turboquant_4bit_nc", d=64, h=4, hkv=2, dtype=torch.bfloat16),
    dict(kv="turboquant_k3v4_nc", d=128, h=8, hkv=2, dtype=torch.float16),
    dict(kv="turboquant_3bit_nc", d=64, h=4, hkv=1, dtype=torch.float16, window=8, softcap=30.0),
]


@pytest.mark.parametrize("case", PREFIX_CASES, ids=["4bit", "k3v4-gqa4", "3bit-window-softcap"])
def test_a_cached_prefix_is_decoded_for_flash_and_matches_the_extend_kernel(case: dict) -> None:
    """Chunks continuing a cached prefix (and first chunks beside them) run on FlashAttention over the
    decoded prefix; the prefill rows equal the extend kernel's on the same cache, the decodes too."""
    requests = [(20, 1), (37, 1), (16, 9), (0, 13), (45, 5), (33, 16)]
    step, meta, fake, output, _ = _run(case, requests)
    assert meta.prefill_has_prefix is True and meta.prefill_prefix_tokens == 16 + 45 + 33
    assert meta.prefill_max_seq_len == 50
    assert len(fake.calls) == 1
    call = fake.calls[0]
    assert call["cu_seqlens_q"] == [0, 9, 22, 27, 43]
    assert call["cu_seqlens_k"] == [0, 25, 38, 88, 137]
    _, _, none, extend_out, _ = _run(case, requests, flash=False)
    assert none.calls == []
    n = step.num_tokens
    assert bool(output[:n].isfinite().all()) and bool(output[n:].isnan().all())
    assert rel_err(output[:n], extend_out[:n]) < ATTENTION_RTOL[case["dtype"]]


def test_a_prefix_beyond_the_memory_budget_keeps_the_extend_kernel() -> None:
    case = PREFIX_CASES[0]
    requests = [(20, 1), (16, 9), (0, 13)]
    _, meta, fake, output, _ = _run(case, requests, budget=0)
    assert meta.prefill_has_prefix is True and fake.calls == []
    _, _, _, extend_out, _ = _run(case, requests, flash=False)
    assert torch.equal(output[:23], extend_out[:23])
    # 4 copies (K, V and the decode's temporaries) of (16 + 22) rows x 2 heads x 64 x 2 bytes fit
    _, _, fake, _, _ = _run(case, requests, budget=4 * 38 * 2 * 64 * 2)
    assert len(fake.calls) == 1
    _, _, fake, _, _ = _run(case, requests, budget=4 * 38 * 2 * 64 * 2 - 1)
    assert fake.calls == []


def test_unknown_prefix_lengths_keep_the_extend_kernel() -> None:
    case = PREFIX_CASES[0]
    step = make_step([(20, 1), (16, 9)], num_heads=4, num_kv_heads=2, head_size=64, block_size=BLOCK,
                     dtype=torch.bfloat16, seed=2)  # fmt: skip
    builder, impl, _, _ = build_layer(case, LAYER_NAME, BLOCK)
    meta = builder.build(0, step.common_metadata().replace(seq_lens_cpu_upper_bound=None))
    assert meta.prefill_has_prefix is True and meta.prefill_prefix_tokens is None
    assert not impl._prefix_fits(meta)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prefix_plan_places_each_request_prefix_then_chunk(seed: int) -> None:
    """plan_prefix_gather against a per-request loop, on random lengths, block tables and block sizes."""
    gen = torch.Generator().manual_seed(seed)
    num_req = int(torch.randint(1, 6, (1,), generator=gen))
    block_size = [1, 4, 16][seed]
    prefix = torch.randint(0, 40, (num_req,), generator=gen)
    chunk = torch.randint(1, 12, (num_req,), generator=gen)
    seq = prefix + chunk
    max_blocks = int((seq.max() + block_size - 1) // block_size)
    table = torch.randperm(num_req * max_blocks, generator=gen).view(num_req, max_blocks).to(torch.int32)
    qsl = torch.zeros(num_req + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(chunk, 0)
    plan = plan_prefix_gather(seq.to(torch.int32), qsl, table, block_size, total_prefix=int(prefix.sum()),
                              num_chunk_tokens=int(chunk.sum()), max_seqlen_k=int(seq.max()))  # fmt: skip
    slots, rows, chunk_rows, row = [], [], [], 0
    for r in range(num_req):
        for pos in range(int(prefix[r])):
            slots.append(int(table[r, pos // block_size]) * block_size + pos % block_size)
            rows.append(row + pos)
        chunk_rows += [row + int(prefix[r]) + t for t in range(int(chunk[r]))]
        row += int(seq[r])
    assert plan.prefix_slots.tolist() == slots and plan.prefix_rows.tolist() == rows
    assert plan.chunk_rows.tolist() == chunk_rows
    assert plan.cu_seqlens_k.tolist() == [0, *torch.cumsum(seq, 0).tolist()]
    assert plan.num_rows == row and plan.max_seqlen_k == int(seq.max())


def test_prefix_budget_setting(monkeypatch) -> None:
    monkeypatch.setenv("TQ_VLLM_PREFIX_FLASH_MB", "3")
    assert prefix_flash_budget() == 3 << 20
    for bad in ("-1", "lots"):
        monkeypatch.setenv("TQ_VLLM_PREFIX_FLASH_MB", bad)
        with pytest.raises(ValueError, match="TQ_VLLM_PREFIX_FLASH_MB must be a non-negative integer"):
            prefix_flash_budget()


def test_prefill_flash_version(monkeypatch) -> None:
    """Prefill asks for the platform's best FlashAttention (vLLM pins 2 for turboquant dtypes); the
    setting overrides, and a bad value names the choices."""
    from tq_vllm.impl import _prefill_fa_version

    assert _prefill_fa_version(128, None) is None  # not FlashAttention's platform: keep vLLM's answer
    assert _prefill_fa_version(128, 3) == 3
    assert _prefill_fa_version(512, 2) == 2
    monkeypatch.setenv("TQ_VLLM_FLASH_VERSION", "2")
    assert _prefill_fa_version(128, 3) == 2
    monkeypatch.setenv("TQ_VLLM_FLASH_VERSION", "fa3")
    with pytest.raises(ValueError, match="TQ_VLLM_FLASH_VERSION must be 2, 3 or 4"):
        _prefill_fa_version(128, 2)


def test_only_compressed_layers_without_sinks_take_flash(monkeypatch) -> None:
    import tq_vllm.impl

    sentinel = object()
    monkeypatch.setattr(tq_vllm.impl, "_flash_varlen", lambda head_size, contiguous_kv=False: sentinel)
    base = dict(kv="turboquant_4bit_nc", d=64, h=4, hkv=2, dtype=torch.bfloat16)
    assert build_layer(base, LAYER_NAME, BLOCK)[1].flash is sentinel
    assert build_layer({**base, "sinks": True}, LAYER_NAME, BLOCK)[1].flash is None
    assert build_layer({**base, "kv": "auto"}, LAYER_NAME, BLOCK)[1].flash is None


def test_flash_can_be_turned_off(monkeypatch) -> None:
    import tq_vllm.impl

    monkeypatch.setenv("TQ_VLLM_PREFILL_FLASH", "0")
    assert tq_vllm.impl._flash_varlen(128) is None
    monkeypatch.setenv("TQ_VLLM_PREFILL_FLASH", "off")
    with pytest.raises(ValueError, match="TQ_VLLM_PREFILL_FLASH must be 0 or 1"):
        tq_vllm.impl._flash_varlen(128)
