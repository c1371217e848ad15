"""The turboquant attention function: plain attention against tq_core's reference, the mask function,
and the decode path's kernel addressing and softmax merge (checked on CPU with the kernel replaced by the
tq_core reference)."""

from __future__ import annotations

import pytest
import torch
from _models import stored_layer

from tq_core import attention_ref
from tq_core.testing import ATTENTION_RTOL, rel_err
from tq_hf import attention, dense_attention, turboquant_mask

D, H, HKV = 64, 4, 2


def _qkv(b, t, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, H, t, D, generator=g),
        torch.randn(b, HKV, length, D, generator=g) * 2,
        torch.randn(b, HKV, length, D, generator=g),
    )


def _ref(q, k, v, **kw):
    """tq_core's attention_ref per row, in the `[B, T, H, d]` layout."""
    return torch.stack(
        [
            attention_ref(q[b].transpose(0, 1), k[b].transpose(0, 1), v[b].transpose(0, 1), **kw)
            for b in range(q.shape[0])
        ]
    )


@pytest.mark.parametrize(
    ("t", "length", "kw"),
    [
        (1, 9, {}),
        (5, 12, {}),
        (5, 5, {}),
        (3, 20, {"sliding_window": 6}),
        (1, 20, {"sliding_window": 6}),
        (4, 11, {"softcap": 5.0}),
        (2, 13, {"sinks": torch.tensor([0.5, -1.0, 2.0, 0.0])}),
    ],
    ids=["decode", "extend", "prefill", "window", "decode-window", "softcap", "sinks"],
)
def test_dense_attention_matches_reference(t, length, kw):
    q, k, v = _qkv(2, t, length)
    got = dense_attention(
        q,
        k,
        v,
        scale=D**-0.5,
        window=kw.get("sliding_window"),
        softcap=kw.get("softcap"),
        sinks=kw.get("sinks"),
    )
    want = _ref(q, k, v, scale=D**-0.5, **kw)
    assert rel_err(got, want) < 1e-5


def test_dense_attention_left_padding():
    q, k, v = _qkv(2, 3, 10)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, :4] = False
    got = dense_attention(q, k, v, scale=0.1, key_mask=mask, window=5)
    assert rel_err(got[0], _ref(q[:1], k[:1], v[:1], scale=0.1, sliding_window=5)[0]) < 1e-5
    want1 = attention_ref(
        q[1].transpose(0, 1),
        k[1, :, 4:].transpose(0, 1),
        v[1, :, 4:].transpose(0, 1),
        scale=0.1,
        sliding_window=5,
        q_offset=3,
    )
    assert rel_err(got[1], want1) < 1e-5


def test_mask_function():
    ones = torch.ones(2, 7, dtype=torch.bool)
    assert turboquant_mask(2, 1, 7, attention_mask=ones) is None
    left = ones.clone()
    left[0, :3] = False
    m = turboquant_mask(2, 1, 7, attention_mask=left.long())
    assert m.dtype == torch.bool and m.tq_pads == (3, 0) and m.tq_pads_dev.tolist() == [3, 0]
    holes = ones.clone()
    holes[1, 2] = False
    assert turboquant_mask(2, 1, 7, attention_mask=holes).tq_pads is None


# -- the decode path, with tq_kernels' decode kernel replaced by the tq_core reference --------------------
@pytest.mark.parametrize(
    ("prompt", "steps", "pads", "window"),
    [
        (40, 3, None, None),
        (40, 5, (0, 5, 13), None),
        (9, 2, (0, 6), None),
        (60, 30, None, 20),
        (60, 4, (0, 7), 20),
    ],
    ids=["plain", "left-padding", "padding-into-residual", "sliding", "sliding-padding"],
)
def test_kernel_plan_addresses_the_visible_tokens(prompt, steps, pads, window):
    layer, pads_dev = stored_layer(prompt, steps, pads=pads, window=window)
    plan = layer.decode_read(pads, pads_dev, window)
    assert plan is not None
    if plan.compressed is None:
        assert layer.n_comp <= max(pads or (0,))
        return
    table, seq_lens = plan.compressed.block_table, plan.compressed.seq_lens
    full_k, _ = layer.dequantize_compressed()  # positions [start, n_comp)
    for row in range(layer.batch_size):
        n = int(seq_lens[row])
        k, _ = layer.fmt.gather_paged(layer.slots, table[row], n)
        lo = max((pads or (0,) * 8)[row], layer.start)
        want = full_k[row, :, lo - layer.start :].transpose(0, 1)
        if window is None:
            torch.testing.assert_close(k, want)
        else:  # the kernel window reaches back window - r tokens; the plan may start earlier
            m = min(window - layer.r, n)
            torch.testing.assert_close(k[n - m :], want[want.shape[0] - m :])


def test_kernel_plan_refuses_unshifted_padding():
    layer, _ = stored_layer(40, 2, pads=None)
    layer.batch_size  # noqa: B018
    assert layer.decode_read((3,), torch.tensor([3]), None) is None


@pytest.mark.parametrize(
    ("prompt", "steps", "pads", "window", "extra"),
    [
        (40, 3, None, None, {}),
        (40, 5, (0, 5, 13), None, {}),
        (9, 2, (0, 6), None, {}),
        (60, 30, None, 20, {}),
        (60, 4, (0, 7), 20, {}),
        (40, 3, None, None, {"softcap": 3.0}),
        (40, 3, None, None, {"sinks": torch.tensor([0.5, 1.0, -1.0, 3.0])}),
        (40, 3, None, None, {"residual": 0}),
    ],
    ids=[
        "plain",
        "left-padding",
        "padding-into-residual",
        "sliding",
        "sliding-padding",
        "softcap",
        "sinks",
        "no-residual",
    ],
)
def test_fused_decode_merge_equals_dense(prompt, steps, pads, window, extra):
    residual = extra.get("residual", 8)
    layer, pads_dev = stored_layer(prompt, steps, pads=pads, window=window, residual=residual)
    b = layer.batch_size
    q = torch.randn(b, H, 1, D, generator=torch.Generator().manual_seed(7))
    plan = layer.decode_read(pads, pads_dev, window)
    got = attention._fused_decode(
        q,
        plan,
        pads,
        pads_dev,
        scale=0.2,
        window=window,
        softcap=extra.get("softcap"),
        sinks=extra.get("sinks"),
    )
    k, v = layer.dequantize()
    n = layer.cumulative_length
    mask = None
    if pads is not None:
        mask = torch.arange(n)[None, :] >= torch.tensor(pads)[:, None]
        mask = mask[:, n - k.shape[2] :]
    want = dense_attention(
        q,
        k,
        v,
        scale=0.2,
        key_mask=mask,
        window=window,
        softcap=extra.get("softcap"),
        sinks=extra.get("sinks"),
    )
    assert got.shape == (b, 1, H, D)
    # the compressed part runs tq_decode_attention, whose tensor-core operands are float16 (the kernels'
    # float32 tolerance)
    assert rel_err(got, want) < ATTENTION_RTOL[torch.float32]


def test_dense_attention_non_finite_follows_reference():
    """As tq_core's attention_ref: a NaN in a key a query sees makes that query NaN, a NaN in a key it
    cannot see changes nothing, and a query that sees no key outputs 0 (not NaN)."""
    t, length = 3, 8
    q, k, v = _qkv(2, t, length)
    clean = dense_attention(q, k, v, scale=D**-0.5)
    k[0, 0, length - 2, 5] = float("nan")  # seen by queries 1 and 2 of row 0 (causal), hidden from query 0
    v[0, 1, length - 1, 0] = float("inf")  # seen only by query 2 of row 0, kv head 1
    key_mask = torch.ones(2, length, dtype=torch.bool)
    key_mask[1] = False  # row 1 sees no key at all
    q[1, 0, 0, 0] = float("nan")  # ...so its NaN query still outputs 0
    got = dense_attention(q, k, v, scale=D**-0.5, key_mask=key_mask)  # [B, T, H, d]

    g = H // HKV
    assert got[0, 1:, :g].isnan().all()  # heads of kv head 0, queries that see the NaN key
    assert got[0, 2, g:].isnan().all()  # heads of kv head 1, the query that sees the Inf value
    assert torch.equal(got[0, 0], clean[0, 0])  # query 0 sees neither
    assert torch.equal(got[0, 1, g:], clean[0, 1, g:])
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    want0 = _ref(q[:1], k[:1], v[:1], scale=D**-0.5)[0]
    torch.testing.assert_close(got[0], want0, equal_nan=True, rtol=1e-5, atol=1e-6)
