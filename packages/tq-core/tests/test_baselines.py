"""tq_core.baselines: min-max round-to-nearest and the KIVI-style uniform K/V baseline built from it."""

from __future__ import annotations

import pytest
import torch

from tq_core.baselines import (
    UniformKVBaseline,
    round_to_nearest,
    uniform_baseline_for_budget,
    uniform_candidates,
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
