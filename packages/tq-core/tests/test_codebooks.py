import math

import pytest
import torch

from tq_core import coordinate_density, lloyd_max_codebook, make_rotation, mse_lower_bound

# The paper's D_mse for b = 1..4 (Zandieh et al., Table/Theorem 1): the large-d values.
PAPER_MSE = {1: 0.3634, 2: 0.1175, 3: 0.0345, 4: 0.0095}


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_reproduces_paper_mse_at_d128(bits):
    cb = lloyd_max_codebook(128, bits)
    assert cb.mse_per_vector == pytest.approx(PAPER_MSE[bits], rel=0.02)
    # The paper's numbers are the d -> infinity (Gaussian) limit, which we match to rounding.
    assert lloyd_max_codebook(128, bits, "gaussian").mse_per_vector == pytest.approx(
        PAPER_MSE[bits], rel=0.005
    )


def test_one_bit_matches_closed_form():
    # b = 1: centroids are +-E|t| = +-2 C_d / (d - 1), so D = 1 - d E|t|^2.
    d = 128
    c = math.exp(math.lgamma(d / 2) - 0.5 * math.log(math.pi) - math.lgamma((d - 1) / 2))
    e_abs = 2 * c / (d - 1)
    cb = lloyd_max_codebook(d, 1)
    assert cb.centroids[1].item() == pytest.approx(e_abs, rel=1e-10)
    assert cb.mse_per_vector == pytest.approx(1 - d * e_abs**2, rel=1e-9)


def test_uniform_law_at_d3():
    # At d = 3 a coordinate is uniform on [-1, 1]: the optimal quantizer is uniform, D = 4^-b exactly.
    for bits in range(1, 9):
        cb = lloyd_max_codebook(3, bits)
        assert cb.mse_per_vector == pytest.approx(4.0**-bits, rel=1e-8)
        n = 2**bits
        expected = -1 + (2 * torch.arange(n, dtype=torch.float64) + 1) / n
        torch.testing.assert_close(cb.centroids, expected, atol=1e-9, rtol=0)


@pytest.mark.parametrize("d", [3, 4, 16, 64, 80, 96, 128, 256])
@pytest.mark.parametrize("bits", range(1, 9))
def test_lower_bound_and_shape(d, bits):
    cb = lloyd_max_codebook(d, bits)
    assert cb.centroids.shape == (2**bits,)
    assert torch.all(cb.centroids[1:] > cb.centroids[:-1])
    assert torch.all(cb.centroids.abs() < 1)
    torch.testing.assert_close(cb.centroids, -cb.centroids.flip(0), atol=1e-14, rtol=0)
    assert cb.mse_per_vector >= mse_lower_bound(bits) * (1 - 1e-9)
    # Lloyd-Max never beats the high-resolution constant sqrt(3) pi / 2 by more than it should.
    assert cb.mse_per_vector <= math.sqrt(3) * math.pi / 2 * 4.0**-bits


def test_d2_is_finite_and_below_bound():
    # On the circle (d = 2) one coordinate is arcsine distributed: integrable poles at +-1.  The 4^-b
    # bound assumes a sphere of dimension >= 3 (a circle is one-dimensional), so d = 2 beats it.
    for bits in range(1, 9):
        cb = lloyd_max_codebook(2, bits)
        assert math.isfinite(cb.mse_per_vector) and cb.mse_per_vector > 0
        assert cb.mse_per_vector < mse_lower_bound(bits)


def test_cached_and_deterministic():
    assert lloyd_max_codebook(128, 3) is lloyd_max_codebook(128, 3)
    from tq_core.codebooks import _solve

    fresh = _solve.__wrapped__(128, 3, "sphere")
    assert torch.equal(fresh.centroids, lloyd_max_codebook(128, 3).centroids)


def test_density_normalized():
    for d in (3, 16, 128):
        t = torch.linspace(-1, 1, 200_001, dtype=torch.float64)
        assert torch.trapezoid(coordinate_density(t, d), t).item() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_monte_carlo_matches_predicted_mse(bits):
    d = 64
    gen = torch.Generator().manual_seed(bits)
    u = torch.randn(40_000, d, generator=gen, dtype=torch.float64)
    u = u / u.norm(dim=-1, keepdim=True)
    y = u @ make_rotation(d, "haar", seed=7).matrix.double().T
    cb = lloyd_max_codebook(d, bits)
    err = (cb.dequantize(cb.quantize(y), dtype=torch.float64) - y).pow(2).sum(-1).mean().item()
    assert err == pytest.approx(cb.mse_per_vector, rel=0.03)


@pytest.mark.parametrize("bad", [0, 9, -1, 2.0, True, "4"])
def test_bad_bits(bad):
    with pytest.raises(ValueError, match=r"bits must be an integer in 1\.\.8"):
        lloyd_max_codebook(128, bad)


@pytest.mark.parametrize("bad", [1, 0, -5, 3.5])
def test_bad_dim(bad):
    with pytest.raises(ValueError, match="d must be an integer >= 2"):
        lloyd_max_codebook(bad, 2)


def test_bad_distribution():
    with pytest.raises(ValueError, match="'sphere' or 'gaussian'"):
        lloyd_max_codebook(128, 2, "laplace")  # type: ignore[arg-type]
