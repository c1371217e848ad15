"""Lloyd-Max codebooks for one coordinate of a uniformly random unit vector.

After a random rotation, every coordinate ``t`` of a unit vector in ``R^d`` follows the density

    f_d(t) = C_d (1 - t^2)^((d - 3) / 2)   on [-1, 1],   C_d = Gamma(d/2) / (sqrt(pi) Gamma((d-1)/2))

(``t^2 ~ Beta(1/2, (d-1)/2)``).  TurboQuant quantizes every coordinate with the optimal scalar
quantizer (Lloyd-Max) for that density.  This module solves the Lloyd-Max conditions exactly:

* probabilities of cells are integrals of ``f_d``; with ``t = sin(theta)`` they become integrals of
  ``C_d cos^(d-2)(theta)`` over ``theta``, which is smooth and bounded for every ``d >= 2`` (no endpoint
  singularity, no truncation of the support), evaluated with composite Gauss-Legendre quadrature;
* first moments have the closed form ``int t f_d(t) dt = -C_d (1 - t^2)^((d-1)/2) / (d - 1)``.

The Gaussian limit ``N(0, 1/d)`` is available too (``distribution="gaussian"``).  Results are computed
in float64, cached per ``(d, bits, distribution)`` and are deterministic.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch

from tq_core._validate import check_bits, check_head_dim

__all__ = ["Codebook", "Distribution", "lloyd_max_codebook", "coordinate_density", "mse_lower_bound"]

Distribution = Literal["sphere", "gaussian"]

_GL_NODES = 24  # Gauss-Legendre nodes per panel
_GL_PANELS = 8  # panels per cell; cos^(d-2) is smooth, so this is far past float64 accuracy


@dataclass(frozen=True)
class Codebook:
    """An optimal scalar quantizer for one rotated coordinate.

    Attributes:
        d: dimension of the vectors whose coordinates are quantized.
        bits: bits per coordinate; ``len(centroids) == 2**bits``.
        distribution: ``"sphere"`` (exact coordinate density) or ``"gaussian"`` (its ``N(0, 1/d)`` limit).
        centroids: sorted reconstruction levels, float64 tensor of shape `[2**bits]`.
        boundaries: decision thresholds between consecutive centroids, float64 `[2**bits - 1]`.
        mse_per_coordinate: expected squared error of one coordinate of a unit vector.
    """

    d: int
    bits: int
    distribution: str
    centroids: torch.Tensor
    boundaries: torch.Tensor
    mse_per_coordinate: float

    @property
    def mse_per_vector(self) -> float:
        """Expected ``||u - Q(u)||^2`` for a uniformly random unit vector ``u`` (the paper's ``D_mse``)."""
        return self.d * self.mse_per_coordinate

    def quantize(self, y: torch.Tensor) -> torch.Tensor:
        """Index of the nearest centroid for every element of ``y`` (uint8, same shape)."""
        b = self.boundaries.to(device=y.device, dtype=y.dtype)
        return torch.bucketize(y.contiguous(), b, out_int32=True).to(torch.uint8)

    def dequantize(self, idx: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Centroid values for integer indices ``idx``."""
        table = self.centroids.to(device=idx.device, dtype=dtype)[:, None]
        return torch.nn.functional.embedding(idx.to(torch.int32), table).squeeze(-1)


def _log_norm_const(d: float) -> float:
    return math.lgamma(d / 2) - 0.5 * math.log(math.pi) - math.lgamma((d - 1) / 2)


def coordinate_density(t: torch.Tensor, d: float) -> torch.Tensor:
    """Density ``f_d(t)`` of one coordinate of a uniform unit vector in ``R^d`` (zero outside [-1, 1])."""
    check_head_dim(d)
    t = t.to(torch.float64)
    inside = t.abs() < 1
    safe = torch.where(inside, t, torch.zeros_like(t))
    out = torch.exp(_log_norm_const(d) + 0.5 * (d - 3) * torch.log1p(-safe * safe))
    return torch.where(inside, out, torch.zeros_like(out))


def mse_lower_bound(bits: int) -> float:
    """Information-theoretic lower bound ``4^-b`` on ``D_mse`` for any b-bit vector quantizer."""
    check_bits(bits)
    return 4.0 ** (-bits)


@functools.cache
def _gauss_legendre(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Golub-Welsch: eigenvalues of the Jacobi matrix of Legendre polynomials.
    k = torch.arange(1, n, dtype=torch.float64)
    off = k / torch.sqrt(4 * k * k - 1)
    jac = torch.diag(off, 1) + torch.diag(off, -1)
    nodes, vecs = torch.linalg.eigh(jac)
    weights = 2 * vecs[0] ** 2
    return nodes, weights


class _Sphere:
    """Cell masses and first moments of the exact coordinate density."""

    def __init__(self, d: float) -> None:
        self.d = d
        self.log_c = _log_norm_const(d)

    def mass(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # P(a < t < b) = C int_{asin a}^{asin b} cos^(d-2)(theta) dtheta, composite Gauss-Legendre.
        ta, tb = torch.asin(a.clamp(-1, 1)), torch.asin(b.clamp(-1, 1))
        nodes, weights = _gauss_legendre(_GL_NODES)
        edges = torch.linspace(0, 1, _GL_PANELS + 1, dtype=torch.float64)
        lo = ta[:, None] + (tb - ta)[:, None] * edges[None, :-1]  # [cells, panels]
        half = 0.5 * (tb - ta)[:, None] / _GL_PANELS
        theta = lo[..., None] + half[..., None] * (nodes + 1)  # [cells, panels, nodes]
        if self.d == 2:
            vals = torch.ones_like(theta)
        else:
            vals = torch.exp((self.d - 2) * torch.log(torch.cos(theta).clamp_min(1e-300)))
        integral = (vals * weights).sum(-1) * half
        return math.exp(self.log_c) * integral.sum(-1)

    def moment(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # int_a^b t f(t) dt = G(b) - G(a), G(t) = -C (1 - t^2)^((d-1)/2) / (d-1)
        def g(t: torch.Tensor) -> torch.Tensor:
            one_minus = (1 - t * t).clamp_min(0)
            return (
                -torch.exp(self.log_c + 0.5 * (self.d - 1) * torch.log(one_minus.clamp_min(1e-300)))
                / (self.d - 1)
                * (one_minus > 0)
            )

        return g(b) - g(a)

    @property
    def support(self) -> tuple[float, float]:
        return -1.0, 1.0


class _Gaussian:
    """Cell masses and first moments of ``N(0, 1/d)``."""

    def __init__(self, d: int) -> None:
        self.d = d
        self.sigma = 1 / math.sqrt(d)

    def mass(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.special.ndtr(b / self.sigma) - torch.special.ndtr(a / self.sigma)

    def moment(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        def phi(x: torch.Tensor) -> torch.Tensor:
            return torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)

        return self.sigma * (phi(a / self.sigma) - phi(b / self.sigma))

    @property
    def support(self) -> tuple[float, float]:
        return -math.inf, math.inf


def _initial_centroids(d: int, bits: int, distribution: str) -> torch.Tensor:
    # Companding start: the asymptotically optimal point density is proportional to f^(1/3).  For the
    # sphere law f^(1/3) is again a sphere law, of "dimension" (d + 6) / 3; for N(0, 1/d) it is
    # N(0, 3/d).  Its quantiles are within a few percent of the optimum; Lloyd and Newton polish.
    n = 2**bits
    p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    if distribution == "gaussian":
        return torch.special.ndtri(p) * math.sqrt(3.0 / d)
    law = _Sphere((d + 6) / 3)
    lo = torch.full_like(p, -1.0)
    hi = torch.ones_like(p)
    minus_one = torch.full_like(p, -1.0)
    for _ in range(60):  # bisection on the CDF, all levels at once
        mid = 0.5 * (lo + hi)
        below = law.mass(minus_one, mid) < p
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return 0.5 * (lo + hi)


def _cells(c: torch.Tensor, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    bnd = 0.5 * (c[1:] + c[:-1])
    a = torch.cat([torch.tensor([lo], dtype=torch.float64), bnd])
    b = torch.cat([bnd, torch.tensor([hi], dtype=torch.float64)])
    return a, b


def _density_at(law: _Sphere | _Gaussian, t: torch.Tensor) -> torch.Tensor:
    if isinstance(law, _Sphere):
        return coordinate_density(t, law.d)
    return torch.exp(-0.5 * (t / law.sigma) ** 2) / (law.sigma * math.sqrt(2 * math.pi))


@functools.cache
def _solve(d: int, bits: int, distribution: str) -> Codebook:
    law: _Sphere | _Gaussian = _Sphere(d) if distribution == "sphere" else _Gaussian(d)
    lo, hi = law.support
    c = _initial_centroids(d, bits, distribution)
    n = c.numel()
    tol = 1e-13 / math.sqrt(d)
    best = math.inf
    for it in range(300):
        a, b = _cells(c, lo, hi)
        mass = law.mass(a, b).clamp_min(1e-300)
        t_c = law.moment(a, b) / mass  # the Lloyd map: centroid of every cell
        resid = t_c - c
        size = resid.abs().max().item()
        if size < tol or (it > 40 and size >= best):  # converged, or stalled at round-off
            break
        best = min(best, size)
        step = resid
        if it >= 8 and n >= 4:
            # Newton on c = T(c).  T_i depends on c_{i-1}, c_i, c_{i+1} through the cell edges only:
            # dT_i/da_i = f(a_i)(T_i - a_i)/P_i and dT_i/db_i = f(b_i)(b_i - T_i)/P_i, with a, b the
            # midpoints of neighbouring centroids, so the Jacobian is tridiagonal.
            fa = _density_at(law, a) * torch.isfinite(a)
            fb = _density_at(law, b) * torch.isfinite(b)
            da = torch.where(torch.isfinite(a), fa * (t_c - a.nan_to_num(0.0)) / mass, torch.zeros_like(a))
            db = torch.where(torch.isfinite(b), fb * (b.nan_to_num(0.0) - t_c) / mass, torch.zeros_like(b))
            jac = torch.diag(0.5 * (da + db)) + torch.diag(0.5 * da[1:], -1) + torch.diag(0.5 * db[:-1], 1)
            if bool(torch.isfinite(jac).all()):  # d = 2 has an integrable pole at +-1: stay with Lloyd
                step = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - jac, resid)
        scale = 1.0
        while True:  # keep the centroids strictly increasing and inside the support
            cand = c + scale * step
            ok = bool((cand[1:] > cand[:-1]).all()) and cand[0].item() > lo and cand[-1].item() < hi
            if ok or scale < 1e-6:
                break
            scale *= 0.5
        # By symmetry the optimum is odd; enforcing it removes round-off drift.
        c = 0.5 * (cand - cand.flip(0))
    a, b = _cells(c, lo, hi)
    mass = law.mass(a, b)
    # At the Lloyd fixed point, E[(t - Q(t))^2] = E[t^2] - sum_i p_i c_i^2 with E[t^2] = 1/d.
    mse = 1.0 / d - float((mass * c * c).sum())
    return Codebook(
        d=d,
        bits=bits,
        distribution=distribution,
        centroids=c,
        boundaries=0.5 * (c[1:] + c[:-1]),
        mse_per_coordinate=mse,
    )


def lloyd_max_codebook(d: int, bits: int, distribution: Distribution = "sphere") -> Codebook:
    """The Lloyd-Max codebook for one coordinate of a random unit vector in ``R^d``.

    Args:
        d: vector dimension (head_dim), ``d >= 2``.
        bits: bits per coordinate, 1..8.
        distribution: ``"sphere"`` for the exact density ``(1 - t^2)^((d-3)/2)``, ``"gaussian"`` for its
            ``N(0, 1/d)`` limit.

    Returns:
        A cached, immutable :class:`Codebook`.

    Example:
        >>> cb = lloyd_max_codebook(128, 2)
        >>> round(cb.mse_per_vector, 4)
        0.1175
    """
    check_head_dim(d)
    check_bits(bits)
    if distribution not in ("sphere", "gaussian"):
        raise ValueError(f"distribution must be 'sphere' or 'gaussian', got {distribution!r}")
    return _solve(int(d), int(bits), distribution)
