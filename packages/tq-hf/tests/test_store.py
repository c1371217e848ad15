"""CompressedStore, the slot layout behind every TurboQuantLayer: where each position lives, the decode
kernel's view of it (block table, lengths), growth, dropping old blocks, truncation and batch selection;
every read checked against tq_core's encode/decode round trip of the tokens stored."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from tq_core import named_format
from tq_hf._store import CompressedStore

D, HKV, C = 64, 2, 8
FMT = named_format("turboquant_4bit_nc", D)


def _kv(b: int, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, HKV, t, D, generator=g), torch.randn(b, HKV, t, D, generator=g)


def _round_trip(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tq_core's encode/decode of `[B, Hkv, T, d]`: what the store must give back."""
    kq, vq = FMT.decode(FMT.encode(k.transpose(1, 2), v.transpose(1, 2), layer=0), layer=0)
    return kq.transpose(1, 2), vq.transpose(1, 2)


def _store(b: int = 2, **kw) -> CompressedStore:
    return CompressedStore(FMT, 0, batch_size=b, num_kv_heads=HKV, chunk_tokens=C, **kw)


def _row_tokens(store: CompressedStore, row: int, table: torch.Tensor, n: int) -> torch.Tensor:
    """Keys `[n, Hkv, d]` that a paged reader of ``table`` sees in its first ``n`` slots."""
    return FMT.gather_paged(store.slots, table, n)[0]


@pytest.mark.parametrize("pads", [None, (0, 3), (5, 13)], ids=["no-padding", "pad-3", "pads-5-13"])
def test_positions_live_at_their_slots(pads):
    store = _store()
    store.set_shift(pads, None if pads is None else torch.tensor(pads))
    k, v = _kv(2, 30, 0)
    store.append(k[:, :, :17], v[:, :, :17])
    store.append(k[:, :, 17:], v[:, :, 17:])
    assert (store.start, store.end) == (0, 30)
    assert store.shift == [(-p) % C for p in pads or (0, 0)]
    assert store.capacity % C == 0 and store.capacity >= 30 + max(store.shift)
    # the mapping is the one formula: row * capacity + position - base + shift[row]
    want = torch.tensor([r * store.capacity + p + store.shift[r] for r in range(2) for p in range(4, 9)])
    assert torch.equal(store.mapping(4, 5), want)
    ek, ev = _round_trip(k, v)
    gk, gv = store.gather(torch.float32)
    torch.testing.assert_close(gk, ek, rtol=0, atol=1e-5)
    torch.testing.assert_close(gv, ev, rtol=0, atol=1e-5)
    for row, pad in enumerate(pads or (0, 0)):
        assert store.starts_block(row, pad)
        assert not store.starts_block(row, pad + 1)


@pytest.mark.parametrize("first", [(0, 0), (3, 13), (8, 1)], ids=["from-0", "from-pads", "mid-block"])
def test_paged_read_is_what_the_kernel_sees(first):
    store = _store()
    store.set_shift((3, 13), torch.tensor([3, 13]))
    k, v = _kv(2, 40, 1)
    store.append(k, v)
    read = store.paged_read(torch.tensor(first))
    assert read.slots is store.slots
    assert read.block_table.dtype == read.seq_lens.dtype == torch.int32
    assert read.block_table.shape == (2, store.chunks)
    assert read.max_seq_len >= int(read.seq_lens.max())
    ek, _ = _round_trip(k, v)
    for row in range(2):
        n = int(read.seq_lens[row])
        got = _row_tokens(store, row, read.block_table[row], n)
        # the read starts at the first slot of the block holding position first[row]
        lead = (first[row] + store.shift[row]) % C
        assert n == 40 - first[row] + lead
        torch.testing.assert_close(got[lead:], ek[row, :, first[row] :].transpose(0, 1), rtol=0, atol=1e-5)


def test_growth_keeps_the_bytes_and_reserves_headroom():
    store = _store(b=1)
    k, v = _kv(1, 300, 2)
    caps = []
    for i in range(0, 300, 3):
        store.append(k[:, :, i : i + 3], v[:, :, i : i + 3])
        caps.append(store.capacity)
    assert caps[0] == 2 * C  # the first store and one chunk more
    growths = [(a, b) for a, b in pairwise(caps) if b != a]
    # whole chunks, at least ~1/8 more each time: a reallocation (one copy) every ~R/8 tokens, not per store
    assert all(b % C == 0 and b - a >= max(C, a // 8) for a, b in growths)
    assert len(growths) < 20
    torch.testing.assert_close(store.gather(torch.float32)[0], _round_trip(k, v)[0], rtol=0, atol=1e-5)

    reserved = _store(b=1, initial_tokens=310)
    reserved.append(k[:, :, :3], v[:, :, :3])
    ptr = reserved.slots.data_ptr()
    for i in range(3, 300, 3):
        reserved.append(k[:, :, i : i + 3], v[:, :, i : i + 3])
    assert reserved.slots.data_ptr() == ptr and reserved.capacity == 312


def test_keep_from_drops_whole_old_blocks_in_place():
    store = _store(initial_tokens=4 * C)
    store.set_shift((0, 3), torch.tensor([0, 3]))
    k, v = _kv(2, 120, 3)
    for i in range(0, 120, 4):
        keep_from = max(0, i + 4 - 20)
        store.append(k[:, :, i : i + 4], v[:, :, i : i + 4], keep_from=keep_from)
        assert store.end == i + 4 and store.base % C == 0 and store.base <= store.start <= keep_from
    assert store.capacity <= 6 * C, "old blocks were not reused"
    ek, _ = _round_trip(k, v)
    torch.testing.assert_close(store.gather(torch.float32)[0], ek[:, :, store.start :], rtol=0, atol=1e-5)
    store.append(*_kv(2, 5, 4), keep_from=200)  # everything older than a future read: nothing kept
    assert (store.start, store.end, store.base) == (125, 125, 120)
    assert store.gather(torch.float32)[0].shape == (2, HKV, 0, D)


def test_truncate_select_and_version():
    store = _store(b=3)
    store.set_shift((0, 2, 5), torch.tensor([0, 2, 5]))
    k, v = _kv(3, 21, 5)
    store.append(k, v)
    versions = [store.version]
    store.truncate(12)
    versions.append(store.version)
    ek, _ = _round_trip(k, v)
    torch.testing.assert_close(store.gather(torch.float32)[0], ek[:, :, :12], rtol=0, atol=1e-5)
    store.select(torch.tensor([2, 0, 2, 1]))
    versions.append(store.version)
    assert store.batch_size == 4 and store.shift == [3, 0, 3, 6]
    torch.testing.assert_close(store.gather(torch.float32)[0], ek[[2, 0, 2, 1], :, :12], rtol=0, atol=1e-5)
    assert len(set(versions)) == 3, "a change a kernel read would see must change the version"
    with pytest.raises(ValueError, match="cannot truncate"):
        store.truncate(13)
    with pytest.raises(RuntimeError, match="before the first store"):
        store.set_shift((1, 1, 1, 1), torch.tensor([1, 1, 1, 1]))


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="backend"):
        _store(backend="cuda")
    with pytest.raises(ValueError, match="batch_size"):
        _store(b=0)
    store = _store()
    with pytest.raises(ValueError, match="pads has 3 rows"):
        store.set_shift((1, 2, 3), torch.tensor([1, 2, 3]))
    with pytest.raises(RuntimeError, match="nothing is stored"):
        store.paged_read(torch.zeros(2, dtype=torch.int64))
