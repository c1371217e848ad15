"""Random rotations that make every coordinate of a unit vector follow the same known law.

Two kinds, both exactly orthogonal and reproducible from an integer seed:

* ``"haar"``: a Haar-random orthogonal matrix (QR of a Gaussian matrix with the sign fix that makes the
  distribution exactly Haar).  Coordinates of ``R u`` then follow the codebook's density exactly.
* ``"hadamard"``: randomized Hadamard ``H D / sqrt(d)`` with random signs ``D``, which has an
  ``O(d log d)`` butterfly (:func:`fwht`).  It exists only for powers of two.  For other head dims (80,
  96, ...) ``make_rotation(d, "hadamard")`` returns a Haar rotation (its ``kind`` says ``"haar"``): we
  measured the alternatives that keep ``d`` without padding, overlapping power-of-two windows, and found
  them lumpy (at d = 96 some 17% of the matrix entries cancel to exactly 0 and the largest is 0.39, four
  times ``1/sqrt(d)``), so an outlier channel would not be spread evenly.  Padding to the next power of
  two would cost storage.  A dense Haar matrix is exact and costs the same in our kernels.

Kernels and this reference do not care which kind is used: they multiply by the dense matrix
(``Rotation.matrix``), ``d^2`` multiply-adds per vector, negligible next to the memory traffic on a GPU
and faster than the butterfly on a CPU (``Rotation.apply_fast`` keeps the butterfly, for checking).

Seeds: :func:`layer_seed` derives one seed per ``(base_seed, layer)``; all heads of a layer share the
rotation (so a kernel loads one matrix per layer).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

from tq_core._validate import check_float_tensor, check_head_dim, check_last_dim

__all__ = ["Rotation", "RotationKind", "make_rotation", "layer_seed", "fwht"]

RotationKind = Literal["haar", "hadamard"]


def layer_seed(base_seed: int, layer: int) -> int:
    """A reproducible 63-bit seed for one layer, independent across layers."""
    if layer < 0:
        raise ValueError(f"layer must be >= 0, got {layer}")
    x = int(base_seed) * 0x9E3779B97F4A7C15 + int(layer) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB
    x &= (1 << 64) - 1
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & ((1 << 64) - 1)
    x ^= x >> 32
    return x & ((1 << 63) - 1)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Normalized fast Walsh-Hadamard transform over the last dimension (a power of two).

    ``fwht(fwht(x)) == x`` and ``||fwht(x)|| == ||x||``.
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two last dimension, got {n}")
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y.reshape(*lead, n)) / math.sqrt(n)


@dataclass(frozen=True, eq=False)
class Rotation:
    """An orthogonal ``d x d`` map ``y = R x`` with a reproducible seed.

    Attributes:
        d: dimension.
        kind: ``"haar"`` or ``"hadamard"``.
        seed: the seed it was drawn from.
        matrix: float32 tensor `[d, d]`; ``apply(x) == x @ matrix.T``.
    """

    d: int
    kind: str
    seed: int
    matrix: torch.Tensor = field(repr=False)
    _signs: tuple[torch.Tensor, ...] = field(repr=False, default=())

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate the last dimension: `[..., d]` -> `[..., d]` (``R x``)."""
        check_float_tensor(x, "x")
        check_last_dim(x, self.d, "x")
        # A dense d x d product beats the O(d log d) transform on every backend at head_dim <= 256.
        return x @ self.matrix.to(device=x.device, dtype=x.dtype).T

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`apply` (``R^T y``)."""
        check_float_tensor(y, "y")
        check_last_dim(y, self.d, "y")
        return y @ self.matrix.to(device=y.device, dtype=y.dtype)

    def apply_fast(self, x: torch.Tensor) -> torch.Tensor:
        """``R x`` by the fast Walsh-Hadamard transform (``"hadamard"`` only); equals :meth:`apply`."""
        if self.kind != "hadamard":
            raise ValueError("apply_fast is defined for hadamard rotations only")
        return self._hadamard(x, inverse=False)

    def _hadamard(self, x: torch.Tensor, inverse: bool) -> torch.Tensor:
        s = self._signs[0].to(device=x.device, dtype=x.dtype)
        return s * fwht(x) if inverse else fwht(s * x)


@functools.lru_cache(maxsize=256)
def _make(d: int, kind: str, seed: int) -> Rotation:
    gen = torch.Generator().manual_seed(seed)
    if kind == "haar" or d & (d - 1):
        g = torch.randn(d, d, generator=gen, dtype=torch.float64)
        q, r = torch.linalg.qr(g)
        q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))
        return Rotation(d=d, kind="haar", seed=seed, matrix=q.to(torch.float32).contiguous())
    signs = ((torch.randint(0, 2, (d,), generator=gen, dtype=torch.int64) * 2 - 1).to(torch.float64),)
    rot = Rotation(d=d, kind=kind, seed=seed, matrix=torch.empty(0), _signs=signs)
    eye = torch.eye(d, dtype=torch.float64)
    dense = rot._hadamard(eye, inverse=False).T  # column j is R e_j
    object.__setattr__(rot, "matrix", dense.to(torch.float32).contiguous())
    object.__setattr__(rot, "_signs", tuple(s.to(torch.float32) for s in signs))
    return rot


def make_rotation(d: int, kind: RotationKind = "hadamard", seed: int = 0) -> Rotation:
    """A reproducible random rotation of ``R^d``.

    Args:
        d: dimension (head_dim), ``>= 2``.
        kind: ``"hadamard"`` (randomized Walsh-Hadamard; a Haar rotation when ``d`` is not a power of
            two, see the module docstring) or ``"haar"`` (dense Haar-random orthogonal).
        seed: any integer; equal seeds give identical rotations on every machine.

    Example:
        >>> r = make_rotation(128, "hadamard", seed=1)
        >>> x = torch.randn(4, 128)
        >>> torch.allclose(r.inverse(r.apply(x)), x, atol=1e-5)
        True
    """
    check_head_dim(d)
    if not isinstance(kind, str) or kind not in get_args(RotationKind):
        raise ValueError(f"rotation kind must be one of {list(get_args(RotationKind))}, got {kind!r}")
    return _make(int(d), kind, int(seed) & ((1 << 63) - 1))
