"""End to end on tiny random models (Llama, Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3): logits against
`DynamicCache`, and `generate` (greedy, sampling, beam search, assisted decoding, left-padded batches)."""

from __future__ import annotations

import warnings

import pytest
import torch
from _models import VOCAB, cache_kwarg, reference_attention, tiny_model
from transformers import DynamicCache

from tq_core import ComponentFormat, KVFormat
from tq_core.testing import rel_err
from tq_hf import TurboQuantCache

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3"]

# Relative RMS error of the logits against DynamicCache after a 40-token prompt and 6 decode steps.
# Tiny random models amplify KV errors (no trained structure), so these bounds are loose: 8-bit
# K/V with float32 norms stays well under 2%; the 4-bit budget under 20% on every family here.
LOGIT_TOL = {"k8v8": 0.02, "turboquant_4bit_nc": 0.2}


def _fmt8(d: int) -> KVFormat:
    return KVFormat(d, ComponentFormat(8, norm_dtype="float32"), ComponentFormat(8, norm_dtype="float32"))


def _cache(model, fmt_name, **kw):
    fmt = _fmt8(model.config.head_dim) if fmt_name == "k8v8" else fmt_name
    return TurboQuantCache(model.config, fmt, **{"residual_length": 8, "chunk_tokens": 16, **kw})


def _batch(seed=1, b=2, t=40, pad=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0  # left padding
    return ids, mask


def _logits(model, cache, attn, steps=6):
    model.set_attn_implementation(attn)
    ids, mask = _batch()
    kw = {cache_kwarg(model): cache}
    out = [model(input_ids=ids, attention_mask=mask, **kw).logits[:, -1:]]
    nxt = torch.randint(3, VOCAB, (2, steps), generator=torch.Generator().manual_seed(2))
    for i in range(steps):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        out.append(model(input_ids=nxt[:, i : i + 1], attention_mask=mask, **kw).logits)
    return torch.cat(out, 1)


@pytest.mark.parametrize("fmt", list(LOGIT_TOL))
@pytest.mark.parametrize("attn", ["turboquant", "reference"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_close_to_dynamic_cache(family, attn, fmt):
    model = tiny_model(family)
    ref_attn = reference_attention(family)
    want = _logits(model, DynamicCache(config=model.config), ref_attn)
    cache = _cache(model, fmt)
    got = _logits(model, cache, "turboquant" if attn == "turboquant" else ref_attn)
    assert cache.get_seq_length() == 46
    for row in range(2):
        assert rel_err(got[row], want[row]) < LOGIT_TOL[fmt], (row, rel_err(got[row], want[row]))


def _generate(model, cache, attn, ids, mask, **kw):
    model.set_attn_implementation(attn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(
            input_ids=ids, attention_mask=mask, **{cache_kwarg(model): cache}, pad_token_id=0, **kw
        )


def _greedy(model, cache, attn, ids, mask, steps, **kw):
    return _generate(
        model,
        cache,
        attn,
        ids,
        mask,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        **kw,
    )


def _assert_same_greedy_tokens(want, got, prompt_len: int) -> None:
    """The generated tokens are equal, except that a row may diverge at a step where the reference's two
    best logits were closer than our cache moved them (a tie that 8-bit noise may break either way;
    random tiny models have top-2 gaps down to 1e-4).  Up to that step the logits agree to 2%."""
    w, g = want.sequences[:, prompt_len:], got.sequences[:, prompt_len:]
    assert w.shape == g.shape
    for row in range(w.shape[0]):
        diff = (w[row] != g[row]).nonzero()
        last = int(diff[0]) if len(diff) else w.shape[1]
        for i in range(min(last + 1, w.shape[1])):
            ok = torch.isfinite(want.scores[i][row])  # min_new_tokens sets EOS to -inf
            assert rel_err(got.scores[i][row][ok], want.scores[i][row][ok]) < 0.02, (row, i)
        if last < w.shape[1]:
            ok = torch.isfinite(want.scores[last][row])
            ref = want.scores[last][row][ok]
            top2 = ref.topk(2).values
            moved = (got.scores[last][row][ok] - ref).abs().max()
            assert top2[0] - top2[1] < 2 * moved, f"row {row} diverged at step {last} without a tie"


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_8bit_matches_dynamic_cache_64_steps(family):
    model = tiny_model(family)
    ids, mask = _batch(t=24, pad=5)
    ref_attn = reference_attention(family)
    want = _greedy(model, DynamicCache(config=model.config), ref_attn, ids, mask, 64)
    cache = _cache(model, "k8v8", residual_length=64)  # the default window; older tokens get compressed
    got = _greedy(model, cache, "turboquant", ids, mask, 64)
    _assert_same_greedy_tokens(want, got, 24)
    assert cache.get_seq_length() == 24 + 63
    assert cache.layers[0].n_comp > 0  # the compressed path was exercised


def test_greedy_8bit_any_attention():
    model = tiny_model("llama")
    ids, mask = _batch(t=24, pad=5)
    want = _greedy(model, DynamicCache(config=model.config), "sdpa", ids, mask, 32)
    for attn in ("sdpa", "eager"):
        _assert_same_greedy_tokens(want, _greedy(model, _cache(model, "k8v8"), attn, ids, mask, 32), 24)


def test_sampling_8bit():
    model = tiny_model("qwen3")
    ids, mask = _batch(t=20)
    kw = dict(max_new_tokens=24, min_new_tokens=24, do_sample=True, top_k=20, temperature=0.8,
              output_scores=True, return_dict_in_generate=True)  # fmt: skip
    torch.manual_seed(123)
    want = _generate(model, DynamicCache(config=model.config), "sdpa", ids, mask, **kw)
    torch.manual_seed(123)
    got = _generate(model, _cache(model, "k8v8"), "turboquant", ids, mask, **kw)
    # Same seed, same draws: the sampled tokens are equal until 8-bit noise moves a draw across a boundary
    # of the cumulative distribution (transformers 5.4 samples the tiny model differently from 5.25 and
    # crosses one at some step).  Up to and including that step the processed scores agree to 2% where both
    # keep a token, and the token drawn there is one the reference could draw too (inside its top-k).
    w, g = want.sequences[:, 20:], got.sequences[:, 20:]
    assert w.shape == g.shape == (2, 24)
    for row in range(2):
        diff = (w[row] != g[row]).nonzero()
        last = int(diff[0]) if len(diff) else w.shape[1]
        for i in range(min(last + 1, w.shape[1])):
            ok = torch.isfinite(want.scores[i][row]) & torch.isfinite(got.scores[i][row])
            assert ok.sum() >= 18, (row, i)  # the top-20 sets differ at most in near-tied members
            assert rel_err(got.scores[i][row][ok], want.scores[i][row][ok]) < 0.02, (row, i)
        if last < w.shape[1]:
            assert torch.isfinite(want.scores[last][row][g[row, last]]), f"row {row} step {last}"


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_beam_search_8bit(family):
    model = tiny_model(family)
    ids, mask = _batch(t=20, pad=4)
    kw = dict(max_new_tokens=16, min_new_tokens=16, num_beams=3, do_sample=False, early_stopping=True)
    want = _generate(model, DynamicCache(config=model.config), reference_attention(family), ids, mask, **kw)
    got = _generate(model, _cache(model, "k8v8"), "turboquant", ids, mask, **kw)
    assert torch.equal(got, want)


def test_assisted_decoding_prompt_lookup_8bit():
    """Candidate tokens are verified several at a time and rejected ones cropped from the cache."""
    model = tiny_model("mistral")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (1, 12), generator=g).repeat(1, 3)  # repetitive: lookups hit
    mask = torch.ones_like(ids)
    want = _greedy(model, DynamicCache(config=model.config), "sdpa", ids, mask, 40)
    cache = _cache(model, "k8v8", residual_length=4, chunk_tokens=8)
    got = _greedy(model, cache, "turboquant", ids, mask, 40, prompt_lookup_num_tokens=5)
    _assert_same_greedy_tokens(want, got, ids.shape[1])
    assert cache.get_seq_length() == ids.shape[1] + 39


def test_assisted_decoding_with_assistant_model_8bit():
    model = tiny_model("llama")
    assistant = tiny_model("llama", seed=5)
    ids, mask = _batch(t=16)
    ids, mask = ids[:1], mask[:1]
    want = _greedy(model, DynamicCache(config=model.config), "sdpa", ids, mask, 24)
    got = _greedy(model, _cache(model, "k8v8"), "turboquant", ids, mask, 24, assistant_model=assistant)
    _assert_same_greedy_tokens(want, got, ids.shape[1])


def test_batch_select_indices_keeps_the_selected_rows():
    model = tiny_model("llama")
    model.set_attn_implementation("turboquant")
    ids = torch.randint(3, VOCAB, (3, 30), generator=torch.Generator().manual_seed(4))
    nxt = torch.randint(3, VOCAB, (3, 4), generator=torch.Generator().manual_seed(5))
    ck = cache_kwarg(model)
    full = _cache(model, "turboquant_4bit_nc")
    model(input_ids=ids, **{ck: full})
    full.batch_select_indices(torch.tensor([2, 0]))
    sub = _cache(model, "turboquant_4bit_nc")
    model(input_ids=ids[[2, 0]], **{ck: sub})
    for i in range(4):
        a = model(input_ids=nxt[[2, 0], i : i + 1], **{ck: full}).logits
        b = model(input_ids=nxt[[2, 0], i : i + 1], **{ck: sub}).logits
        torch.testing.assert_close(a, b)


def test_turboquant_attention_with_dynamic_cache():
    """Without a TurboQuantCache the attention function is plain causal attention."""
    model = tiny_model("gemma3")
    want = _logits(model, DynamicCache(config=model.config), "sdpa")
    got = _logits(model, DynamicCache(config=model.config), "turboquant")
    assert rel_err(got, want) < 1e-5


def _chunked_logits(model, cache, attn, ids, mask, chunk):
    model.set_attn_implementation(attn)
    kw = {cache_kwarg(model): cache}
    out = []
    for s in range(0, ids.shape[1], chunk):
        out.append(model(input_ids=ids[:, s : s + chunk], attention_mask=mask[:, : s + chunk], **kw).logits)
    return torch.cat(out, 1)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_chunked_forward_reads_its_own_tokens_exact(family):
    # Every earlier token comes from the 4-bit store (residual_length=0); a chunk's own tokens are exact
    # with chunk_kv="exact" (the default), as any other attention implementation sees them, and as stored
    # with chunk_kv="compressed".
    model = tiny_model(family)
    ids, mask = _batch(t=48, pad=5)
    opts = {"residual_length": 0, "chunk_tokens": 16}
    plain = _cache(model, "turboquant_4bit_nc", fused_attention=False, **opts)
    want = _chunked_logits(model, plain, "eager", ids, mask, 16)
    exact_cache = _cache(model, "turboquant_4bit_nc", **opts)
    exact = _chunked_logits(model, exact_cache, "turboquant", ids, mask, 16)
    assert exact_cache.layers[0].n_comp == 48  # every token went through the store
    stored = _chunked_logits(
        model, _cache(model, "turboquant_4bit_nc", chunk_kv="compressed", **opts), "turboquant", ids, mask, 16
    )
    real = mask.bool()
    err_exact = rel_err(exact[real], want[real])
    err_stored = rel_err(stored[real], want[real])
    assert err_exact < 1e-4, err_exact
    assert err_stored > 10 * max(err_exact, 1e-6), (err_stored, err_exact)
    # the first chunk (the prompt) is attended exactly in every mode
    assert rel_err(stored[:, :16][real[:, :16]], want[:, :16][real[:, :16]]) < 1e-4


def test_chunk_longer_than_a_block_keeps_its_window_on_sliding_layers():
    # A 32-token chunk over 16-token blocks on Mistral's 16-token window: the store keeps what the chunk's
    # first query sees until the chunk has attended (it used to drop it first: 51% logit error).
    model = tiny_model("mistral")
    ids, mask = _batch(t=64, pad=5)
    opts = {"residual_length": 0, "chunk_tokens": 16}
    plain = _cache(model, "k8v8", fused_attention=False, **opts)
    want = _chunked_logits(model, plain, "eager", ids, mask, 32)
    got = _chunked_logits(model, _cache(model, "k8v8", **opts), "turboquant", ids, mask, 32)
    real = mask.bool()
    assert rel_err(got[real], want[real]) < 1e-4
