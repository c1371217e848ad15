"""The CUDA paths: tq_kernels' store/dequantize behind the cache, the fused decode kernel path of the
turboquant attention, and generate on the GPU."""

from __future__ import annotations

import pytest
import torch
from _models import VOCAB, cache_kwarg, stored_layer, tiny_model
from test_generate import _assert_same_greedy_tokens, _cache, _greedy
from transformers import DynamicCache

from tq_core.testing import rel_err
from tq_hf import attention, dense_attention

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(
    ("prompt", "steps", "pads", "window"),
    [(300, 5, None, None), (300, 40, (0, 17, 130), None), (500, 70, None, 96), (200, 3, (0, 9), 64)],
    ids=["plain", "left-padding", "sliding", "sliding-padding"],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_decode_matches_dequantize_path(prompt, steps, pads, window, dtype):
    layer, pads_dev = stored_layer(
        prompt, steps, pads=pads, window=window, residual=64, chunk=32, device="cuda", dtype=dtype
    )
    assert layer.backend == "triton"
    q = torch.randn(layer.batch_size, 4, 1, 64, device="cuda").to(dtype)
    plan = layer.decode_read(pads, pads_dev, window)
    assert plan is not None and plan.compressed is not None, "the kernel path must serve this layer"
    got = attention._fused_decode(
        q, plan, pads, pads_dev, scale=0.125, window=window, softcap=None, sinks=None
    )
    k, v = layer.dequantize()
    n = layer.cumulative_length
    mask = None
    if pads is not None:
        mask = (torch.arange(n, device="cuda")[None, :] >= pads_dev[:, None])[:, n - k.shape[2] :]
    want = dense_attention(q.float(), k.float(), v.float(), scale=0.125, key_mask=mask, window=window)
    assert rel_err(got, want) < 2e-2


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_greedy_8bit_on_gpu(family):
    model = tiny_model(family).cuda()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 200), generator=g).cuda()
    mask = torch.ones_like(ids)
    mask[1, :37] = 0
    ref_attn = "eager" if family == "gemma2" else "sdpa"
    want = _greedy(model, DynamicCache(config=model.config), ref_attn, ids, mask, 64)
    cache = _cache(model, "k8v8", residual_length=64, chunk_tokens=32)
    got = _greedy(model, cache, "turboquant", ids, mask, 64)
    _assert_same_greedy_tokens(want, got, ids.shape[1])
    assert cache.layers[0].backend == "triton" and cache.layers[0].n_comp >= 200


def test_bf16_llama_logits_close():
    model = tiny_model("llama").cuda().to(torch.bfloat16)
    model.set_attn_implementation("turboquant")
    ids = torch.randint(3, VOCAB, (1, 400), generator=torch.Generator().manual_seed(2)).cuda()
    kw_cache = _cache(model, "turboquant_4bit_nc", residual_length=64, chunk_tokens=64)
    ref_cache = DynamicCache(config=model.config)
    ck = cache_kwarg(model)
    a = model(input_ids=ids, **{ck: kw_cache}).logits[:, -1]
    model.set_attn_implementation("sdpa")
    b = model(input_ids=ids, **{ck: ref_cache}).logits[:, -1]
    assert rel_err(a, b) < 2e-2  # the prompt itself is attended exactly
    nxt = ids[:, :1]
    for _ in range(8):
        model.set_attn_implementation("turboquant")
        a = model(input_ids=nxt, **{ck: kw_cache}).logits[:, -1]
        model.set_attn_implementation("sdpa")
        b = model(input_ids=nxt, **{ck: ref_cache}).logits[:, -1]
        assert rel_err(a, b) < 0.1
