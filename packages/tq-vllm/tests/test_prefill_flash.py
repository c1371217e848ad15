"""First prefill chunks go to FlashAttention on the exact K/V; anything with a cached prefix does not.

vLLM's FlashAttention exists only on CUDA, so here the impl's ``flash`` hook is a stand-in with the
same keyword interface, computing exact causal attention with tq_core's reference per sequence.  The
tests check the routing (the host-side metadata flag and the impl's choice), the arguments the impl
passes (cu_seqlens, window, softcap, scale, out), and that the decodes of the same batch still run on
the compressed cache.
"""

from __future__ import annotations

from itertools import pairwise

import pytest

pytest.importorskip("vllm")

import torch
from _steps import PAD, TOL, Layer, attention_kwargs, build_layer, make_step, rel_err, vllm_cache

from tq_core import attention_ref, named_format, paged_decode_attention_ref
from tq_vllm.impl import TurboQuantImpl
from tq_vllm.metadata import _prefill_has_prefix

LAYER_NAME = "model.layers.3.self_attn.attn"
BLOCK = 16


class FakeFlash:
    """flash_attn_varlen_func's keyword interface over tq_core's exact attention; records its calls."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys, self.values, self.calls = keys, values, []

    def __call__(self, *, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                 causal, window_size, softcap, out):  # fmt: skip
        self.calls.append(dict(cu_seqlens_q=cu_seqlens_q.tolist(), window_size=window_size, softcap=softcap))
        assert causal and torch.equal(cu_seqlens_q, cu_seqlens_k) and max_seqlen_q == max_seqlen_k
        loc = cu_seqlens_q.tolist()
        assert max_seqlen_q >= max(b - a for a, b in pairwise(loc))
        window = None if window_size[0] < 0 else window_size[0] + 1
        for i in range(len(loc) - 1):
            a, b = loc[i], loc[i + 1]
            # the chunk's own K/V, exactly as handed over (no cache involved)
            o = attention_ref(q[a:b], k[a:b], v[a:b], scale=softmax_scale, sliding_window=window,
                              softcap=softcap or None)  # fmt: skip
            out[a:b] = o.to(out.dtype)


def _run(case: dict, requests: list[tuple[int, int]]):
    d, h, hkv, dtype = case["d"], case["h"], case["hkv"], case["dtype"]
    fmt = named_format(case["kv"], d)
    step = make_step(
        requests, num_heads=h, num_kv_heads=hkv, head_size=d, block_size=BLOCK, dtype=dtype, seed=5
    )
    builder, impl, _, sinks = build_layer(case, LAYER_NAME, BLOCK)
    assert isinstance(impl, TurboQuantImpl)
    assert impl.flash is None, "vLLM has no FlashAttention on the CPU platform"
    impl.flash = fake = FakeFlash(step.keys, step.values)
    layer = Layer(LAYER_NAME)
    _, kv_cache = vllm_cache(step.num_blocks, BLOCK, hkv, fmt.slot_bytes, torch.uint8)
    hist_k, hist_v = step.history()
    impl.do_kv_cache_update(layer, hist_k, hist_v, kv_cache, step.history_slots)
    impl.do_kv_cache_update(layer, step.new_keys, step.new_values, kv_cache, step.new_slots)
    meta = builder.build(0, step.common_metadata())
    n = step.num_tokens
    output = torch.full((n + PAD, h, d), float("nan"), dtype=dtype)
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
    nd = sum(1 for _, q in requests if q == 1)
    assert _prefill_has_prefix(cam, nd, len(requests) - nd) is expected
    assert _prefill_has_prefix(cam.replace(seq_lens_cpu_upper_bound=None), nd, len(requests) - nd) is True


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
    assert rel_err(out[nd:n], ref_pre) < TOL[case["dtype"]]
    # The decodes of the same batch read the compressed cache: compare with the reference on it.
    ref_cache = fmt.allocate_cache(step.num_blocks, BLOCK, case["hkv"])
    hist_k, hist_v = step.history()
    all_k = torch.cat([hist_k, step.new_keys[:n]]).float()
    all_v = torch.cat([hist_v, step.new_values[:n]]).float()
    fmt.store_paged(ref_cache, all_k, all_v, torch.cat([step.history_slots, step.new_slots[:n]]), layer=3)
    ref_dec = paged_decode_attention_ref(
        step.query[:nd], ref_cache, step.block_table[:nd], step.seq_lens[:nd], fmt, layer=3, **kw
    )
    assert rel_err(out[:nd], ref_dec) < TOL[case["dtype"]]


def test_a_cached_prefix_keeps_the_extend_kernel() -> None:
    case = dict(kv="turboquant_4bit_nc", d=64, h=4, hkv=2, dtype=torch.bfloat16)
    _, meta, fake, output, _ = _run(case, [(20, 1), (16, 9), (0, 13)])
    assert meta.prefill_has_prefix is True and fake.calls == []
    assert bool(output[:23].isfinite().all())


def test_only_compressed_layers_without_sinks_take_flash(monkeypatch) -> None:
    import tq_vllm.impl

    sentinel = object()
    monkeypatch.setattr(tq_vllm.impl, "_flash_varlen", lambda head_size: sentinel)
    base = dict(kv="turboquant_4bit_nc", d=64, h=4, hkv=2, dtype=torch.bfloat16)
    assert build_layer(base, LAYER_NAME, BLOCK)[1].flash is sentinel
    assert build_layer({**base, "sinks": True}, LAYER_NAME, BLOCK)[1].flash is None
    assert build_layer({**base, "kv": "auto"}, LAYER_NAME, BLOCK)[1].flash is None


def test_flash_can_be_turned_off(monkeypatch) -> None:
    import tq_vllm.impl

    monkeypatch.setenv("TQ_VLLM_PREFILL_FLASH", "0")
    assert tq_vllm.impl._flash_varlen(128) is None
