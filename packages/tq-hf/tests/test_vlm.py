"""Vision-language models (issue 18): the bidirectional image ranges of a multimodal prefix on every
path of the turboquant attention against tq_core's reference with the same explicit mask (an image range
split across two prompt forwards included), and tiny random Qwen2-VL, Gemma 3 and PaliGemma models
(tests/_vlm.py) generating with images through a TurboQuantCache as through a DynamicCache."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from _models import COMMON, cache_kwarg
from _vlm import VLM_FAMILIES, image_array, model_inputs, pixel_inputs, prompt_ids, tiny_vlm
from test_generate import _assert_same_greedy_tokens, _fmt8
from transformers import DynamicCache, LlamaConfig

from tq_core import attention_ref
from tq_core.testing import rel_err
from tq_hf import TurboQuantCache, turboquant_attention_forward, turboquant_mask

D, H, HKV = 64, 4, 2
T, IMAGE_RANGE = 30, (6, 22)  # a 30-token prompt whose tokens 6..21 are one image


# -- the mask, one layer at a time, against attention_ref ---------------------------------------------
def _allowed(pads: tuple[int, ...], window: int | None) -> torch.Tensor:
    """bool `[B, T, T]`, written out independently of transformers: causal or inside the image range
    (both ends), the window on top (AND(window, OR(causal, image)), as Gemma 3's sliding layers), and
    never a padding key."""
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    a, b = IMAGE_RANGE
    ok = (j <= i) | ((i >= a) & (i < b) & (j >= a) & (j < b))
    if window is not None:
        ok &= (i - j) < window
    keys = torch.arange(T)[None, :] >= torch.tensor(pads)[:, None]  # [B, T]
    return ok[None] & keys[:, None, :]


def _image_prefix():
    """The pattern as a transformers mask function (index-based: it takes broadcast index tensors)."""
    a, b = IMAGE_RANGE

    def fn(batch_idx, head_idx, q_idx, kv_idx):
        image = (q_idx >= a) & (q_idx < b) & (kv_idx >= a) & (kv_idx < b)
        return (kv_idx <= q_idx) | image

    return fn


def _windowed(fn, window):
    if window is None:
        return fn
    return lambda b, h, q, kv: fn(b, h, q, kv) & ((q - kv) < window)


def _mask4d(layer, pads, t, window, *, q_offset, mask2d):
    """The 4D mask transformers builds for the turboquant attention of a forward of ``t`` tokens: sized
    by the cache (get_mask_sizes, before the update) and made by turboquant_mask as create_causal_mask
    calls it when a model lays image ranges over the causal mask."""
    kv_length, kv_offset = layer.get_mask_sizes(t)
    mask = turboquant_mask(
        len(pads),
        t,
        kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=_windowed(_image_prefix(), window),
        attention_mask=mask2d[:, : q_offset + t],
        allow_is_causal_skip=False,
    )
    assert mask.shape == (len(pads), 1, t, kv_length) and mask.dtype == torch.bool
    return mask


def _ref(q, k, v, allowed, scale):
    """attention_ref per row, `[B, t, H, d]`, queries the last t positions of k/v, the explicit mask only."""
    return torch.stack(
        [
            attention_ref(
                q[r].transpose(0, 1),
                k[r].transpose(0, 1),
                v[r].transpose(0, 1),
                scale=scale,
                causal=False,
                mask=allowed[r],
            )
            for r in range(q.shape[0])
        ]
    )


@pytest.mark.parametrize("window", [None, 8], ids=["full", "sliding8"])
@pytest.mark.parametrize("pads", [(0, 0), (0, 3)], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("split", [T, 14], ids=["one-forward", "image-split-at-14"])
def test_image_prefix_mask_on_every_path_matches_reference(split, pads, window):
    """The prompt path (pending), a second prompt forward over a filled cache (dequantize path, with the
    image range split between the two forwards) and a decode step, each against attention_ref with the
    explicit mask over the K/V that forward reads."""
    kw = {**COMMON, "num_hidden_layers": 1, **({"sliding_window": window} if window else {})}
    cache = TurboQuantCache(
        LlamaConfig(**kw), _fmt8(D), residual_length=4, chunk_tokens=8, fused_attention=True
    )
    layer = cache.layers[0]
    g = torch.Generator().manual_seed(0)
    b = len(pads)
    q = torch.randn(b, H, T + 1, D, generator=g)
    k = torch.randn(b, HKV, T + 1, D, generator=g) * 2
    v = torch.randn(b, HKV, T + 1, D, generator=g)
    mask2d = (torch.arange(T + 1)[None, :] >= torch.tensor(pads)[:, None]).long()
    allowed = _allowed(pads, window)
    module = torch.nn.Module()  # a decoder layer's attention: causal
    scale = D**-0.5

    def forward(lo, hi, mask):
        kph, vph = cache.update(k[:, :, lo:hi], v[:, :, lo:hi], 0)
        return turboquant_attention_forward(module, q[:, :, lo:hi], kph, vph, mask, sliding_window=window)[0]

    # the prompt, in one or two forwards
    out = forward(0, split, _mask4d(layer, pads, split, window, q_offset=0, mask2d=mask2d))
    want = _ref(q[:, :, :split], k[:, :, :split], v[:, :, :split], allowed[:, :split, :split], scale)
    assert rel_err(out, want) < 1e-5
    if any(pads):  # the 4D mask told the store where each row's padding ends
        assert layer.decode_read(pads, torch.tensor(pads), window) is not None
    if split < T:
        m = _mask4d(layer, pads, T - split, window, q_offset=split, mask2d=mask2d)
        out = forward(split, T, m)
        kd, vd = layer.dequantize()  # earlier tokens from the store, this forward's own tokens exact
        start = layer.start
        assert torch.equal(kd[:, :, split - start :], k[:, :, split:T])
        want = _ref(q[:, :, split:T], kd, vd, allowed[:, split:, start:], scale)
        assert rel_err(out, want) < 1e-5
        # and the store's tokens are the 8-bit reading of the exact ones
        exact = _ref(q[:, :, split:T], k[:, :, start:T], v[:, :, start:T], allowed[:, split:, start:], scale)
        assert rel_err(out, exact) < 2e-2
    # a decode step: transformers hands over the plain padding mask (the pattern is causal again)
    plain = turboquant_mask(b, 1, T + 1, q_offset=T, attention_mask=mask2d, allow_is_causal_skip=True)
    assert plain is None or plain.dim() == 2
    out = forward(T, T + 1, plain)
    kd, vd = layer.dequantize()
    start = layer.start
    last = (torch.arange(start, T + 1)[None, :] >= torch.tensor(pads)[:, None])[:, None, :]  # [B, 1, L]
    if window is not None:
        last = last & (T - torch.arange(start, T + 1) < window)
    assert rel_err(out, _ref(q[:, :, T:], kd, vd, last, scale)) < 1e-5


def test_mask_function_builds_the_full_mask_for_overlays():
    mask2d = torch.ones(2, T, dtype=torch.long)
    mask2d[1, :3] = 0
    for how in ({"allow_is_causal_skip": False}, {"use_vmap": True}):
        m = turboquant_mask(2, T, T, mask_function=_image_prefix(), attention_mask=mask2d, **how)
        assert torch.equal(m[:, 0], _allowed((0, 3), None)), how
        assert m.tq_pads == (0, 3) and m.tq_pads_dev.tolist() == [0, 3]
    plain = turboquant_mask(
        2, T, T, mask_function=_image_prefix(), attention_mask=mask2d, allow_is_causal_skip=True
    )
    assert plain.dim() == 2  # a plain causal pattern: the padding mask only


def test_mask_reaching_behind_a_sliding_window_is_refused():
    cache = TurboQuantCache(
        LlamaConfig(**{**COMMON, "num_hidden_layers": 1, "sliding_window": 8}),
        _fmt8(D),
        residual_length=4,
        chunk_tokens=8,
        fused_attention=True,
    )
    layer = cache.layers[0]
    g = torch.Generator().manual_seed(1)

    def kv(t):
        return torch.randn(1, HKV, t, D, generator=g), torch.randn(1, HKV, t, D, generator=g)

    module = torch.nn.Module()
    kph, vph = cache.update(*kv(40), 0)
    turboquant_attention_forward(module, torch.randn(1, H, 40, D), kph, vph, None, sliding_window=8)
    for _ in range(64):  # decode until an update drops a block of the positions the mask was sized for
        kv_length, kv_offset = layer.get_mask_sizes(1)
        kph, vph = cache.update(*kv(1), 0)
        if layer.start > kv_offset:
            break
        turboquant_attention_forward(module, torch.randn(1, H, 1, D), kph, vph, None, sliding_window=8)
    assert layer.start > kv_offset
    everything = torch.ones(1, 1, 1, kv_length, dtype=torch.bool)  # a pattern reaching behind the window
    with pytest.raises(ValueError, match="no longer holds"):
        turboquant_attention_forward(module, torch.randn(1, H, 1, D), kph, vph, everything, sliding_window=8)
    window = everything.clone()
    window[..., :-8] = False  # the window itself: served
    out, _ = turboquant_attention_forward(module, torch.randn(1, H, 1, D), kph, vph, window, sliding_window=8)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="attends 1 queries"):
        turboquant_attention_forward(module, torch.randn(1, H, 1, D), kph, vph, everything[..., :3])


def test_bidirectional_module_without_cache():
    """An image encoder's attention (is_causal False) through the turboquant attention: plain
    bidirectional attention, the padding mask honoured."""
    module = torch.nn.Module()
    module.is_causal = False
    g = torch.Generator().manual_seed(2)
    q, k, v = (
        torch.randn(2, H, 9, D, generator=g),
        torch.randn(2, HKV, 9, D, generator=g),
        torch.randn(2, HKV, 9, D, generator=g),
    )
    keys = torch.ones(2, 9, dtype=torch.bool)
    keys[1, :2] = False
    out, _ = turboquant_attention_forward(module, q, k, v, keys)
    want = _ref(q, k, v, keys[:, None, :].expand(2, 9, 9), D**-0.5)
    assert rel_err(out, want) < 1e-5


# -- tiny VLMs end to end --------------------------------------------------------------------------
def _inputs(model, family, images_per_row=2):
    ids, mask = prompt_ids(family, [[7, 8, 9, 10, 3, 4, 5], [11, 12, 13, 14]], images_per_row=images_per_row)
    images = [image_array(i) for i in range(len(ids) * images_per_row)]
    return ids, mask, model_inputs(model, family, ids, images, mask)


def _cache(model, chunk_tokens=16):
    # 8 exact tokens: most of each prompt (two 16-token images) is read back from the 8-bit store
    return TurboQuantCache(model.config, _fmt8(D), residual_length=8, chunk_tokens=chunk_tokens)


def _greedy(model, cache, attn, kw, steps, **extra):
    model.set_attn_implementation(attn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(
            **kw,
            **{cache_kwarg(model): cache},
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            output_scores=True,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
            **extra,
        )


@pytest.mark.parametrize("attn", ["turboquant", "sdpa"])
@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_vlm_prompt_logits_match_dynamic_cache(family, attn):
    """Every position of a prompt with images: the image tokens' own outputs show the bidirectional
    ranges (generation, below, hardly depends on them in a tiny random model)."""
    model = tiny_vlm(family)
    _, mask, kw = _inputs(model, family)
    model.set_attn_implementation("eager")
    want = model(**kw, **{cache_kwarg(model): DynamicCache(config=model.config)}).logits
    model.set_attn_implementation(attn)  # the image encoder runs through it too
    got = model(**kw, **{cache_kwarg(model): _cache(model)}).logits
    real = mask.bool()
    assert rel_err(got[real], want[real]) < 1e-4


@pytest.mark.parametrize("attn", ["turboquant", "sdpa", "eager"])
@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_vlm_greedy_8bit_matches_dynamic_cache(family, attn):
    model = tiny_vlm(family)
    ids, _, kw = _inputs(model, family)
    want = _greedy(model, DynamicCache(config=model.config), "sdpa", kw, 24)
    cache = _cache(model)
    got = _greedy(model, cache, attn, kw, 24)
    _assert_same_greedy_tokens(want, got, ids.shape[1])
    assert cache.layers[0].n_comp > 0


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_vlm_chunked_prefill_splits_images(family):
    """generate(prefill_chunk_size=13) with pre-encoded images: chunk ends at 13 and 26 fall inside both
    images of each row; each chunk reads the earlier ones from the store, Gemma 3's sliding layers (window
    8) included, whose blocks (8 tokens) are shorter than a chunk."""
    model = tiny_vlm(family)
    if "mm_encoder_outputs" not in inspect.signature(model.forward).parameters:
        pytest.skip("this transformers takes no mm_encoder_outputs: generate cannot split images into chunks")
    ids, _, kw = _inputs(model, family)
    pixels = pixel_inputs(family, [image_array(i) for i in range(4)])
    kw.pop("pixel_values")
    kw["mm_encoder_outputs"] = {"image": model.get_image_features(**pixels, return_dict=True)}
    want = _greedy(model, DynamicCache(config=model.config), "eager", kw, 8, prefill_chunk_size=13)
    got = _greedy(model, _cache(model, chunk_tokens=8), "turboquant", kw, 8, prefill_chunk_size=13)
    _assert_same_greedy_tokens(want, got, ids.shape[1])
