import pytest
import torch

from tq_core import (
    NORM_RANGE,
    PRESET_NAMES_NOTE,
    ComponentFormat,
    KVFormat,
    budget_bytes,
    format_names,
    named_format,
    vllm_layout,
)

BUDGETS_128 = {
    "turboquant_k8v4": 196,
    "turboquant_4bit_nc": 134,
    "turboquant_k3v4_nc": 118,
    "turboquant_3bit_nc": 102,
}


@pytest.mark.parametrize(("name", "budget"), BUDGETS_128.items())
def test_vllm_budgets_at_128(name, budget):
    assert budget_bytes(name, 128) == budget
    fmt = named_format(name, 128)
    assert fmt.slot_bytes == budget
    assert fmt.used_bytes <= budget


def test_names_are_vllms_and_say_so():
    # The names describe vLLM's layouts: under turboquant_k8v4 vLLM stores fp8 keys and 4-bit values,
    # tq stores 6-bit keys and values in the same bytes. The note every user-facing listing prints says so.
    assert [vllm_layout(n) for n in format_names()] == [
        "K fp8, V 4 bit uniform",
        "K 4 bit Lloyd-Max, V 4 bit uniform",
        "K 3 bit Lloyd-Max, V 4 bit uniform",
        "K 3 bit Lloyd-Max, V 3 bit uniform",
    ]
    fmt = named_format("turboquant_k8v4", 128)
    assert (fmt.key.bits, fmt.value.bits) == (6, 6)
    assert "vLLM's own layouts" in PRESET_NAMES_NOTE and vllm_layout("turboquant_k8v4") in PRESET_NAMES_NOTE


@pytest.mark.parametrize("name", format_names())
@pytest.mark.parametrize("d", [64, 80, 96, 128, 256])
def test_named_formats_fit_every_head_dim(name, d):
    fmt = named_format(name, d)
    assert fmt.used_bytes <= fmt.slot_bytes == budget_bytes(name, d)
    assert fmt.key_norm_offset % fmt.key.norm_bytes == 0
    assert fmt.value_norm_offset % fmt.value.norm_bytes == 0
    assert fmt.value_code_offset == fmt.key.code_bytes(d)


@pytest.mark.parametrize("name", format_names())
def test_encode_decode_matches_quantizers(name):
    fmt = named_format(name, 128)
    k, v = torch.randn(9, 4, 128) * 3, torch.randn(9, 4, 128)
    slots = fmt.encode(k, v, layer=2)
    assert slots.shape == (9, 4, fmt.slot_bytes) and slots.dtype == torch.uint8
    assert bool((slots[..., fmt.used_bytes :] == 0).all())  # padding stays zero
    kd, vd = fmt.decode(slots, layer=2)
    qk, qv = fmt.quantizers(2)
    # exact up to the norm's storage dtype
    torch.testing.assert_close(kd, qk.dequantize(qk.quantize(k)), rtol=2e-3, atol=1e-3)
    torch.testing.assert_close(vd, qv.dequantize(qv.quantize(v)), rtol=2e-3, atol=1e-3)
    kc, _ = fmt.decode_codes(slots)
    assert torch.equal(kc.idx, qk.quantize(k).idx)


def test_layers_use_different_rotations():
    fmt = named_format("turboquant_4bit_nc", 128)
    assert not torch.equal(fmt.rotation_matrix(0), fmt.rotation_matrix(1))
    k = torch.randn(3, 1, 128)
    assert not torch.equal(fmt.encode(k, k, layer=0), fmt.encode(k, k, layer=1))


def test_store_and_gather_paged_with_skips():
    fmt = named_format("turboquant_3bit_nc", 128)
    cache = fmt.allocate_cache(6, 4, 2)
    k, v = torch.randn(5, 2, 128), torch.randn(5, 2, 128)
    slots = torch.tensor([3, -1, 9, 10, 20])
    fmt.store_paged(cache, k, v, slots)
    # blocks 1 and 3 got no token: their regions stay untouched, and so do unwritten rows elsewhere
    assert bool((cache[[1, 3]] == 0).all())
    assert int((cache != 0).sum()) <= 4 * 2 * fmt.slot_bytes
    k2, _ = fmt.gather_paged(cache, torch.tensor([0, 2, 5]), 12)  # tokens 0..11 -> slots 0..3, 8..11, 20..23
    exp_k, _ = fmt.decode(fmt.encode(k, v))
    torch.testing.assert_close(k2[3], exp_k[0])
    torch.testing.assert_close(k2[5], exp_k[2])
    torch.testing.assert_close(k2[8], exp_k[4])


def test_nonfinite_vector_only_poisons_its_own_slot():
    fmt = named_format("turboquant_4bit_nc", 64)
    cache = fmt.allocate_cache(2, 4, 1)
    k, v = torch.randn(3, 1, 64), torch.randn(3, 1, 64)
    k[1, 0, 3] = float("nan")
    fmt.store_paged(cache, k, v, torch.tensor([0, 1, 2]))
    kd, vd = fmt.gather_paged(cache, torch.tensor([0]), 3)
    assert bool(kd[1].isnan().all())
    assert bool(torch.isfinite(kd[[0, 2]]).all()) and bool(torch.isfinite(vd).all())


def _with_norm(norm: float, d: int = 64) -> torch.Tensor:
    x = torch.randn(2, d, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return (x / x.norm(dim=-1, keepdim=True) * norm).to(torch.float32)


def test_norm_range_is_what_each_norm_dtype_stores():
    assert NORM_RANGE["float16"] == (2.0**-24, 65504.0)
    for name, (tiny, top) in NORM_RANGE.items():
        dt = ComponentFormat(4, norm_dtype=name).torch_norm_dtype  # type: ignore[arg-type]
        assert torch.tensor(top).to(dt).item() == top and torch.tensor(tiny).to(dt).item() == tiny
        assert torch.tensor(tiny / 4).to(dt).item() == 0.0


@pytest.mark.parametrize(
    ("norm", "why"),
    [
        (1.13e5, r"2 vector\(s\) whose stored norm .* exceeds 65504"),
        (1e30, r"2 finite vector\(s\) .* overflows float32"),
    ],
)
def test_encode_raises_on_norms_float16_cannot_hold(norm, why):
    """1.13e5 used to decode as 6.07e4 (gamma clamped to 65504, times ||c|| < 1) and 1e30 as 8376
    (the float32 norm overflowed: direction lost, then clamped); both now raise and say what to do."""
    fmt = named_format("turboquant_3bit_nc", 64)
    ok, big = _with_norm(1.0), _with_norm(norm)
    with pytest.raises(ValueError, match=rf"^k has {why}.*scale"):
        fmt.encode(big, ok)
    with pytest.raises(ValueError, match=rf"^v has {why}.*scale"):
        fmt.encode(ok, big)


def test_encode_accepts_norms_up_to_the_limit_and_keeps_them():
    fmt = named_format("turboquant_4bit_nc", 64)
    x = _with_norm(6e4)  # gamma = ||x|| / ||c[codes]|| stays below 65504
    kd, _ = fmt.decode(fmt.encode(x, x))
    torch.testing.assert_close(kd.norm(dim=-1), x.norm(dim=-1), rtol=1e-3, atol=0)
    # bfloat16 norms hold far more (at 3 significant digits)
    wide = KVFormat(64, ComponentFormat(4, norm_dtype="bfloat16"), ComponentFormat(4))
    kd, _ = wide.decode(wide.encode(_with_norm(1e12), x))
    torch.testing.assert_close(kd.norm(dim=-1), torch.full((2,), 1e12), rtol=1e-2, atol=0)


def test_propagate_saturates_float16_norms_like_the_kernels():
    fmt = KVFormat(64, ComponentFormat(4), ComponentFormat(4))
    k = torch.full((1, 64), 1e5)
    kc, _ = fmt.decode_codes(fmt.encode(k, k, nonfinite="propagate"))
    assert float(kc.gamma[0]) == NORM_RANGE["float16"][1]
    kd, _ = fmt.decode(fmt.encode(k, k, nonfinite="propagate"))
    assert bool(torch.isfinite(kd).all())


def test_tiny_norms_flush_to_zero_vectors():
    fmt = named_format("turboquant_4bit_nc", 64)
    for norm in (1e-30, NORM_RANGE["float16"][0] / 4, 0.0):
        kd, vd = fmt.decode(fmt.encode(_with_norm(norm), torch.zeros(2, 64)))
        assert torch.equal(kd, torch.zeros(2, 64)) and torch.equal(vd, torch.zeros(2, 64))
    kd, _ = fmt.decode(fmt.encode(_with_norm(1e-3), torch.zeros(2, 64)))  # normal float16: kept
    torch.testing.assert_close(kd.norm(dim=-1), torch.full((2,), 1e-3), rtol=1e-3, atol=0)


def test_budget_overflow_is_rejected():
    with pytest.raises(ValueError, match=r"needs 196 bytes .* budget is 134"):
        KVFormat(128, ComponentFormat(6), ComponentFormat(6), slot_bytes=134, name="too-big")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: named_format("turboquant_9bit"), "unknown format"),
        (lambda: budget_bytes("fp8", 128), "unknown preset"),
        (lambda: ComponentFormat(4, hi_bits_coords=12), "multiple of 8"),
        (lambda: ComponentFormat(4, norm_dtype="int8"), "norm_dtype"),  # type: ignore[arg-type]
        (lambda: ComponentFormat(4, hi_bits_coords=8.0), "hi_bits_coords must be an integer"),  # type: ignore[arg-type]
        (lambda: ComponentFormat(4, norm_correction="no"), "norm_correction"),  # type: ignore[arg-type]
        (lambda: KVFormat(64, ComponentFormat(4), ComponentFormat(4), seed=1.5), "seed must be"),  # type: ignore[arg-type]
        (lambda: KVFormat(64, ComponentFormat(4), 4), "value must be a ComponentFormat"),  # type: ignore[arg-type]
        (lambda: named_format(["turboquant_4bit_nc"]), "unknown format"),  # type: ignore[arg-type]
        (lambda: named_format("turboquant_4bit_nc", [128]), "head_dim must be"),  # type: ignore[arg-type]
        (lambda: named_format("turboquant_4bit_nc", seed="a"), "seed must be"),  # type: ignore[arg-type]
        (lambda: named_format("turboquant_4bit_nc", rotation="dct"), "rotation must be"),  # type: ignore[arg-type]
        (lambda: budget_bytes(["fp8"], 128), "unknown preset"),  # type: ignore[arg-type]
        (lambda: vllm_layout("fp8"), "unknown preset"),
        (
            lambda: named_format("turboquant_4bit_nc").encode(torch.randn(2, 128), torch.randn(3, 128)),
            "same shape",
        ),
        (
            lambda: named_format("turboquant_4bit_nc").decode(torch.zeros(2, 100, dtype=torch.uint8)),
            "last dimension 134",
        ),
        (
            lambda: named_format("turboquant_4bit_nc").store_paged(
                torch.zeros(2, 1, 4, 134, dtype=torch.uint8),
                torch.randn(1, 1, 128),
                torch.randn(1, 1, 128),
                torch.tensor([8]),
            ),
            "slot_mapping entries",
        ),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_region_layout_round_trips_every_byte():
    # the region map is a bijection: every byte of every encoded slot lands somewhere unique
    from tq_core.formats import _region_map

    for name in format_names():
        for bs in (1, 3, 16):
            fmt = named_format(name, 96)
            m = _region_map(fmt, bs, "cpu")
            assert m.unique().numel() == m.numel() and int(m.max()) < bs * fmt.slot_bytes
            kc, vc, kn, vn = fmt.region_offsets(bs)
            assert kc == 0 and vc == bs * fmt.key.code_bytes(96) and kn % 2 == 0 and vn % 2 == 0


def test_region_codes_are_contiguous_rows():
    fmt = named_format("turboquant_4bit_nc", 128)
    cache = fmt.allocate_cache(1, 16, 1)
    k, v = torch.randn(16, 1, 128), torch.randn(16, 1, 128)
    fmt.store_paged(cache, k, v, torch.arange(16))
    slots = fmt.encode(k, v)
    region = cache[0, 0].reshape(-1)
    assert torch.equal(region[: 16 * 64].view(16, 64), slots[:, 0, :64])  # K code rows back to back
    assert torch.equal(region[16 * 64 : 32 * 64].view(16, 64), slots[:, 0, 64:128])
