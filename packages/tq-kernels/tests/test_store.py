"""``tq_store_paged`` / ``tq_store`` against the tq_core reference encoder (``KVFormat.store_paged``)."""

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
    paged_slot_bytes,
    read_paged_slots,
)

from tq_core import ComponentFormat, KVFormat, named_format
from tq_core.testing import POISON_BYTE, poisoned
from tq_kernels.ops.store import tq_store, tq_store_paged
from tq_kernels.tuning import LaunchConfig, launch_key

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _paged_inputs(
    t: int, h: int, d: int, bs: int, dtype: torch.dtype, g: torch.Generator, *, spare_blocks: int = 2
):
    """Random K/V, a poisoned cache with room to spare, and a mapping to distinct slots with one -1."""
    num_blocks = (t + bs - 1) // bs + spare_blocks
    key = (torch.randn(t, h, d, generator=g) * 3).to(dtype)
    value = torch.randn(t, h, d, generator=g).to(dtype)
    slots = torch.randperm(num_blocks * bs, generator=g)[:t]
    if t > 1:
        slots[int(torch.randint(t, (1,), generator=g))] = -1
    return key, value, num_blocks, slots


def _check_paged(
    cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor, fmt, layer: int
) -> None:
    """Written slots match the reference; every other byte of the cache still holds the poison."""
    nb, _, bs, _ = cache.shape
    keep = (slots >= 0) & (slots < nb * bs)
    written = slots[keep].long()
    assert bool((cache[~paged_slot_bytes(fmt, cache.shape, written)] == POISON_BYTE).all()), (
        "a byte outside the slots in slot_mapping changed"
    )
    ref = fmt.encode(key[keep], value[keep], layer=layer, nonfinite="propagate")
    assert_slots_match(read_paged_slots(fmt, cache, written), ref, fmt, key[keep], value[keep], layer=layer)


@pytest.mark.parametrize(
    ("t", "h", "d", "name", "bs", "dt", "layer"),
    cpu_params(),
)
def test_store_paged_matches_reference(t, h, d, name, bs, dt, layer):
    fmt = make_format(name, d)
    key, value, nb, slots = _paged_inputs(t, h, d, bs, DTYPES[dt], generator("store", t, h, d, name, bs, dt))
    cache = poisoned(fmt.cache_shape(nb, bs, h), dtype=torch.uint8)
    tq_store_paged(key, value, cache, slots, fmt, layer=layer)
    _check_paged(cache, key, value, slots, fmt, layer)


def test_store_paged_int32_mapping_equals_reference_store_paged():
    fmt = named_format("turboquant_3bit_nc", 128)
    key, value, nb, slots = _paged_inputs(9, 2, 128, 4, torch.bfloat16, generator("int32"))
    cache = poisoned(fmt.cache_shape(nb, 4, 2), dtype=torch.uint8)
    ref = cache.clone()
    tq_store_paged(key, value, cache, slots.to(torch.int32), fmt)
    fmt.store_paged(ref, key, value, slots)
    written = slots[slots >= 0]
    mine = paged_slot_bytes(fmt, cache.shape, written)
    assert torch.equal(cache[~mine], ref[~mine])
    got, want = read_paged_slots(fmt, cache, written), read_paged_slots(fmt, ref, written)
    assert_slots_match(got, want, fmt, key[slots >= 0], value[slots >= 0])


def test_store_paged_no_tokens_is_a_no_op():
    fmt = named_format("turboquant_4bit_nc", 64)
    cache = poisoned(fmt.cache_shape(1, 4, 2), dtype=torch.uint8)
    tq_store_paged(
        torch.empty(0, 2, 64), torch.empty(0, 2, 64), cache, torch.empty(0, dtype=torch.int64), fmt
    )
    assert bool((cache == POISON_BYTE).all())


def test_store_paged_strided_key_and_permuted_cache():
    """K/V as slices of a fused QKV output; the cache's first two dims permuted (heads outermost)."""
    fmt, t, h, d, bs = named_format("turboquant_4bit_nc", 64), 6, 2, 64, 4
    g = generator("strided")
    qkv = torch.randn(t, 4 * h, d, generator=g, dtype=torch.float32).to(torch.float16)
    key, value = qkv[:, 2 * h : 3 * h], qkv[:, 3 * h :]
    assert not key.is_contiguous()
    nb = 3
    cache = poisoned((h, nb, bs, fmt.slot_bytes), dtype=torch.uint8).permute(1, 0, 2, 3)
    slots = torch.tensor([5, 0, -1, 11, 2, 7])
    tq_store_paged(key, value, cache, slots, fmt)
    _check_paged(cache, key, value, slots, fmt, 0)


def test_store_paged_skips_slots_outside_the_cache():
    fmt, h, d, bs = named_format("turboquant_k8v4", 64), 2, 64, 4
    key, value = torch.randn(4, h, d), torch.randn(4, h, d)
    cache = poisoned(fmt.cache_shape(2, bs, h), dtype=torch.uint8)
    slots = torch.tensor([-1, 8, 3, -7])  # 8 == num_blocks * block_size: out of range
    tq_store_paged(key, value, cache, slots, fmt)
    _check_paged(cache, key, value, slots, fmt, 0)


@pytest.mark.parametrize("name", ["turboquant_4bit_nc", "f32norm", "bf16norm"])
def test_store_nonfinite_vectors_are_isolated(name):
    """NaN/Inf in one vector: that component gets codes 0 and a NaN scale; nothing else changes."""
    fmt, t, h, d = make_format(name, 96), 5, 3, 96
    g = generator("nonfinite", name)
    key, value = torch.randn(t, h, d, generator=g), torch.randn(t, h, d, generator=g)
    key[1, 2, 7] = float("nan")
    key[3, 0, 0] = float("inf")
    value[3, 1, 95] = float("-inf")
    slots = torch.arange(t) * 2
    cache = poisoned(fmt.cache_shape(3, 4, h), dtype=torch.uint8)
    tq_store_paged(key, value, cache, slots, fmt)
    _check_paged(cache, key, value, slots, fmt, 0)

    stored = read_paged_slots(fmt, cache, slots)
    kc, vc = fmt.decode_codes(stored)
    bad_k = ~torch.isfinite(key).all(-1)
    bad_v = ~torch.isfinite(value).all(-1)
    assert bool(kc.gamma[bad_k].isnan().all()) and not bool(kc.gamma[~bad_k].isnan().any())
    assert bool(vc.gamma[bad_v].isnan().all()) and not bool(vc.gamma[~bad_v].isnan().any())
    assert int(kc.idx[bad_k].sum()) == 0 and int(vc.idx[bad_v].sum()) == 0
    k_hat, v_hat = fmt.decode(stored)
    assert bool(torch.isfinite(k_hat[~bad_k]).all()) and bool(torch.isfinite(v_hat[~bad_v]).all())


def test_store_saturates_float16_scale_and_encodes_zero_vectors():
    """A norm past 65504 saturates (like the reference); a zero vector ties at the middle boundary 0."""
    fmt, d = named_format("turboquant_3bit_nc", 96), 96
    key = torch.randn(3, 1, d, generator=generator("saturate"))
    key[0] *= 1e5
    key[1] = 0.0
    value = torch.zeros(3, 1, d)
    out = poisoned((3, 1, fmt.slot_bytes), dtype=torch.uint8)
    tq_store(key, value, out, fmt)
    ref = fmt.encode(key, value, nonfinite="propagate")
    assert_slots_match(out, ref, fmt, key, value)
    kc, vc = fmt.decode_codes(out)
    assert float(kc.gamma[0, 0]) == 65504.0
    assert float(kc.gamma[1, 0]) == 0.0 and float(vc.gamma.abs().max()) == 0.0
    assert torch.equal(kc.idx[1], fmt.decode_codes(ref)[0].idx[1])


@pytest.mark.parametrize(
    ("shape", "name", "dt"),
    [
        ((1, 64), "turboquant_k8v4", "fp32"),
        pytest.param((2, 3, 5, 64), "rawnorm", "bf16", marks=SLOW_FORMATS["rawnorm"]),
        ((4, 2, 96), "f32norm", "fp16"),
    ],
    ids=["N1-D64-turboquant_k8v4-fp32", "B2-H3-T5-D64-rawnorm-bf16", "B4-H2-D96-f32norm-fp16"],
)
def test_store_contiguous_matches_encode(shape, name, dt):
    fmt = make_format(name, shape[-1])
    g = generator("contiguous", shape, name)
    key = torch.randn(shape, generator=g).to(DTYPES[dt])
    value = (torch.randn(shape, generator=g) * 0.1).to(DTYPES[dt])
    out = poisoned((*shape[:-1], fmt.slot_bytes), dtype=torch.uint8)
    assert tq_store(key, value, out, fmt, layer=1) is out
    assert_slots_match(out, fmt.encode(key, value, layer=1), fmt, key, value, layer=1)


@pytest.mark.parametrize(("block_n", "num_warps"), [(32, 4), (64, 8)])
def test_store_paged_launch_config_writes_the_same_slots(block_n, num_warps):
    """A launch configuration other than the tuned one (the benchmark's sweep) changes how rows are
    split between programs, not what is written: 40 tokens x 2 heads leave the last program partial."""
    fmt, t, h, d, bs = named_format("turboquant_4bit_nc", 64), 40, 2, 64, 16
    key, value, nb, slots = _paged_inputs(t, h, d, bs, torch.float32, generator("config", block_n, num_warps))
    cache = poisoned(fmt.cache_shape(nb, bs, h), dtype=torch.uint8)
    tq_store_paged(key, value, cache, slots, fmt, layer=1, config=LaunchConfig(block_n, num_warps, 1))
    _check_paged(cache, key, value, slots, fmt, 1)
    tuned = poisoned(fmt.cache_shape(nb, bs, h), dtype=torch.uint8)
    tq_store_paged(key, value, tuned, slots, fmt, layer=1)
    assert torch.equal(cache, tuned)


def test_store_rotation_depends_on_layer():
    fmt = named_format("turboquant_4bit_nc", 64)
    key = value = torch.randn(2, 64, generator=generator("layer"))
    a = tq_store(key, value, torch.empty(2, fmt.slot_bytes, dtype=torch.uint8), fmt, layer=0)
    b = tq_store(key, value, torch.empty(2, fmt.slot_bytes, dtype=torch.uint8), fmt, layer=1)
    assert not torch.equal(a, b)


# -- validation ------------------------------------------------------------------------------------
def _valid_args():
    fmt = named_format("turboquant_4bit_nc", 64)
    return {
        "key": torch.randn(3, 2, 64),
        "value": torch.randn(3, 2, 64),
        "cache": poisoned(fmt.cache_shape(2, 4, 2), dtype=torch.uint8),
        "slot_mapping": torch.tensor([0, 1, -1]),
        "fmt": fmt,
    }


BAD = {
    "key-float64": ({"key": torch.randn(3, 2, 64, dtype=torch.float64)}, "key must have dtype"),
    "key-int": ({"key": torch.ones(3, 2, 64, dtype=torch.int32)}, "key must have dtype"),
    "value-shape": ({"value": torch.randn(3, 2, 32)}, "same shape"),
    "head-dim": ({"key": torch.randn(3, 2, 32), "value": torch.randn(3, 2, 32)}, "head_dim=64"),
    "key-last-dim-strided": ({"key": torch.randn(3, 2, 128)[..., ::2]}, "contiguous in its last dimension"),
    "num-heads": ({"key": torch.randn(3, 1, 64), "value": torch.randn(3, 1, 64)}, "num_kv_heads=2"),
    "cache-dtype": ({"cache": torch.zeros(2, 4, 2, 70, dtype=torch.int8)}, "cache must have dtype uint8"),
    "cache-slot-bytes": (
        {"cache": torch.zeros(2, 4, 2, 64, dtype=torch.uint8)},
        "64 bytes per slot .* slot_bytes=70",
    ),
    "cache-region-strided": (
        {"cache": torch.zeros(2, 4, 2, 70, dtype=torch.uint8).permute(0, 2, 1, 3)},
        "region of the cache must be contiguous",
    ),
    "cache-3d": ({"cache": torch.zeros(8, 2, 70, dtype=torch.uint8)}, "num_blocks, num_kv_heads, block_size"),
    "slots-length": ({"slot_mapping": torch.tensor([0, 1])}, r"num_tokens=3"),
    "slots-float": (
        {"slot_mapping": torch.tensor([0.0, 1.0, 2.0])},
        "slot_mapping must have dtype int32, int64",
    ),
    "slots-2d": ({"slot_mapping": torch.tensor([[0, 1, 2]])}, "1-D"),
    "device-mismatch": ({"slot_mapping": torch.zeros(3, dtype=torch.int64, device="meta")}, "one device"),
    "fmt": ({"fmt": "turboquant_4bit_nc"}, "KVFormat"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_store_paged_rejects_bad_inputs(case):
    args = _valid_args()
    change, match = BAD[case]
    args |= change
    before = args["cache"].clone()
    with pytest.raises(ValueError, match=match):
        tq_store_paged(args["key"], args["value"], args["cache"], args["slot_mapping"], args["fmt"])
    assert torch.equal(args["cache"], before)


@pytest.mark.parametrize(
    ("fmt", "match"),
    [
        (KVFormat(64, ComponentFormat(3, 16), ComponentFormat(3)), "hi_bits_coords=16"),
        (KVFormat(36, ComponentFormat(4), ComponentFormat(4)), "multiple of 8"),
    ],
    ids=["hi-bits-coords", "head-dim-36"],
)
def test_store_rejects_formats_the_kernels_do_not_support(fmt, match):
    k = torch.randn(2, 1, fmt.head_dim)
    out = poisoned((2, 1, fmt.slot_bytes), dtype=torch.uint8)
    with pytest.raises(ValueError, match=match):
        tq_store(k, k, out, fmt)
    assert bool((out == POISON_BYTE).all())


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (LaunchConfig(8, 4, 1), "power of two >= 16"),
        (LaunchConfig(48, 4, 1), "power of two >= 16"),
        (LaunchConfig(16, 0, 1), "num_warps and num_stages must be >= 1"),
        ((16, 4, 1), "LaunchConfig or None"),
    ],
    ids=["block-8", "block-48", "warps-0", "tuple"],
)
def test_store_paged_rejects_bad_launch_configs(config, match):
    a = _valid_args()
    before = a["cache"].clone()
    with pytest.raises(ValueError, match=match):
        tq_store_paged(a["key"], a["value"], a["cache"], a["slot_mapping"], a["fmt"], config=config)
    assert torch.equal(a["cache"], before)


def test_store_paged_rejects_negative_layer():
    a = _valid_args()
    with pytest.raises(ValueError, match="layer must be"):
        tq_store_paged(a["key"], a["value"], a["cache"], a["slot_mapping"], a["fmt"], layer=-1)


def test_store_rejects_bad_out():
    fmt = named_format("turboquant_4bit_nc", 64)
    k = torch.randn(2, 3, 64)
    with pytest.raises(ValueError, match=r"out must be uint8 \(2, 3, 70\)"):
        tq_store(k, k, torch.empty(2, 3, 50, dtype=torch.uint8), fmt)
    with pytest.raises(ValueError, match="contiguous"):
        tq_store(k, k, torch.empty(3, 2, 70, dtype=torch.uint8).transpose(0, 1), fmt)


def test_cpu_without_interpreter_is_rejected(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    a = _valid_args()
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        tq_store_paged(a["key"], a["value"], a["cache"], a["slot_mapping"], a["fmt"])


# -- custom op -------------------------------------------------------------------------------------
def test_store_custom_ops_pass_opcheck():
    from tq_kernels.ops._registry import format_key

    a = _valid_args()
    key = format_key(a["fmt"])
    torch.library.opcheck(
        torch.ops.tq.store_paged.default, (a["key"], a["value"], a["cache"], a["slot_mapping"], key, 0)
    )
    launch = launch_key(LaunchConfig(32, 4, 1))
    torch.library.opcheck(
        torch.ops.tq.store_paged.default,
        (a["key"], a["value"], a["cache"], a["slot_mapping"], key, 0, launch),
    )
    out = torch.empty(3, 2, a["fmt"].slot_bytes, dtype=torch.uint8)
    torch.library.opcheck(torch.ops.tq.store.default, (a["key"], a["value"], out, key, 0))


def test_store_paged_compiles_into_one_graph():
    a = _valid_args()
    fmt = a["fmt"]

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(k, v, cache, slots):
        tq_store_paged(k * 2, v, cache, slots, fmt)
        return cache.sum(dtype=torch.int64)

    ref = a["cache"].clone()
    step(a["key"], a["value"], a["cache"], a["slot_mapping"])
    tq_store_paged(a["key"] * 2, a["value"], ref, a["slot_mapping"], fmt)
    assert torch.equal(a["cache"], ref)


# -- GPU -------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_store_paged_gpu_large(name):
    fmt, t, h, d, bs = make_format(name, 128), 4096, 8, 128, 16
    g = generator("gpu-store", name)
    key, value, nb, slots = _paged_inputs(t, h, d, bs, torch.bfloat16, g, spare_blocks=8)
    key, value, slots = key.cuda(), value.cuda(), slots.cuda()
    key[7, 3, 5] = float("nan")
    cache = poisoned(fmt.cache_shape(nb, bs, h), dtype=torch.uint8, device="cuda")
    tq_store_paged(key, value, cache, slots, fmt, layer=3)
    torch.cuda.synchronize()
    _check_paged(cache.cpu(), key.cpu(), value.cpu(), slots.cpu(), fmt, 3)


@pytest.mark.gpu
@pytest.mark.parametrize(("block_n", "num_warps"), [(16, 8), (32, 4), (64, 8)])
@pytest.mark.parametrize("name", ["turboquant_4bit_nc", "turboquant_k8v4"])
def test_store_gpu_launch_configs(name, block_n, num_warps):
    """The store launches the benchmark times (tq_kernels.tuning.store_config candidates) write the same
    slots as the reference, at a decode step's size (40 tokens, partial last program)."""
    fmt, t, h, d, bs = make_format(name, 128), 40, 8, 128, 16
    g = generator("gpu-store-config", name, block_n, num_warps)
    key, value, nb, slots = _paged_inputs(t, h, d, bs, torch.bfloat16, g, spare_blocks=8)
    key, value, slots = key.cuda(), value.cuda(), slots.cuda()
    cache = poisoned(fmt.cache_shape(nb, bs, h), dtype=torch.uint8, device="cuda")
    tq_store_paged(key, value, cache, slots, fmt, layer=2, config=LaunchConfig(block_n, num_warps, 1))
    torch.cuda.synchronize()
    _check_paged(cache.cpu(), key.cpu(), value.cpu(), slots.cpu(), fmt, 2)
