"""Reference TurboQuant quantizers (pure torch): the numerical truth kernels are tested against.

* :class:`TurboQuantMSE`: ``x -> (codes, gamma)`` with ``u = x / ||x||``, ``y = R u``, every coordinate
  of ``y`` quantized by the Lloyd-Max codebook of its law; ``x_hat = gamma R^T c[codes]``.  ``gamma`` is
  ``||x||``, or with ``norm_correction`` ``||x|| / ||c[codes]||`` so that ``||x_hat|| == ||x||`` exactly
  (the plain estimate shrinks vectors by ``sqrt(1 - D)`` on average, which flattens attention).
  With ``gain_search`` the codes are not the nearest centroids of ``y`` but those of ``y / g`` for the
  gain ``g`` of :data:`GAIN_GRID` whose reconstruction points closest to ``y`` (largest
  ``cos^2(y, c) = (y . c)^2 / (c . c)``): the codebook is fitted to the one vector at hand instead of the
  average one, which at 4 bits and ``d = 64`` cuts the reconstruction error by a fifth.  Only the encoder
  changes: ``gamma`` and decoding are as without it.
  Optionally the first ``hi_bits_coords`` rotated coordinates get one more bit: after the rotation all
  coordinates are exchangeable, so this spends spare bytes evenly, without calibration.
* :class:`TurboQuantProd`: the paper's inner-product quantizer, ``(b-1)``-bit MSE stage plus one bit of
  QJL on the residual, ``x_hat = x_mse + ||r|| sqrt(pi/2) / d * S^T sign(S r)``; ``<q, x_hat>`` is an
  unbiased estimate of ``<q, x>``.
* :class:`OutlierSplitQuantizer`: the paper's 2.5/3.5-bit configurations: chosen (outlier) channels and
  the rest are two independent TurboQuant instances with their own norms and rotations.

Non-finite inputs: ``nonfinite="raise"`` (default) raises ``ValueError``, also for a finite vector
whose float32 norm overflows (entries from about 1e18 up: scale the input down); ``"propagate"`` encodes
each vector that holds a NaN/Inf with all-zero codes and a NaN norm, so it decodes to NaN (visible,
never silent) while every other vector is encoded exactly as usual.  The kernels follow ``"propagate"``.
A non-zero vector whose norm underflows float32 (entries below about 1e-23) has norm 0 and decodes to
the zero vector.  Where the norm is stored (:mod:`tq_core.formats`) its dtype sets tighter limits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from tq_core._validate import check_bits, check_finite, check_float_tensor, check_head_dim, check_last_dim
from tq_core.codebooks import Codebook, Distribution, lloyd_max_codebook
from tq_core.rotations import Rotation, RotationKind, make_rotation

__all__ = [
    "MSECodes",
    "ProdCodes",
    "TurboQuantMSE",
    "TurboQuantProd",
    "OutlierSplitQuantizer",
    "NonFinite",
    "top_rms_channels",
    "GAIN_GRID",
    "gain_grid",
]

NonFinite = Literal["raise", "propagate"]
_TINY = 1e-30

# Gains tried by ``gain_search``: 0.80, 0.84, ..., 1.40 (16 values, 1.0 among them, so the search never
# picks codes further from ``y`` than the nearest centroids).  On random unit vectors the best gain lies
# in this range for 4- and 3-bit codebooks at d = 64..256; a finer or wider grid gains < 2% more.
GAIN_GRID: tuple[float, ...] = tuple(round(0.8 + 0.04 * i, 2) for i in range(16))


def gain_grid(device: torch.device | str | None = None) -> torch.Tensor:
    """:data:`GAIN_GRID` as a float32 tensor (the table the store kernel reads)."""
    return torch.tensor(GAIN_GRID, dtype=torch.float32, device=device)


@dataclass(frozen=True, eq=False)
class MSECodes:
    """Codes of :class:`TurboQuantMSE`: ``idx`` uint8 `[..., d]`, ``gamma`` float32 `[...]`."""

    idx: torch.Tensor
    gamma: torch.Tensor


@dataclass(frozen=True, eq=False)
class ProdCodes:
    """Codes of :class:`TurboQuantProd`: MSE stage, QJL signs bool `[..., d]`, residual norm `[...]`."""

    mse: MSECodes
    signs: torch.Tensor
    residual_norm: torch.Tensor


def _prepare(x: torch.Tensor, d: int, nonfinite: NonFinite) -> tuple[torch.Tensor, torch.Tensor | None]:
    check_float_tensor(x, "x")
    check_last_dim(x, d, "x")
    if nonfinite not in ("raise", "propagate"):
        raise ValueError(f"nonfinite must be 'raise' or 'propagate', got {nonfinite!r}")
    x32 = x.to(torch.float32)
    if nonfinite == "raise":
        check_finite(x32, "x")
        return x32, None
    bad = ~torch.isfinite(x32).all(dim=-1)
    return torch.where(bad[..., None], torch.zeros_like(x32), x32), bad


class TurboQuantMSE:
    """MSE-optimal TurboQuant for vectors of dimension ``d``.

    Args:
        d: vector dimension (head_dim), ``>= 2``.
        bits: bits per coordinate, 1..8.
        rotation: ``"hadamard"``, ``"haar"``, or a :class:`~tq_core.rotations.Rotation` to share.
        seed: rotation seed (ignored when a ``Rotation`` is given).
        hi_bits_coords: leading rotated coordinates stored with ``bits + 1`` bits (``0 <= . <= d``,
            requires ``bits < 8`` when positive).
        norm_correction: store ``||x|| / ||c[codes]||`` instead of ``||x||``.
        distribution: codebook law, ``"sphere"`` (exact) or ``"gaussian"`` (its limit).
        gain_search: choose the codes of ``y / g`` for the best gain ``g`` of :data:`GAIN_GRID`
            (see the module docstring) instead of the nearest centroids of ``y``.

    Example:
        >>> q = TurboQuantMSE(128, 4, seed=0)
        >>> x = torch.randn(1000, 128)
        >>> err = ((q.dequantize(q.quantize(x)) - x).norm(dim=-1) / x.norm(dim=-1)).pow(2).mean()
        >>> bool(0.008 < err < 0.011)
        True
    """

    def __init__(
        self,
        d: int,
        bits: int,
        *,
        rotation: RotationKind | Rotation = "hadamard",
        seed: int = 0,
        hi_bits_coords: int = 0,
        norm_correction: bool = False,
        distribution: Distribution = "sphere",
        gain_search: bool = False,
    ) -> None:
        check_head_dim(d)
        if not isinstance(gain_search, bool):
            raise ValueError(f"gain_search must be True or False, got {gain_search!r}")
        check_bits(bits)
        if not 0 <= hi_bits_coords <= d:
            raise ValueError(f"hi_bits_coords must be in 0..{d}, got {hi_bits_coords}")
        if hi_bits_coords and bits == 8:
            raise ValueError("hi_bits_coords needs bits < 8 (coordinates are stored with bits + 1 <= 8)")
        self.d, self.bits, self.hi_bits_coords = d, bits, hi_bits_coords
        self.norm_correction = norm_correction
        self.gain_search = gain_search
        if isinstance(rotation, Rotation):
            if rotation.d != d:
                raise ValueError(f"rotation has d={rotation.d}, quantizer has d={d}")
            self.rotation = rotation
        else:
            self.rotation = make_rotation(d, rotation, seed)
        self.codebook: Codebook = lloyd_max_codebook(d, bits, distribution)
        self.codebook_hi: Codebook | None = (
            lloyd_max_codebook(d, bits + 1, distribution) if hi_bits_coords else None
        )

    @property
    def bits_per_coordinate(self) -> float:
        return self.bits + self.hi_bits_coords / self.d

    def _split(self) -> list[tuple[slice, Codebook]]:
        parts: list[tuple[slice, Codebook]] = []
        if self.codebook_hi is not None:
            parts.append((slice(0, self.hi_bits_coords), self.codebook_hi))
        if self.hi_bits_coords < self.d:
            parts.append((slice(self.hi_bits_coords, self.d), self.codebook))
        return parts

    def quantize_rotated(self, y: torch.Tensor) -> torch.Tensor:
        """Codebook indices for already rotated unit vectors ``y`` `[..., d]` (uint8): the nearest
        centroids, or with ``gain_search`` those of the best gain (first of equals in grid order)."""
        if not self.gain_search:
            return self.nearest_codes(y)
        y32 = y.to(torch.float32)
        best_idx = torch.zeros(y.shape, dtype=torch.uint8, device=y.device)
        best = torch.full(y.shape[:-1], -1.0, dtype=torch.float32, device=y.device)
        for g in gain_grid(y.device):
            idx = self.nearest_codes(y32 / g)
            c = self.centroids(idx)
            score = (y32 * c).sum(-1).square() / (c * c).sum(-1).clamp_min(_TINY)
            better = score > best
            best_idx = torch.where(better[..., None], idx, best_idx)
            best = torch.where(better, score, best)
        return best_idx

    def nearest_codes(self, y: torch.Tensor) -> torch.Tensor:
        """Indices (uint8) of the nearest centroids of every coordinate of ``y`` `[..., d]` (no gain search)."""
        idx = torch.empty(y.shape, dtype=torch.uint8, device=y.device)
        for sl, cb in self._split():
            idx[..., sl] = cb.quantize(y[..., sl])
        return idx

    def centroids(self, idx: torch.Tensor) -> torch.Tensor:
        """Rotated-space reconstruction ``c[idx]`` (float32 `[..., d]`) of unit vectors."""
        out = torch.empty(idx.shape, dtype=torch.float32, device=idx.device)
        for sl, cb in self._split():
            out[..., sl] = cb.dequantize(idx[..., sl])
        return out

    def quantize(self, x: torch.Tensor, *, nonfinite: NonFinite = "raise") -> MSECodes:
        """Encode ``x`` `[..., d]` (any float dtype).

        Raises:
            ValueError: with ``nonfinite="raise"``, ``x`` holds a NaN/Inf or a vector whose norm
                overflows float32; scale or clean the input.
        """
        x32, bad = _prepare(x, self.d, nonfinite)
        norm = x32.norm(dim=-1)
        y = self.rotation.apply(x32 / norm.clamp_min(_TINY)[..., None])
        idx = self.quantize_rotated(y)
        gamma = norm
        if self.norm_correction:
            gamma = norm / self.centroids(idx).norm(dim=-1).clamp_min(_TINY)
        if bad is not None:
            idx = torch.where(bad[..., None], torch.zeros_like(idx), idx)
            gamma = torch.where(bad, torch.full_like(gamma, math.nan), gamma)
        elif gamma.numel() and not bool(torch.isfinite(gamma.amax())):
            over = int((~torch.isfinite(gamma)).sum())
            raise ValueError(
                f"x has {over} finite vector(s) whose norm overflows float32 (largest |entry| "
                f"{float(x32.abs().amax()):.3g}); scale the input down"
            )
        return MSECodes(idx=idx, gamma=gamma)

    def dequantize(self, codes: MSECodes) -> torch.Tensor:
        """Decode to float32 `[..., d]`."""
        return self.rotation.inverse(self.centroids(codes.idx) * codes.gamma[..., None])

    def __repr__(self) -> str:
        return (
            f"TurboQuantMSE(d={self.d}, bits={self.bits}, hi_bits_coords={self.hi_bits_coords}, "
            f"norm_correction={self.norm_correction}, gain_search={self.gain_search}, "
            f"rotation={self.rotation.kind})"
        )


class TurboQuantProd:
    """Unbiased inner-product TurboQuant: ``(bits - 1)``-bit MSE stage + 1-bit QJL on the residual.

    Args:
        d: vector dimension.
        bits: total bits per coordinate, 2..8 (the MSE stage gets ``bits - 1``).
        rotation, seed: as for :class:`TurboQuantMSE`; the QJL matrix ``S`` (i.i.d. N(0, 1), `[d, d]`)
            is drawn from ``seed + 1``.

    Example:
        >>> q = TurboQuantProd(128, 3, seed=0)
        >>> codes = q.quantize(torch.randn(8, 128))
        >>> q.dequantize(codes).shape
        torch.Size([8, 128])
    """

    def __init__(
        self, d: int, bits: int, *, rotation: RotationKind | Rotation = "hadamard", seed: int = 0
    ) -> None:
        check_bits(bits)
        if bits < 2:
            raise ValueError(
                "TurboQuantProd needs bits >= 2 (one bit goes to QJL); use TurboQuantMSE for 1 bit"
            )
        self.d, self.bits = d, bits
        self.mse = TurboQuantMSE(d, bits - 1, rotation=rotation, seed=seed)
        gen = torch.Generator().manual_seed(int(seed) + 1)
        self.S = torch.randn(d, d, generator=gen, dtype=torch.float32)

    def quantize(self, x: torch.Tensor, *, nonfinite: NonFinite = "raise") -> ProdCodes:
        x32, bad = _prepare(x, self.d, nonfinite)
        codes = self.mse.quantize(x32, nonfinite=nonfinite)
        residual = x32 - self.mse.dequantize(codes)
        signs = (residual @ self.S.to(x32.device).T) >= 0
        rnorm = residual.norm(dim=-1)
        if bad is not None:
            codes = MSECodes(codes.idx, torch.where(bad, torch.full_like(codes.gamma, math.nan), codes.gamma))
            rnorm = torch.where(bad, torch.full_like(rnorm, math.nan), rnorm)
        return ProdCodes(mse=codes, signs=signs, residual_norm=rnorm)

    def dequantize(self, codes: ProdCodes) -> torch.Tensor:
        """Decode to float32 `[..., d]`; inner products with it are unbiased estimates."""
        s = self.S.to(codes.signs.device)
        pm1 = codes.signs.to(torch.float32) * 2 - 1
        qjl = (pm1 @ s) * (math.sqrt(math.pi / 2) / self.d) * codes.residual_norm[..., None]
        return self.mse.dequantize(codes.mse) + qjl


def top_rms_channels(x: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the ``n`` channels (last dim) of ``x`` with the largest RMS: calibration of outliers."""
    check_float_tensor(x, "x")
    if not 0 <= n <= x.shape[-1]:
        raise ValueError(f"n must be in 0..{x.shape[-1]}, got {n}")
    rms = x.to(torch.float32).reshape(-1, x.shape[-1]).pow(2).mean(0)
    return torch.sort(torch.topk(rms, n).indices).values


class OutlierSplitQuantizer:
    """Two independent TurboQuant instances: outlier channels at ``bits_outlier``, the rest at ``bits``.

    The paper's fractional configurations: ``(n_o * b_o + (d - n_o) * b) / d`` bits per channel plus two
    norms, e.g. 2.5 bits at d = 128 with 64 outlier channels at 3 bits and 64 others at 2 bits.

    Args:
        d: dimension.
        outlier_channels: 1-D integer tensor of channel indices (e.g. from :func:`top_rms_channels`).
        bits_outlier: bits for the outlier channels.
        bits: bits for the other channels.
        seed: base seed; the two parts use ``seed`` and ``seed + 1``.
    """

    def __init__(
        self,
        d: int,
        outlier_channels: torch.Tensor,
        bits_outlier: int,
        bits: int,
        *,
        seed: int = 0,
        norm_correction: bool = False,
    ) -> None:
        check_head_dim(d)
        ch = torch.as_tensor(outlier_channels, dtype=torch.int64).flatten()
        if ch.numel() < 2 or ch.numel() > d - 2 or ch.unique().numel() != ch.numel():
            raise ValueError(
                f"outlier_channels must be 2..{d - 2} distinct channel indices, got {ch.numel()}"
            )
        if int(ch.min()) < 0 or int(ch.max()) >= d:
            raise ValueError(f"outlier_channels must lie in 0..{d - 1}")
        mask = torch.zeros(d, dtype=torch.bool)
        mask[ch] = True
        self.d = d
        self.outliers = torch.nonzero(mask).flatten()
        self.regular = torch.nonzero(~mask).flatten()
        self.q_out = TurboQuantMSE(
            int(self.outliers.numel()),
            bits_outlier,
            rotation="haar",
            seed=seed,
            norm_correction=norm_correction,
        )
        self.q_reg = TurboQuantMSE(
            int(self.regular.numel()), bits, rotation="haar", seed=seed + 1, norm_correction=norm_correction
        )

    @property
    def bits_per_coordinate(self) -> float:
        return (self.q_out.d * self.q_out.bits + self.q_reg.d * self.q_reg.bits) / self.d

    def quantize(self, x: torch.Tensor, *, nonfinite: NonFinite = "raise") -> tuple[MSECodes, MSECodes]:
        check_float_tensor(x, "x")
        check_last_dim(x, self.d, "x")
        dev = x.device
        x32 = x.to(torch.float32)
        return (
            self.q_out.quantize(x32[..., self.outliers.to(dev)], nonfinite=nonfinite),
            self.q_reg.quantize(x32[..., self.regular.to(dev)], nonfinite=nonfinite),
        )

    def dequantize(self, codes: tuple[MSECodes, MSECodes]) -> torch.Tensor:
        a, b = self.q_out.dequantize(codes[0]), self.q_reg.dequantize(codes[1])
        out = torch.empty(*a.shape[:-1], self.d, dtype=torch.float32, device=a.device)
        out[..., self.outliers.to(a.device)] = a
        out[..., self.regular.to(a.device)] = b
        return out
