"""The public test inputs of :mod:`tq_kernels.testing`: what they hold, and the errors they raise."""

from __future__ import annotations

import pytest
import torch

from tq_core import named_format, paged_decode_attention_ref
from tq_core.quantizers import TurboQuantMSE
from tq_core.testing import POISON_BYTE
from tq_kernels.testing import random_paged_cache, reference_on_byte_grid

FMT = named_format("turboquant_4bit_nc", 64)


def test_random_paged_cache_holds_what_it_returns():
    lens = [0, 5, 37]
    cache, table, keys, values = random_paged_cache(FMT, lens, 2, 16, seed=3, spare_blocks=2, layer=4)
    assert table.dtype == torch.int32 and tuple(table.shape) == (3, 3)
    assert tuple(cache.shape) == (3 * 3 + 2, 2, 16, FMT.slot_bytes)
    assert len(set(table.flatten().tolist())) == table.numel()  # every sequence its own blocks
    for b, n in enumerate(lens):
        assert tuple(keys[b].shape) == tuple(values[b].shape) == (n, 2, 64)
        if n:
            k, v = FMT.gather_paged(cache, table[b], n, layer=4)
            # what the reference store encodes from the returned K/V is what the cache holds
            want_k, want_v = FMT.decode(FMT.encode(keys[b], values[b], layer=4), layer=4)
            assert torch.equal(k, want_k) and torch.equal(v, want_v)
    # blocks no sequence uses keep the poison byte
    unused = sorted(set(range(cache.shape[0])) - set(table.flatten().tolist()))
    assert len(unused) == 2 and bool((cache[unused] == POISON_BYTE).all())
    again = random_paged_cache(FMT, lens, 2, 16, seed=3, spare_blocks=2, layer=4)
    assert torch.equal(again[0], cache) and torch.equal(again[1], table)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fmt": "turboquant_4bit_nc"}, "KVFormat"),
        ({"lens": []}, "non-empty"),
        ({"lens": [3, -1]}, "ints >= 0"),
        ({"num_kv_heads": 0}, "num_kv_heads"),
        ({"page": 2.0}, "page"),
        ({"spare_blocks": -1}, "spare_blocks"),
        ({"layer": True}, "layer"),
    ],
    ids=["fmt-name", "no-seqs", "negative-len", "heads-0", "page-float", "spare-negative", "layer-bool"],
)
def test_random_paged_cache_rejects_bad_inputs(kwargs, match):
    args = {"fmt": FMT, "lens": [4], "num_kv_heads": 1, "page": 16} | kwargs
    rest = {k: args.pop(k) for k in ("spare_blocks", "layer") if k in args}
    with pytest.raises(ValueError, match=match):
        random_paged_cache(args["fmt"], args["lens"], args["num_kv_heads"], args["page"], **rest)


def test_reference_on_byte_grid_moves_4bit_centroids_and_restores_them():
    cache, table, _, _ = random_paged_cache(FMT, [40], 1, 16)
    q, seq = torch.randn(1, 2, 64), torch.tensor([40], dtype=torch.int32)
    exact = paged_decode_attention_ref(q, cache, table, seq, FMT)
    original = TurboQuantMSE.centroids
    with reference_on_byte_grid(FMT):
        grid = paged_decode_attention_ref(q, cache, table, seq, FMT)
    assert TurboQuantMSE.centroids is original
    assert not torch.equal(grid, exact)  # the grid's centroids are not the exact ones
    assert float((grid - exact).norm() / exact.norm()) < 0.05  # but close: 256 levels
    assert torch.equal(paged_decode_attention_ref(q, cache, table, seq, FMT), exact)


@pytest.mark.parametrize("fmt", [None, named_format("turboquant_3bit_nc", 64)], ids=["none", "3bit"])
def test_reference_on_byte_grid_leaves_other_formats_alone(fmt):
    with reference_on_byte_grid(fmt):
        assert TurboQuantMSE.centroids.__name__ == "centroids"


def test_reference_on_byte_grid_rejects_a_format_name():
    with pytest.raises(ValueError, match="KVFormat"), reference_on_byte_grid("turboquant_4bit_nc"):  # type: ignore[arg-type]
        pass
