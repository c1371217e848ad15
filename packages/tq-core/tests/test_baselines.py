"""tq_core.baselines: min-max round-to-nearest, the KIVI-style uniform K/V baseline built from it, and the
vLLM-like baseline (Hadamard + Lloyd-Max keys, per-token min/max values) with fp8 rounding."""

from __future__ import annotations

import pytest
import torch

from tq_core import budget_bytes, named_format
from tq_core.baselines import (
    UniformKVBaseline,
    VLLMLikeBaseline,
    fp8_round,
    round_to_nearest,
    uniform_baseline_for_budget,
    uniform_candidates,
    vllm_like_baseline,
    vllm_like_keys,
)


def _x(*shape: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("dim", [-1, -2, 0], ids=["dim-1", "dim-2", "dim0"])
def test_round_to_nearest_error_is_half_a_step(bits, dim):
    x = _x(5, 63, 40)
    y = round_to_nearest(x, bits, dim)
    assert y.shape == x.shape and y.dtype == torch.float32
    lo, hi = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    step = (hi - lo) / (2**bits - 1)
    # half a step, plus what float16 rounding of the zero point and scale moves the grid
    slack = 2.0**-10 * (lo.abs() + (2**bits - 1) * step)
    assert bool(((y - x).abs() <= step / 2 + slack).all())


def test_round_to_nearest_uses_exactly_2_to_the_bits_levels_per_slice():
    x = _x(1, 1000, seed=1)
    for bits in (1, 2, 3):
        assert torch.unique(round_to_nearest(x, bits, -1)).numel() == 2**bits


def test_round_to_nearest_is_exact_on_its_grid_and_runs_along_dim():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0], [10.0, 10.0, 10.0, 10.0]])
    assert torch.equal(round_to_nearest(x, 2, -1), x)  # a constant slice reconstructs exactly too
    cols = round_to_nearest(x.t().contiguous(), 2, 0)
    assert torch.equal(cols, x.t())


def test_round_to_nearest_rounds_scale_and_zero_to_float16():
    x = torch.tensor([0.1, 0.1 + 1 / 3])  # neither 0.1 nor the step is a float16 value
    y = round_to_nearest(x, 1, -1)
    lo = torch.tensor(0.1).half().float()
    assert y[0] == lo
    assert y[1] == lo + (x[1] - lo).half().float()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_round_to_nearest_accepts_16_bit_input(dtype):
    x = _x(8, 64, seed=2)
    y = round_to_nearest(x.to(dtype), 4, -1)
    assert y.dtype == torch.float32
    assert torch.allclose(y, round_to_nearest(x.to(dtype).float(), 4, -1))


@pytest.mark.parametrize(
    ("x", "bits", "dim", "match"),
    [
        (torch.arange(4), 4, -1, "floating dtype"),
        (torch.ones(4), 0, -1, "bits must be an integer in 1..8"),
        (torch.ones(4), 9, -1, "bits must be an integer in 1..8"),
        (torch.ones(2, 4), 4, 2, r"dim must be an integer in -2\.\.1"),
        (torch.ones(2, 4), 4, -3, r"dim must be an integer in -2\.\.1"),
        (torch.ones(2, 4), 4, 1.0, "dim must be an integer"),
        ([1.0, 2.0], 4, -1, "must be a torch.Tensor"),
    ],
    ids=["int-tensor", "bits0", "bits9", "dim-high", "dim-low", "dim-float", "list"],
)
def test_round_to_nearest_rejects_bad_arguments(x, bits, dim, match):
    with pytest.raises(ValueError, match=match):
        round_to_nearest(x, bits, dim)


def test_uniform_baseline_is_round_to_nearest_per_channel_groups_and_per_token():
    base = UniformKVBaseline(64, key_bits=3, value_bits=2, group_tokens=32)
    k, v = _x(2, 70, 64, seed=3), _x(2, 70, 64, seed=4)
    kq, vq = base.quantize_dequantize(k, v)
    want_k = torch.cat([round_to_nearest(k[:, s : s + 32], 3, -2) for s in range(0, 70, 32)], dim=1)
    assert torch.equal(kq, want_k)
    assert torch.equal(vq, round_to_nearest(v, 2, -1))


def test_uniform_baseline_bytes_and_budget():
    base = UniformKVBaseline(128, 4, 4, 128)
    assert base.bytes_per_token_head == 64 + 4 + 64 + 4
    chosen = uniform_baseline_for_budget(134, 128)
    assert (chosen.key_bits, chosen.value_bits) == (4, 4) and chosen.bytes_per_token_head <= 134
    for cand in uniform_candidates(134, 128):
        assert cand.bytes_per_token_head <= 134
    with pytest.raises(ValueError, match="no uniform configuration fits"):
        uniform_candidates(10, 128)


# vLLM's slot sizes as its own TurboQuantConfig computes them (packages/tq-vllm/VLLM_INTERNALS.md, section a)
@pytest.mark.parametrize(
    ("preset", "sizes"),
    [
        ("turboquant_k8v4", {64: 100, 96: 148, 128: 196, 256: 388}),
        ("turboquant_4bit_nc", {64: 70, 96: 102, 128: 134, 256: 262}),
        ("turboquant_k3v4_nc", {64: 62, 96: 90, 128: 118, 256: 230}),
        ("turboquant_3bit_nc", {64: 54, 96: 78, 128: 102, 256: 198}),
    ],
)
def test_vllm_like_bytes_match_vllm(preset, sizes):
    for d, want in sizes.items():
        assert vllm_like_baseline(preset, d).bytes_per_token_head == want == budget_bytes(preset, d)
        # ours is padded to exactly vLLM's budget: equal bytes, as the comparison needs
        if d % 8 == 0:
            assert named_format(preset, d).slot_bytes == want


def test_vllm_like_keys_norm_correction_keeps_the_stored_norm():
    k = torch.randn(32, 64, generator=torch.Generator().manual_seed(1)) * 3
    norm16 = k.norm(dim=-1).to(torch.float16).float()
    corrected = vllm_like_keys(k, 3, norm_correction=True)
    assert torch.allclose(corrected.norm(dim=-1), norm16, rtol=1e-5)
    # without it the centroid vector's norm (sqrt(1 - D_mse) ~ 0.98 at 3 bits on average) shrinks the key
    plain = vllm_like_keys(k, 3)
    assert float((plain.norm(dim=-1) / norm16).mean()) < 0.995


def _kv(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys with a skewed per-channel scale (as a model's keys), Gaussian values; `[tokens, heads, 128]`."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(512, 2, 128, generator=g) * torch.linspace(0.2, 3.0, 128)
    return k, torch.randn(512, 2, 128, generator=g)


def _rel(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float((x_hat - x).norm() / x.norm())


def test_vllm_like_error_falls_with_bits():
    k, v = _kv()
    key_err = [_rel(vllm_like_keys(k, b), k) for b in (2, 3, 4, 5)]
    value_err = [_rel(VLLMLikeBaseline(128, 4, b).quantize_dequantize(k, v)[1], v) for b in (2, 3, 4, 5)]
    assert key_err == sorted(key_err, reverse=True) and key_err[-1] < 0.5 * key_err[0]
    assert value_err == sorted(value_err, reverse=True) and value_err[-1] < 0.5 * value_err[0]


@pytest.mark.parametrize(
    "preset", ["turboquant_k8v4", "turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_3bit_nc"]
)
def test_ours_reconstructs_kv_better_than_vllm_like_at_equal_bytes(preset):
    k, v = _kv(seed=2)
    fmt, theirs = named_format(preset, 128), vllm_like_baseline(preset, 128)
    assert fmt.slot_bytes == theirs.bytes_per_token_head
    k_ours, v_ours = fmt.decode(fmt.encode(k, v, layer=0), layer=0)
    k_them, v_them = theirs.quantize_dequantize(k, v)
    ours = (_rel(k_ours.float(), k) ** 2 + _rel(v_ours.float(), v) ** 2) ** 0.5
    them = (_rel(k_them, k) ** 2 + _rel(v_them, v) ** 2) ** 0.5
    assert ours < them


def test_vllm_like_k8v4_keys_are_fp8_and_values_round_to_nearest():
    k, v = _kv(seed=3)
    base = vllm_like_baseline("turboquant_k8v4", 128)
    assert (base.key_bits, base.value_bits) == (8, 4)
    k_hat, v_hat = base.quantize_dequantize(k, v)
    assert torch.equal(k_hat, k.to(torch.float8_e4m3fn).float())  # |k| < 448: plain e4m3 rounding
    assert torch.equal(v_hat, round_to_nearest(v, 4, -1))


def test_fp8_round_saturates_at_448():
    x = torch.tensor([-1000.0, -448.0, 0.0, 447.0, 1e6])
    assert fp8_round(x).tolist() == [-448.0, -448.0, 0.0, 448.0, 448.0]
    assert fp8_round(x.half()).dtype == torch.float16


def test_vllm_like_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown preset"):
        vllm_like_baseline("turboquant_5bit")
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        vllm_like_keys(torch.randn(4, 96), 4)
    with pytest.raises(ValueError, match=r"key_bits must be an integer in 1\.\.8"):
        VLLMLikeBaseline(128, 0, 4)
    with pytest.raises(ValueError, match=r"k and v must both be \[\.\.\., 128\]"):
        vllm_like_baseline("turboquant_4bit_nc").quantize_dequantize(torch.randn(4, 64), torch.randn(4, 64))
    with pytest.raises(ValueError, match="floating dtype"):
        fp8_round(torch.arange(4))
