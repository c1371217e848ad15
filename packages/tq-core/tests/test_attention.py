import pytest
import torch

from tq_core import attention_ref, named_format, paged_decode_attention_ref, paged_extend_attention_ref


def _sdpa(q, k, v, mask, scale=None):
    # independent formula: torch's SDPA on [heads, tokens, d]
    group = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1), attn_mask=mask, scale=scale
    )
    return o.transpose(0, 1)


@pytest.mark.parametrize(("nq", "nk", "h", "hkv"), [(1, 1, 2, 2), (5, 17, 8, 2), (17, 17, 4, 1)])
def test_matches_sdpa_causal_gqa(nq, nk, h, hkv):
    q, k, v = torch.randn(nq, h, 32), torch.randn(nk, hkv, 32), torch.randn(nk, hkv, 32)
    pos = torch.arange(nk - nq, nk)[:, None]
    mask = torch.arange(nk)[None, :] <= pos
    torch.testing.assert_close(attention_ref(q, k, v), _sdpa(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_sliding_window_softcap_and_sinks():
    q, k, v = torch.randn(6, 4, 16), torch.randn(20, 2, 16), torch.randn(20, 2, 16)
    pos = torch.arange(14, 20)[:, None]
    j = torch.arange(20)[None, :]
    mask = (j <= pos) & (pos - j < 5)
    torch.testing.assert_close(
        attention_ref(q, k, v, sliding_window=5), _sdpa(q, k, v, mask), atol=1e-5, rtol=1e-5
    )
    # soft-capping with a huge cap is the identity
    torch.testing.assert_close(
        attention_ref(q, k, v, softcap=1e6), attention_ref(q, k, v), atol=1e-5, rtol=1e-5
    )
    # a sink of -inf changes nothing; a finite sink scales the output by 1 - p_sink
    assert torch.allclose(attention_ref(q, k, v, sinks=torch.full((4,), -1e30)), attention_ref(q, k, v))
    s = torch.tensor([0.5, -1.0, 2.0, 0.0])
    scores = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(2, 1)) * 16**-0.5
    scores = scores.masked_fill(~(j <= pos), float("-inf"))
    lse = torch.logsumexp(scores, -1)
    p_keep = torch.sigmoid(lse - s[:, None]).T  # [q, h]
    torch.testing.assert_close(
        attention_ref(q, k, v, sinks=s), attention_ref(q, k, v) * p_keep[..., None], atol=1e-5, rtol=1e-5
    )


def test_explicit_mask_bidirectional_range():
    # a vision-language prefix: tokens 3..8 are one image, bidirectional inside, causal elsewhere
    q, k, v = torch.randn(12, 4, 16), torch.randn(12, 2, 16), torch.randn(12, 2, 16)
    i, j = torch.arange(12)[:, None], torch.arange(12)[None, :]
    image = (i >= 3) & (i < 9) & (j >= 3) & (j < 9)
    allowed = (j <= i) | image
    got = attention_ref(q, k, v, causal=False, mask=allowed)
    torch.testing.assert_close(got, _sdpa(q, k, v, allowed), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[3:8], attention_ref(q, k, v)[3:8])  # the image's queries looked ahead
    # with causal=True the mask is combined with causality: the look-ahead is cut again
    torch.testing.assert_close(attention_ref(q, k, v, mask=allowed), attention_ref(q, k, v))
    # keys the mask hides never affect a query, NaN included
    k[10, 0, 0] = float("nan")
    hide = allowed & (j != 10)
    out = attention_ref(q, k, v, causal=False, mask=hide)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        attention_ref(q, k, v, mask=allowed.float())
    with pytest.raises(ValueError, match="num_q=12, num_k=12"):
        attention_ref(q, k, v, mask=allowed[:, :5])


def _paged_setup(fmt, lens, hkv, bs, seed=0):
    g = torch.Generator().manual_seed(seed)
    max_blocks = max((n + bs - 1) // bs for n in lens)
    nblocks = len(lens) * max_blocks + 3
    perm = torch.randperm(nblocks, generator=g)
    table = perm[: len(lens) * max_blocks].view(len(lens), max_blocks)
    cache = fmt.allocate_cache(nblocks, bs, hkv)
    ks, vs = [], []
    for b, n in enumerate(lens):
        k, v = torch.randn(n, hkv, fmt.head_dim, generator=g), torch.randn(n, hkv, fmt.head_dim, generator=g)
        pos = torch.arange(n)
        fmt.store_paged(cache, k, v, table[b][pos // bs] * bs + pos % bs)
        ks.append(k)
        vs.append(v)
    return cache, table, ks, vs


def test_paged_decode_reference_equals_attention_on_decoded_cache():
    fmt = named_format("turboquant_4bit_nc", 64)
    lens = [1, 13, 40]
    cache, table, ks, vs = _paged_setup(fmt, lens, hkv=2, bs=8)
    q = torch.randn(3, 4, 64)
    out = paged_decode_attention_ref(q, cache, table, torch.tensor(lens), fmt, softcap=30.0)
    for b in range(len(lens)):
        kd, vd = fmt.decode(fmt.encode(ks[b], vs[b]))
        exp = attention_ref(q[b : b + 1], kd, vd, softcap=30.0)[0]
        torch.testing.assert_close(out[b], exp, atol=1e-5, rtol=1e-5)
    # and it is close to exact attention: 4-bit keys and values
    exact = attention_ref(q[2:3], ks[2], vs[2])[0]
    assert ((out[2] - exact).norm() / exact.norm()).item() < 0.2


def test_extend_reference_is_causal_over_prefix_and_chunk():
    fmt = named_format("turboquant_k8v4", 64)
    prefix = [0, 9]
    chunk = [4, 3]
    cache, table, ks, vs = _paged_setup(fmt, [p + c for p, c in zip(prefix, chunk, strict=True)], hkv=1, bs=4)
    qsl = torch.tensor([0, 4, 7])
    q = torch.randn(7, 2, 64)
    k_new = torch.cat([ks[0][:4], ks[1][9:]])
    v_new = torch.cat([vs[0][:4], vs[1][9:]])
    out = paged_extend_attention_ref(q, k_new, v_new, cache, table, torch.tensor(prefix), qsl, fmt)
    kd, vd = fmt.decode(fmt.encode(ks[1][:9], vs[1][:9]))
    k_all, v_all = torch.cat([kd, ks[1][9:]]), torch.cat([vd, vs[1][9:]])
    torch.testing.assert_close(out[4:], attention_ref(q[4:], k_all, v_all), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:4], attention_ref(q[:4], ks[0], vs[0]), atol=1e-5, rtol=1e-5)


def test_query_without_visible_key_outputs_zero():
    q, k, v = torch.randn(3, 2, 8), torch.randn(4, 1, 8), torch.randn(4, 1, 8)
    # queries at positions 10..12 with a window of 2 see none of the keys 0..3
    out = attention_ref(q, k, v, q_offset=10, sliding_window=2)
    assert torch.equal(out, torch.zeros(3, 2, 8))
    out = attention_ref(q, k, v, q_offset=10, sliding_window=2, sinks=torch.zeros(2))
    assert torch.equal(out, torch.zeros(3, 2, 8))
    q[1, 0] = float("nan")  # it sees nothing, so it still outputs 0
    assert torch.equal(attention_ref(q, k, v, q_offset=10, sliding_window=2), torch.zeros(3, 2, 8))


def test_nonfinite_inputs_propagate_to_the_rows_that_see_them():
    """An all-NaN query or an infinite key used to give all-zero rows (nan_to_num); now NaN."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(n, h, 8, generator=gen) for n, h in ((4, 2), (6, 1), (6, 1)))
    clean = attention_ref(q, k, v)  # queries at positions 2..5, causal
    bad_q = q.clone()
    bad_q[1] = float("nan")
    out = attention_ref(bad_q, k, v)
    assert bool(out[1].isnan().all())
    torch.testing.assert_close(out[[0, 2, 3]], clean[[0, 2, 3]])
    for tensor, value in (
        ("k", float("inf")),
        ("k", float("-inf")),
        ("v", float("nan")),
        ("v", float("inf")),
    ):
        kk, vv = k.clone(), v.clone()
        (kk if tensor == "k" else vv)[4, 0, 3] = value  # key 4: seen by the queries at 4 and 5 only
        out = attention_ref(q, kk, vv)
        assert bool(out[2:].isnan().all()), (tensor, value)
        torch.testing.assert_close(out[:2], clean[:2])  # a masked key never leaks in (no 0 * NaN)
        windowed = attention_ref(q, kk, vv, sliding_window=1)  # each query sees only itself
        assert bool(windowed[2].isnan().all()) and bool(torch.isfinite(windowed[[0, 1, 3]]).all())
    out = attention_ref(q, k, v, sinks=torch.tensor([0.0, float("nan")]))
    assert bool(out[:, 1].isnan().all()) and bool(torch.isfinite(out[:, 0]).all())


def test_nonfinite_slot_in_a_paged_cache_shows_as_nan():
    fmt = named_format("turboquant_4bit_nc", 64)
    cache = fmt.allocate_cache(2, 4, 1)
    k, v = torch.randn(5, 1, 64), torch.randn(5, 1, 64)
    k[2, 0, 0] = float("nan")
    fmt.store_paged(cache, k, v, torch.arange(5))  # "propagate": a NaN norm for token 2
    table, seq_lens = torch.tensor([[0, 1], [0, 1]]), torch.tensor([2, 5])
    out = paged_decode_attention_ref(torch.randn(2, 2, 64), cache, table, seq_lens, fmt)
    assert bool(torch.isfinite(out[0]).all()) and bool(out[1].isnan().all())


def test_bad_input():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        attention_ref(torch.randn(1, 3, 8), torch.randn(2, 2, 8), torch.randn(2, 2, 8))
    with pytest.raises(ValueError, match="sinks must be"):
        attention_ref(torch.randn(1, 2, 8), torch.randn(2, 2, 8), torch.randn(2, 2, 8), sinks=torch.zeros(3))
    fmt = named_format("turboquant_4bit_nc", 64)
    with pytest.raises(ValueError, match="block_table must be"):
        paged_decode_attention_ref(
            torch.randn(2, 2, 64), fmt.allocate_cache(2, 4, 1), torch.zeros(1, 2), torch.tensor([1, 1]), fmt
        )


def test_mm_prefix_key_end_is_the_prefix_lm_mask():
    """Per query, the visible chunk keys of mm_prefix_mask are exactly the prefix plus j < key_end, on
    random ranges (ranges starting in the prefix, overlapping the chunk end, several per sequence)."""
    from tq_core.attention import mm_prefix_key_end, mm_prefix_mask

    g = torch.Generator().manual_seed(3)
    checked = 0
    for _ in range(40):
        batch = int(torch.randint(1, 4, (1,), generator=g))
        prefix = torch.randint(0, 20, (batch,), generator=g).tolist()
        chunk = torch.randint(0, 25, (batch,), generator=g).tolist()
        qsl = [0, *torch.tensor(chunk).cumsum(0).tolist()]
        ranges = []
        for p, c in zip(prefix, chunk, strict=True):
            cuts = sorted(torch.randint(0, p + c + 1, (4,), generator=g).tolist())
            ranges.append([(cuts[0], cuts[1]), (cuts[2] + 1, cuts[3])])  # disjoint, maybe empty
        key_end = mm_prefix_key_end(ranges, qsl, prefix)
        for b in range(batch):
            mask = mm_prefix_mask(ranges[b], prefix[b], chunk[b])
            for i in range(chunk[b]):
                end = i + 1 if key_end is None else key_end[qsl[b] + i]
                want = torch.zeros(prefix[b] + chunk[b], dtype=torch.bool)
                want[: prefix[b] + end] = True
                assert torch.equal(mask[i], want), (ranges[b], prefix[b], i)
                checked += 1
    assert checked > 200


def test_mm_prefix_key_end_none_without_look_ahead_and_bad_ranges_fail():
    from tq_core.attention import mm_prefix_key_end

    # a range inside the prefix, or one ending on the chunk's first token, needs no look-ahead
    assert mm_prefix_key_end([[(0, 4), (9, 10)]], [0, 3], [10]) is None
    assert mm_prefix_key_end([[(0, 4), (9, 12)]], [0, 3], [10]) == [3, 3, 3]
    with pytest.raises(ValueError, match="pair of ints"):
        mm_prefix_key_end([[(0.5, 3)]], [0, 3], [0])
    with pytest.raises(ValueError, match="one entry per sequence"):
        mm_prefix_key_end([[], []], [0, 3], [0])
