"""Long vision-language prompts: precision at >= 16K tokens.

A video or a few dozen images make prompts of 10-20K tokens, where a float16 norm or a float16 running
sum would start to show (a system before ours garbled its output past ~11,400 tokens).  Here one
16,640-token sequence (40 images of 256 tokens plus text) sits in a compressed paged cache; the decode
kernel and the extend kernel (a last chunk holding an image's tokens, bidirectional inside it) are
compared with tq_core's float32 reference over the same decoded K/V, and their error against exact
attention over the original K/V must not grow with the context: at 16K it stays within a margin of the
error at 1K.  Keys are scaled up to norms of ~2,400 (large scores, a peaked softmax) as well as left at
the usual scale.
"""

from __future__ import annotations

import pytest
import torch

from tq_core import attention_ref, named_format, paged_decode_attention_ref, paged_extend_attention_ref
from tq_core.attention import mm_prefix_key_end, mm_prefix_mask
from tq_core.testing import ATTENTION_RTOL, poisoned, poisoned_like, rel_err
from tq_kernels.ops.decode import tq_decode_attention
from tq_kernels.ops.extend import tq_extend_attention
from tq_kernels.tuning import LaunchConfig

LONG, SHORT = 16_640, 1_024
PAGE, D, HEADS = 64, 64, 2
CHUNK = 48  # the extend case's last chunk; an image range covers its rows 8..39


def _sequence(n: int, key_scale: float, seed: int):
    """(cache, table, k, v): one sequence of ``n`` tokens, one KV head, keys sharing a direction (so
    scores are peaked, not ~0) times ``key_scale``."""
    fmt = named_format("turboquant_4bit_nc", D)
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(D, generator=g)
    k = (torch.randn(n, 1, D, generator=g) + 0.5 * direction) * key_scale
    v = torch.randn(n, 1, D, generator=g)
    blocks = -(-n // PAGE)
    table = torch.randperm(blocks + 2, generator=g)[:blocks].view(1, blocks).to(torch.int32)
    cache = poisoned(fmt.cache_shape(blocks + 2, PAGE, 1), dtype=torch.uint8)
    pos = torch.arange(n)
    fmt.store_paged(cache, k, v, table[0, pos // PAGE].long() * PAGE + pos % PAGE)
    return fmt, cache, table, k, v, direction


def _decode_errors(n: int, key_scale: float) -> tuple[float, float]:
    fmt, cache, table, k, v, direction = _sequence(n, key_scale, seed=n)
    q = (torch.randn(1, HEADS, D, generator=torch.Generator().manual_seed(1)) + direction) / key_scale
    lens = torch.tensor([n], dtype=torch.int32)
    out = poisoned_like(q)
    tq_decode_attention(q, cache, table, lens, fmt, out=out)
    ref = paged_decode_attention_ref(q, cache, table, lens, fmt)
    exact = attention_ref(q, k, v)
    return rel_err(out, ref), rel_err(out, exact)


@pytest.mark.parametrize("key_scale", [1.0, 300.0], ids=["keys-x1", "keys-x300"])
def test_decode_at_16k_tokens_keeps_reference_precision(key_scale):
    kernel_long, exact_long = _decode_errors(LONG, key_scale)
    _, exact_short = _decode_errors(SHORT, key_scale)
    assert kernel_long < ATTENTION_RTOL[torch.float32]
    # the quantization error does not grow with the context (a float16 sum or norm would)
    assert exact_long < 1.5 * exact_short + 1e-3, (exact_long, exact_short)


@pytest.mark.parametrize("key_scale", [1.0, 300.0], ids=["keys-x1", "keys-x300"])
def test_extend_with_an_image_after_16k_tokens_keeps_reference_precision(key_scale):
    fmt, cache, table, k, v, direction = _sequence(LONG, key_scale, seed=3)
    prefix = LONG - CHUNK
    ranges = [[(prefix + 8, prefix + 39)]]
    g = torch.Generator().manual_seed(2)
    q = (torch.randn(CHUNK, HEADS, D, generator=g) + direction) / key_scale
    plens = torch.tensor([prefix], dtype=torch.int32)
    qsl = torch.tensor([0, CHUNK], dtype=torch.int32)
    key_end = torch.tensor(mm_prefix_key_end(ranges, qsl.tolist(), [prefix]), dtype=torch.int32)
    out = poisoned_like(q)
    tq_extend_attention(
        q, k[prefix:], v[prefix:], cache, table, plens, qsl, CHUNK, fmt, key_end=key_end, out=out,
        config=LaunchConfig(block_n=64, num_warps=4, num_stages=1),
    )  # fmt: skip
    ref = paged_extend_attention_ref(
        q, k[prefix:], v[prefix:], cache, table, plens, qsl, fmt, mm_ranges=ranges
    )
    assert rel_err(out, ref) < ATTENTION_RTOL[torch.float32]
    exact = attention_ref(q, k, v, causal=False, mask=mm_prefix_mask(ranges[0], prefix, CHUNK))
    assert rel_err(out, exact) < 0.2, "the compressed prefix dominates the answer"


@pytest.mark.gpu
@pytest.mark.parametrize("fmt_name", ["turboquant_4bit_nc", "turboquant_3bit_nc"])
def test_decode_at_120k_tokens_on_the_gpu(fmt_name):
    """One 122,880-token sequence through the split-context decode (split-K partials, stored norms, the
    softmax merge) against the float32 reference, on the device (issue 16)."""
    n, d, kv_heads, heads = 122_880, 128, 2, 8
    fmt = named_format(fmt_name, d)
    g = torch.Generator().manual_seed(120)
    direction = torch.randn(d, generator=g)
    blocks = n // 16
    table = torch.randperm(blocks, generator=g).view(1, blocks).to(torch.int32)
    cache = poisoned(fmt.cache_shape(blocks, 16, kv_heads), dtype=torch.uint8).cuda()
    k = (torch.randn(n, kv_heads, d, generator=g) + 0.5 * direction) * 20
    v = torch.randn(n, kv_heads, d, generator=g)
    pos = torch.arange(n)
    fmt.store_paged(cache, k.cuda(), v.cuda(), (table[0, pos // 16].long() * 16 + pos % 16).cuda())
    q = ((torch.randn(1, heads, d, generator=g) + direction) / 20).cuda().to(torch.bfloat16)
    table, lens = table.cuda(), torch.tensor([n], dtype=torch.int32, device="cuda")
    out = torch.full_like(q, float("nan"))
    tq_decode_attention(q, cache, table, lens, fmt, out=out)
    ref = paged_decode_attention_ref(q.float(), cache, table, lens, fmt)
    assert rel_err(out, ref) < ATTENTION_RTOL[torch.bfloat16]
    # The format's own error against exact attention must not grow with the length (precision loss in
    # the norms or the merge would): the first 1,024 tokens of the same cache give the yardstick.
    short = torch.full_like(q, float("nan"))
    tq_decode_attention(q, cache, table, torch.full_like(lens, 1024), fmt, out=short)
    q_cpu = q.float().cpu()
    err_long = rel_err(out.float().cpu(), attention_ref(q_cpu, k, v))
    err_short = rel_err(short.float().cpu(), attention_ref(q_cpu, k[:1024], v[:1024]))
    assert err_long < 1.5 * err_short, (err_long, err_short)
