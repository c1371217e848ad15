"""``tq_dequantize_paged`` / ``tq_dequantize`` against the tq_core reference decoder (``KVFormat.decode``)."""

from __future__ import annotations

import pytest
import torch
from _slot_cases import (
    FORMAT_NAMES,
    SLOW_FORMATS,
    assert_slots_match,
    cpu_params,
    generator,
    make_format,
    read_paged_slots,
)

from tq_core import named_format
from tq_core.testing import DEQUANT_RTOL, poisoned, rel_err
from tq_kernels.ops.dequant import tq_dequantize, tq_dequantize_paged
from tq_kernels.ops.store import tq_store_paged

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _filled_cache(
    fmt, nb: int, bs: int, h: int, g: torch.Generator, *, layer: int = 0, nan: bool = True
) -> torch.Tensor:
    """A cache with every slot written by the reference; with ``nan`` one key vector holds a NaN."""
    d = fmt.head_dim
    key = torch.randn(nb * bs, h, d, generator=g) * 3
    value = torch.randn(nb * bs, h, d, generator=g)
    if nan:
        key[min(2, nb * bs - 1), h - 1, d // 2] = float("nan")
    cache = poisoned(fmt.cache_shape(nb, bs, h), dtype=torch.uint8)
    fmt.store_paged(cache, key, value, torch.arange(nb * bs), layer=layer)
    return cache


def _reference(cache: torch.Tensor, slots: torch.Tensor, fmt, layer: int):
    k, v = fmt.decode(read_paged_slots(fmt, cache, slots.long().clamp_min(0)), layer=layer)
    k[slots < 0], v[slots < 0] = 0.0, 0.0
    return k, v


def _assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype and got.shape == want.shape
    want = want.to(dtype)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan), "NaN positions differ"
    err = rel_err(got[~nan], want[~nan], dtype=torch.float64)
    assert err < DEQUANT_RTOL[dtype], f"relative RMS {err:.3g}"


@pytest.mark.parametrize(
    ("t", "h", "d", "name", "bs", "dt", "layer"),
    cpu_params(),
)
def test_dequantize_paged_matches_reference(t, h, d, name, bs, dt, layer):
    fmt = make_format(name, d)
    g = generator("dequant", t, h, d, name, bs, dt)
    nb = (t + bs - 1) // bs + 1
    cache = _filled_cache(fmt, nb, bs, h, g, layer=layer)
    slots = torch.randint(0, nb * bs, (t,), generator=g)  # any order, repeats allowed
    slots[0] = 2  # the slot holding a NaN key vector
    if t > 2:
        slots[-1] = -1
    key, value = tq_dequantize_paged(cache, slots, fmt, layer=layer, dtype=DTYPES[dt])
    ref_k, ref_v = _reference(cache, slots, fmt, layer)
    _assert_close(key, ref_k, DTYPES[dt])
    _assert_close(value, ref_v, DTYPES[dt])
    assert bool((key[slots < 0] == 0).all()) and bool((value[slots < 0] == 0).all())


def test_dequantize_paged_outside_slots_give_zeros_and_strided_cache():
    fmt, h, bs = named_format("turboquant_k3v4_nc", 80), 2, 4
    g = generator("strided-dequant")
    dense = _filled_cache(fmt, 3, bs, h, g)
    # the same bytes with heads outermost: other strides on the first two dims
    cache = dense.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    slots = torch.tensor([11, -1, 12, 0, -5, 4], dtype=torch.int32)
    key, value = tq_dequantize_paged(cache, slots, fmt, dtype=torch.float32)
    ref_k, ref_v = _reference(dense, torch.where(slots < 12, slots, -1), fmt, 0)
    _assert_close(key, ref_k, torch.float32)
    _assert_close(value, ref_v, torch.float32)


@pytest.mark.parametrize(
    ("shape", "name", "dt"),
    [
        pytest.param((1,), "turboquant_k8v4", "fp32", id="N1-D64-turboquant_k8v4-fp32"),
        pytest.param(
            (2, 3, 5), "rawnorm", "bf16", id="B2-H3-T5-D64-rawnorm-bf16", marks=SLOW_FORMATS["rawnorm"]
        ),
        pytest.param((4, 2), "bf16norm", "fp16", id="B4-H2-D64-bf16norm-fp16"),
    ],
)
def test_dequantize_contiguous_matches_decode(shape, name, dt):
    fmt = make_format(name, 64)
    g = generator("contiguous-dequant", shape, name)
    slots = fmt.encode(torch.randn(*shape, 64, generator=g), torch.randn(*shape, 64, generator=g), layer=2)
    key, value = tq_dequantize(slots, fmt, layer=2, dtype=DTYPES[dt])
    ref_k, ref_v = fmt.decode(slots, layer=2)
    _assert_close(key, ref_k, DTYPES[dt])
    _assert_close(value, ref_v, DTYPES[dt])


@pytest.mark.parametrize("name", ["turboquant_4bit_nc", "f32norm"])
def test_store_then_dequantize_round_trip(name):
    """Both kernels end to end equal the reference encode -> decode (up to boundary ties)."""
    fmt, t, h, d, bs = make_format(name, 96), 6, 2, 96, 4
    g = generator("round-trip", name)
    key, value = torch.randn(t, h, d, generator=g), torch.randn(t, h, d, generator=g)
    slots = torch.randperm(3 * bs, generator=g)[:t]
    cache = poisoned(fmt.cache_shape(3, bs, h), dtype=torch.uint8)
    tq_store_paged(key, value, cache, slots, fmt)
    k_hat, v_hat = tq_dequantize_paged(cache, slots, fmt, dtype=torch.float32)
    ref = fmt.encode(key, value)
    identical = assert_slots_match(read_paged_slots(fmt, cache, slots), ref, fmt, key, value).view(t, h)
    ref_k, ref_v = fmt.decode(ref)
    # vectors whose slot differs (a boundary tie, a scale rounded the other way) are covered above
    assert rel_err(k_hat[identical], ref_k[identical], dtype=torch.float64) < DEQUANT_RTOL[torch.float32]
    assert rel_err(v_hat[identical], ref_v[identical], dtype=torch.float64) < DEQUANT_RTOL[torch.float32]
    # a quantizer's error (2-bit keys: ~0.34), not garbage
    assert 0.01 < rel_err(k_hat, key, dtype=torch.float64) < 0.5


def test_dequantize_no_tokens():
    fmt = named_format("turboquant_4bit_nc", 64)
    key, value = tq_dequantize_paged(fmt.allocate_cache(1, 4, 2), torch.empty(0, dtype=torch.int64), fmt)
    assert key.shape == value.shape == (0, 2, 64)


# -- validation ------------------------------------------------------------------------------------
BAD = {
    "cache-dtype": ({"cache": torch.zeros(2, 4, 2, 70, dtype=torch.int8)}, "cache must have dtype uint8"),
    "cache-slot-bytes": (
        {"cache": torch.zeros(2, 4, 2, 69, dtype=torch.uint8)},
        "69 bytes per slot .* slot_bytes=70",
    ),
    "cache-last-dim-strided": (
        {"cache": torch.zeros(2, 4, 2, 140, dtype=torch.uint8)[..., ::2]},
        "contiguous",
    ),
    "slots-float": ({"slot_mapping": torch.tensor([0.0, 1.0])}, "slot_mapping must have dtype int32, int64"),
    "slots-2d": ({"slot_mapping": torch.tensor([[0, 1]])}, "1-D"),
    "device-mismatch": ({"slot_mapping": torch.zeros(2, dtype=torch.int64, device="meta")}, "one device"),
    "dtype": ({"dtype": torch.int32}, "dtype must be one of"),
    "fmt": ({"fmt": object()}, "KVFormat"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_dequantize_paged_rejects_bad_inputs(case):
    fmt = named_format("turboquant_4bit_nc", 64)
    args = {
        "cache": fmt.allocate_cache(2, 4, 2),
        "slot_mapping": torch.tensor([0, 3]),
        "fmt": fmt,
        "dtype": torch.bfloat16,
    }
    change, match = BAD[case]
    args |= change
    with pytest.raises(ValueError, match=match):
        tq_dequantize_paged(args["cache"], args["slot_mapping"], args["fmt"], dtype=args["dtype"])


def test_dequantize_rejects_bad_slots():
    fmt = named_format("turboquant_4bit_nc", 64)
    with pytest.raises(ValueError, match=r"slots must be uint8 \[..., slot_bytes=70\]"):
        tq_dequantize(torch.zeros(3, 71, dtype=torch.uint8), fmt)
    with pytest.raises(ValueError, match="slots must have dtype uint8"):
        tq_dequantize(torch.zeros(3, 70), fmt)
    with pytest.raises(ValueError, match="layer must be"):
        tq_dequantize(torch.zeros(3, 70, dtype=torch.uint8), fmt, layer=-2)


# -- custom op -------------------------------------------------------------------------------------
def test_dequantize_custom_ops_pass_opcheck():
    from tq_kernels.ops._registry import format_key

    fmt = named_format("turboquant_3bit_nc", 64)
    cache = _filled_cache(fmt, 2, 4, 2, generator("opcheck"), nan=False)  # opcheck compares NaN != NaN
    key = format_key(fmt)
    torch.library.opcheck(
        torch.ops.tq.dequantize_paged.default, (cache, torch.tensor([0, 5, -1]), key, 0, torch.float32)
    )
    slots = fmt.encode(torch.randn(2, 3, 64), torch.randn(2, 3, 64))
    torch.library.opcheck(torch.ops.tq.dequantize.default, (slots, key, 0, torch.bfloat16))


def test_dequantize_paged_compiles_into_one_graph():
    fmt = named_format("turboquant_4bit_nc", 64)
    cache = _filled_cache(fmt, 2, 4, 2, generator("compile-dequant"))
    slots = torch.tensor([1, 0, 7])

    @torch.compile(backend="aot_eager", fullgraph=True)
    def gather(cache, slots):
        k, v = tq_dequantize_paged(cache, slots, fmt, dtype=torch.float32)
        return k.nan_to_num() + v

    k, v = tq_dequantize_paged(cache, slots, fmt, dtype=torch.float32)
    assert torch.equal(gather(cache, slots), k.nan_to_num() + v)


# -- GPU -------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize(("name", "d"), [*((n, 128) for n in FORMAT_NAMES), ("turboquant_4bit_nc", 256)])
def test_dequantize_paged_gpu_large(name, d):
    # head_dim 256 failed on the H100 (2026-12-06) before the rotation went in column blocks: the
    # whole float32 rotation needs 256 KiB of shared memory
    fmt, t, h, bs = make_format(name, d), 4096, 8, 16
    g = generator("gpu-dequant", name)
    cache = _filled_cache(fmt, t // bs + 4, bs, h, g, layer=3)
    slots = torch.randperm(cache.shape[0] * bs, generator=g)[:t]
    slots[::97] = -1
    key, value = tq_dequantize_paged(cache.cuda(), slots.cuda(), fmt, layer=3, dtype=torch.bfloat16)
    ref_k, ref_v = _reference(cache, slots, fmt, 3)
    _assert_close(key.cpu(), ref_k, torch.bfloat16)
    _assert_close(value.cpu(), ref_v, torch.bfloat16)
    key32, _ = tq_dequantize_paged(cache.cuda(), slots.cuda(), fmt, layer=3, dtype=torch.float32)
    _assert_close(key32.cpu(), ref_k, torch.float32)
