"""TurboQuantCache storage: residual window and flushes, exact crop/reorder/select, growth, sliding
layers, memory accounting, and the errors an unsupported model gets at creation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from _models import COMMON, cache_kwarg, tiny_model
from transformers import LlamaConfig

from tq_core import ComponentFormat, KVFormat, named_format
from tq_core.testing import rel_err
from tq_hf import CompressedKV, TurboQuantCache

D, HKV = 64, 2


def _cfg(**kw):
    return LlamaConfig(**{**COMMON, "num_hidden_layers": 1, **kw})


def _kv(b: int, t: int, seed: int, d: int = D, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, HKV, t, d, generator=g).to(dtype)
    v = torch.randn(b, HKV, t, d, generator=g).to(dtype)
    return k, v


def _quantized(fmt: KVFormat, k: torch.Tensor, v: torch.Tensor, layer: int = 0):
    """tq_core round trip of `[B, Hkv, T, d]`."""
    kq, vq = fmt.decode(fmt.encode(k.transpose(1, 2), v.transpose(1, 2), layer=layer), layer=layer)
    return kq.transpose(1, 2).to(k.dtype), vq.transpose(1, 2).to(v.dtype)


def _expected(fmt, k, v, n_comp, start=0):
    """What a layer holding k, v [B, Hkv, n, d] with n_comp compressed tokens must dequantize to."""
    kq, vq = _quantized(fmt, k[:, :, start:n_comp], v[:, :, start:n_comp])
    return torch.cat([kq, k[:, :, n_comp:]], 2), torch.cat([vq, v[:, :, n_comp:]], 2)


def _store_only(cfg, fmt, **kw):
    """A cache whose updates only store (placeholders out, as under the turboquant attention), so that
    storage tests do not pay for a dequantize per step."""
    return TurboQuantCache(cfg, fmt, fused_attention=True, **kw)


def _feed(cache, steps, b=2, seed=0):
    """Update layer 0 with chunks of `steps` tokens; returns the concatenated K, V."""
    ks, vs = [], []
    for i, t in enumerate(steps):
        k, v = _kv(b, t, seed + i)
        cache.update(k, v, 0)
        cache.flush_pending()
        ks.append(k)
        vs.append(v)
    return torch.cat(ks, 2), torch.cat(vs, 2)


@pytest.mark.parametrize("residual", [0, 1, 8])
@pytest.mark.parametrize(
    "steps", [[40, 1, 1, 1, 1, 1], [3, 5, 1, 20, 1], [1] * 30], ids=["prefill", "mixed", "decode"]
)
def test_residual_window_and_flushes(residual, steps):
    fmt = named_format("turboquant_4bit_nc", D)
    cache = _store_only(_cfg(), fmt, residual_length=residual, chunk_tokens=16)
    k, v = _feed(cache, steps)
    layer = cache.layers[0]
    n = sum(steps)
    assert cache.get_seq_length() == n and layer.n_comp + layer.r == n
    assert layer.r <= residual
    ek, ev = _expected(fmt, k, v, layer.n_comp)
    gk, gv = layer.dequantize()
    torch.testing.assert_close(gk, ek, rtol=0, atol=1e-5)
    torch.testing.assert_close(gv, ev, rtol=0, atol=1e-5)


def test_update_returns_full_states_for_other_attention():
    fmt = named_format("turboquant_k8v4", D)
    cache = TurboQuantCache(_cfg(), fmt, residual_length=4, chunk_tokens=8, fused_attention=False)
    k, v = _kv(1, 10, 0)
    rk, _ = cache.update(k, v, 0)
    assert torch.equal(rk, k)  # the prompt attends to itself exactly
    n0 = cache.layers[0].n_comp
    assert n0 == 8  # all but R - R // 2 = 2 tokens compressed
    k2, v2 = _kv(1, 1, 1)
    rk, _ = cache.update(k2, v2, 0)
    assert rk.shape == (1, HKV, 11, D)
    # gathered before storing the new token: quantized tokens, then the exact residual and new token
    kq, _ = _quantized(fmt, k[:, :, :n0], v[:, :, :n0])
    torch.testing.assert_close(rk[:, :, :n0], kq, rtol=0, atol=1e-5)
    torch.testing.assert_close(rk[:, :, n0:], torch.cat([k, k2], 2)[:, :, n0:])
    assert cache.get_mask_sizes(1, 0) == (12, 0)


def test_prompt_pending_until_attention_then_stored_with_padding_shift():
    fmt = named_format("turboquant_4bit_nc", D)
    cache = TurboQuantCache(_cfg(num_hidden_layers=2), fmt, residual_length=4, chunk_tokens=8)
    k, v = _kv(2, 21, 0)
    out_k, _ = cache.update(k, v, 0)
    layer = cache.layers[0]
    assert out_k is k and layer.pending is not None and layer.slots is None
    assert cache.used_bytes == k.numel() * 4 * 2  # pending prompt counts at full size
    layer.flush_pending((0, 5), torch.tensor([0, 5]))
    assert layer.pending is None and layer.shift == [0, 3]
    ek, _ = _expected(fmt, k, v, layer.n_comp)
    torch.testing.assert_close(layer.dequantize()[0], ek, rtol=0, atol=1e-5)
    # without the turboquant attention, the next layer's update stores a pending prompt (no shift)
    cache.update(k, v, 1)
    assert cache.layers[1].pending is not None
    cache.update(k[:, :, :1], v[:, :, :1], 0)
    assert cache.layers[1].pending is None and cache.layers[1].shift == [0, 0]


def test_crop_is_exact():
    fmt = named_format("turboquant_3bit_nc", D)
    cache = _store_only(_cfg(), fmt, residual_length=8, chunk_tokens=8)
    _feed(cache, [30, 1, 1, 1, 1, 1])
    before = cache.layers[0].dequantize()[0]
    cache.crop(0)  # nothing (transformers calls it after every assisted step)
    assert cache.get_seq_length() == 35
    cache.crop(torch.tensor(-3))  # inside the residual window; a 0-d tensor, as transformers 5.17 passes
    assert cache.get_seq_length() == 32 and type(cache.layers[0].cumulative_length) is int
    torch.testing.assert_close(cache.layers[0].dequantize()[0], before[:, :, :32])
    cache.crop(-10)  # into the compressed tokens
    layer = cache.layers[0]
    assert cache.get_seq_length() == 22 and layer.r == 0 and layer.n_comp == 22
    torch.testing.assert_close(layer.dequantize()[0], before[:, :, :22])
    k2, v2 = _kv(2, 3, 99)
    cache.update(k2, v2, 0)  # keeps working after a rollback
    got = cache.layers[0].dequantize()[0]
    torch.testing.assert_close(got[:, :, :22], before[:, :, :22])
    torch.testing.assert_close(got[:, :, 22:], k2)


@pytest.mark.parametrize("op", ["reorder", "select", "repeat"])
def test_batch_ops_move_compressed_bytes(op):
    fmt = named_format("turboquant_4bit_nc", D)
    cache = _store_only(_cfg(), fmt, residual_length=4, chunk_tokens=8)
    _feed(cache, [19, 1, 1], b=3)
    before = cache.layers[0].dequantize()
    if op == "reorder":
        idx = torch.tensor([2, 0, 0])
        cache.reorder_cache(idx)
    elif op == "select":
        idx = torch.tensor([2, 0])
        cache.batch_select_indices(idx)
    else:
        idx = torch.tensor([0, 0, 1, 1, 2, 2])
        cache.batch_repeat_interleave(2)
    after = cache.layers[0].dequantize()
    for a, b in zip(after, before, strict=True):
        torch.testing.assert_close(a, b[idx])
    k, v = _kv(len(idx), 9, 5)
    cache.update(k, v, 0)  # and the batch keeps decoding
    assert cache.layers[0].dequantize()[0].shape == (len(idx), HKV, 30, D)


def test_storage_grows_by_chunks_not_per_step():
    fmt = named_format("turboquant_4bit_nc", D)
    cache = _store_only(_cfg(), fmt, residual_length=16, chunk_tokens=16)
    _feed(cache, [100], b=1)
    layer = cache.layers[0]
    ptrs = {layer.slots.data_ptr()}
    for i in range(400):
        cache.update(*_kv(1, 1, i + 1), 0)
        ptrs.add(layer.slots.data_ptr())
    assert layer.capacity % 16 == 0 and layer.capacity >= layer.n_comp
    assert len(ptrs) <= 14, "reallocated too often"  # ~1/8 headroom per growth: log(544 / 128) / log(1.125)

    pre = _store_only(_cfg(), fmt, residual_length=16, chunk_tokens=16, max_cache_len=600)
    _feed(pre, [100], b=1)
    ptr = pre.layers[0].slots.data_ptr()
    for i in range(400):
        pre.update(*_kv(1, 1, i + 1), 0)
    assert pre.layers[0].slots.data_ptr() == ptr


def test_sliding_layer_keeps_only_its_window():
    fmt = named_format("turboquant_4bit_nc", D)
    cfg = _cfg(sliding_window=24)  # every layer sliding (Mistral style)
    cache = _store_only(cfg, fmt, residual_length=4, chunk_tokens=8)
    layer = cache.layers[0]
    get_max_length = getattr(cache, "get_max_length", None) or cache.get_max_cache_shape  # renamed in 5.13
    assert layer.is_sliding and get_max_length() == 24
    k, v = _feed(cache, [100] + [1] * 150)
    n = 250
    assert layer.capacity <= 24 + 3 * 8 + 4 + 8
    assert layer.start <= n - 24 - 1  # a query at n sees back to n - 24 + 1
    assert cache.get_mask_sizes(1, 0) == (n + 1 - layer.start, layer.start)
    gk, _ = layer.dequantize()
    ek, _ = _expected(fmt, k, v, layer.n_comp, start=layer.start)
    torch.testing.assert_close(gk, ek[:, :, -gk.shape[2] :], rtol=0, atol=1e-5)
    cache.crop(-8)  # a rollback within the spare chunk works
    with pytest.raises(RuntimeError, match="cannot crop"):
        cache.crop(-40)


@pytest.mark.parametrize("kwargs", [{}, {"recurrent_states_to_keep": 5}], ids=["5.14", "5.25"])
def test_recording_the_past_lets_a_sliding_layer_roll_back_further(kwargs):
    """transformers calls activate_past_recording before steps it may roll back (5.25 passes a count
    meant for recurrent states); until the next crop a sliding layer then keeps every window a rollback
    may return to, beyond its spare chunk."""
    fmt = named_format("turboquant_4bit_nc", D)
    cache = _store_only(_cfg(sliding_window=24), fmt, residual_length=4, chunk_tokens=8)
    layer = cache.layers[0]
    k, v = _feed(cache, [100] + [1] * 20)
    too_far = 120 - (layer.start + 24 - 1) + 1  # the next query's window would start before layer.start
    with pytest.raises(RuntimeError, match="activate_past_recording"):
        cache.crop(-too_far)  # refused, rather than attending over a window short of some tokens
    assert cache.get_seq_length() == 120
    layer.activate_past_recording(**kwargs)
    assert layer.record_past
    _feed(cache, [1] * 40, seed=50)
    cache.crop(-40)  # back to where recording started
    assert cache.get_seq_length() == 120 and layer.start <= 120 + 1 - 24
    gk, _ = layer.dequantize()
    ek, _ = _expected(fmt, k, v, layer.n_comp, start=layer.start)
    torch.testing.assert_close(gk, ek, rtol=0, atol=1e-5)
    for i in range(60):  # assisted steps: each crop moves the point a rollback may return to
        cache.update(*_kv(2, 1, 100 + i), 0)
        cache.crop(0)
    assert layer.start > 120, "tokens no rollback can reach any more are still kept"


def test_memory_accounting_and_ratio():
    d = 128
    cfg = _cfg(head_dim=d, num_attention_heads=8, num_key_value_heads=HKV, hidden_size=256)
    fmt = named_format("turboquant_4bit_nc", d)
    cache = _store_only(cfg, fmt, residual_length=64, chunk_tokens=128)
    n = 4096
    k, v = _kv(1, n, 0, d=d, dtype=torch.bfloat16)
    cache.update(k, v, 0)
    cache.flush_pending()
    layer = cache.layers[0]
    assert cache.used_bytes == (layer.n_comp * fmt.slot_bytes + 2 * layer.r * d * 2) * HKV
    assert cache.nbytes >= cache.used_bytes
    dense = cache.dense_bytes(torch.bfloat16)
    assert dense == 2 * n * HKV * d * 2
    assert cache.nbytes <= 0.30 * dense, cache.nbytes / dense


def test_per_layer_formats():
    cfg = _cfg(num_hidden_layers=3)
    f8 = KVFormat(D, ComponentFormat(8, norm_dtype="float32"), ComponentFormat(8, norm_dtype="float32"))
    cache = TurboQuantCache(cfg, "turboquant_3bit_nc", layer_formats={0: f8, 2: "turboquant_k8v4"})
    assert cache.formats[0] is f8
    assert cache.formats[1] == named_format("turboquant_3bit_nc", D)
    assert cache.formats[2] == named_format("turboquant_k8v4", D)
    listed = TurboQuantCache(cfg, layer_formats=["turboquant_4bit_nc", f8, f8])
    assert listed.formats[1] is f8
    by_fn = TurboQuantCache(cfg, layer_formats=lambda i: f8 if i == 0 else "turboquant_4bit_nc")
    assert by_fn.formats[0] is f8


def test_placeholders_refuse_other_attention():
    cache = TurboQuantCache(_cfg(), "turboquant_4bit_nc", residual_length=4, fused_attention=True)
    k, v = _kv(1, 5, 0)
    pk, pv = cache.update(k, v, 0)
    assert isinstance(pk, CompressedKV) and pk.tq_layer is cache.layers[0]
    assert pk.shape[0] == 1 and pk.device.type == "meta"
    with pytest.raises(RuntimeError, match="turboquant"):
        torch.nn.functional.scaled_dot_product_attention(torch.randn(1, 2, 1, D), pk, pv)
    with pytest.raises(RuntimeError, match="fused_attention=False"):
        pk[:, :, None]


def test_switching_to_another_attention_fails_loudly():
    model = tiny_model("llama")
    model.set_attn_implementation("turboquant")
    cache = TurboQuantCache(model.config, "turboquant_4bit_nc", residual_length=4)
    ids = torch.randint(0, 100, (1, 12))
    kw = {cache_kwarg(model): cache}
    model(input_ids=ids, **kw)
    model(input_ids=ids[:, :1], **kw)
    model.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match="attn_implementation='turboquant'"):
        model(input_ids=ids[:, :1], **kw)


# -- unsupported models fail at creation --------------------------------------------------------------
def _ns(**kw):
    base = dict(
        model_type="toy",
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        hidden_size=256,
    )
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (_ns(layer_types=["linear_attention", "full_attention"]), r"linear_attention"),
        (_ns(attention_chunk_size=128), r"chunked_attention"),
        (_ns(kv_lora_rank=64), r"multi-head latent attention"),
        (_ns(num_kv_shared_layers=1), r"KV sharing"),
        (_ns(v_head_dim=128), r"v_head_dim=128 differs"),
        (_ns(num_key_value_heads=3), r"not a multiple"),
        (_ns(is_encoder_decoder=True), r"encoder-decoder"),
        (_ns(layer_types=["sliding_attention"] * 2), r"no integer sliding_window"),
        (_ns(head_dim=48), r"head_dim 48 has no tq_kernels kernels"),
        (_ns(alibi=True), r"ALiBi"),
        (_ns(is_causal=False), r"not causal"),
        (_ns(num_attention_heads=None, model_type="mamba"), r"cannot serve mamba: .*no attention heads"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_unsupported_configs_fail_at_creation(config, message):
    with pytest.raises(ValueError, match=message):
        TurboQuantCache(config, "turboquant_4bit_nc", backend="triton")


def test_real_configs_fail_at_creation():
    from transformers import MambaConfig, T5Config

    with pytest.raises(ValueError, match="encoder-decoder"):
        TurboQuantCache(T5Config(), "turboquant_4bit_nc")
    with pytest.raises(ValueError, match="mamba"):
        TurboQuantCache(MambaConfig(num_hidden_layers=2), "turboquant_4bit_nc")


def test_format_mismatches_fail_at_creation():
    with pytest.raises(ValueError, match="head_dim 128, the model has 64"):
        TurboQuantCache(_cfg(), named_format("turboquant_4bit_nc", 128))
    with pytest.raises(ValueError, match="layer_formats has 1 entries"):
        TurboQuantCache(_cfg(num_hidden_layers=2), layer_formats=["turboquant_4bit_nc"])
    with pytest.raises(ValueError, match="unknown format"):
        TurboQuantCache(_cfg(), "turboquant_2bit")
    # the tq_core reference path serves any head_dim
    TurboQuantCache(_ns(head_dim=48), named_format("turboquant_4bit_nc", 48), backend="torch")


def test_tiny_models_differ_only_by_quantization():
    """The dequantize path returns what was stored: a cache of exact (8-bit, fp32 norm) slots
    dequantizes within 1% of the K/V it was given."""
    f8 = KVFormat(D, ComponentFormat(8, norm_dtype="float32"), ComponentFormat(8, norm_dtype="float32"))
    cache = _store_only(_cfg(), f8, residual_length=2, chunk_tokens=8)
    k, v = _feed(cache, [33, 1, 1])
    gk, gv = cache.layers[0].dequantize()
    assert rel_err(gk, k) < 0.01 and rel_err(gv, v) < 0.01
