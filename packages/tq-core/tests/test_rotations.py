import pytest
import torch

from tq_core import fwht, layer_seed, make_rotation

DIMS = [2, 3, 64, 80, 96, 128, 256]


@pytest.mark.parametrize("kind", ["haar", "hadamard"])
@pytest.mark.parametrize("d", DIMS)
def test_orthogonal_and_invertible(kind, d):
    r = make_rotation(d, kind, seed=11)
    m = r.matrix.double()
    torch.testing.assert_close(m @ m.T, torch.eye(d, dtype=torch.float64), atol=1e-5, rtol=0)
    x = torch.randn(7, d)
    torch.testing.assert_close(r.inverse(r.apply(x)), x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r.apply(x).norm(dim=-1), x.norm(dim=-1), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("d", [2, 64, 128, 256])
def test_hadamard_fast_path_equals_matrix(d):
    r = make_rotation(d, "hadamard", seed=3)
    x = torch.randn(5, d)
    torch.testing.assert_close(r.apply_fast(x), r.apply(x), atol=1e-5, rtol=1e-5)


def test_non_power_of_two_hadamard_is_haar():
    # Randomized Hadamard exists at powers of two only; elsewhere we document a dense Haar rotation.
    for d in (3, 80, 96):
        r = make_rotation(d, "hadamard", seed=0)
        assert r.kind == "haar"
        assert r.matrix.abs().max().item() < 4.5 / d**0.5  # spread out, no lumps
    assert make_rotation(128, "hadamard", seed=0).kind == "hadamard"


def test_reproducible_and_layer_seeds_differ():
    a = make_rotation(128, "hadamard", seed=layer_seed(0, 3)).matrix
    b = make_rotation(128, "hadamard", seed=layer_seed(0, 3)).matrix
    c = make_rotation(128, "hadamard", seed=layer_seed(0, 4)).matrix
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({layer_seed(1, i) for i in range(1000)}) == 1000


def test_fwht_self_inverse():
    x = torch.randn(3, 64, dtype=torch.float64)
    torch.testing.assert_close(fwht(fwht(x)), x)
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.randn(3, 80))


def _abs_coordinate_cdf(d: int, t: torch.Tensor) -> torch.Tensor:
    """CDF of ``|y_0|`` for ``y`` uniform on the unit sphere of ``R^d`` (``y_0^2 ~ Beta(1/2, (d-1)/2)``).

    The density of ``|y_0|`` on ``[0, 1]`` is proportional to ``(1 - s^2)^((d-3)/2)``; integrated by the
    trapezoid rule on a fine float64 grid (error far below the KS thresholds used here).
    """
    s = torch.linspace(0.0, 1.0, 200_001, dtype=torch.float64)
    f = (1 - s * s).clamp_min(0).pow((d - 3) / 2)
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum((f[1:] + f[:-1]) / 2, 0)])
    cdf = cdf / cdf[-1]
    idx = (t.double().clamp(0, 1) * (len(s) - 1)).round().long()
    return cdf[idx]


def _ks_statistic(d: int, samples: torch.Tensor) -> float:
    """One-sample Kolmogorov-Smirnov distance of ``|samples|`` from the sphere coordinate law."""
    x = samples.double().abs().sort().values
    n = len(x)
    cdf = _abs_coordinate_cdf(d, x)
    above = torch.arange(1, n + 1, dtype=torch.float64) / n - cdf
    below = cdf - torch.arange(0, n, dtype=torch.float64) / n
    return max(above.max().item(), below.max().item())


# 1.95 / sqrt(n) is the KS test's critical value at a 0.1% level; the seeds are fixed, so this is not flaky.
_N_ROTATIONS = 1000
_KS_CRITICAL = 1.95 / _N_ROTATIONS**0.5


@pytest.mark.slow
@pytest.mark.parametrize("d", [3, 64])
def test_haar_coordinates_follow_sphere_law(d):
    # For Haar R and a fixed unit u, R u is uniform on the sphere: (R u)_0^2 ~ Beta(1/2, (d-1)/2).
    # u is the flat vector on purpose: a rotation that only permutes or flips coordinates keeps it flat.
    u = torch.full((d,), d**-0.5)
    ys = torch.stack([make_rotation(d, "haar", seed=s).apply(u)[0] for s in range(_N_ROTATIONS)])
    assert _ks_statistic(d, ys) < _KS_CRITICAL


def test_sphere_law_check_rejects_a_non_haar_rotation():
    # Random signed permutations are orthogonal and give E[(R u)_0^2] = 1/d exactly (what this file's
    # sphere-law test used to check), but they are not Haar: the KS check must reject them.
    d = 64
    u = torch.full((d,), d**-0.5)
    gen = torch.Generator().manual_seed(0)
    ys = []
    for _ in range(_N_ROTATIONS):
        perm = torch.eye(d)[torch.randperm(d, generator=gen)]
        signs = torch.randint(0, 2, (d,), generator=gen).float() * 2 - 1
        ys.append((signs[:, None] * perm) @ u)
    ys = torch.stack(ys)[:, 0]
    assert ys.pow(2).mean().item() == pytest.approx(1 / d, rel=0.1)  # the old check passes
    assert _ks_statistic(d, ys) > _KS_CRITICAL  # the law does not


def test_sphere_law_reference_cdf():
    # d = 3: |y_0| is uniform on [0, 1] (Archimedes); large d: y_0 * sqrt(d) is close to N(0, 1).
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(_abs_coordinate_cdf(3, t), t.double(), atol=1e-6, rtol=0)
    d = 4096
    x = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    normal = torch.erf(x / 2**0.5)
    torch.testing.assert_close(_abs_coordinate_cdf(d, x / d**0.5), normal, atol=2e-3, rtol=0)


def test_bad_input():
    with pytest.raises(ValueError, match=r"one of \['haar', 'hadamard'\]"):
        make_rotation(64, "givens")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="last dimension 64"):
        make_rotation(64).apply(torch.randn(3, 65))
    with pytest.raises(ValueError, match="floating dtype"):
        make_rotation(64).apply(torch.ones(3, 64, dtype=torch.int32))
