"""The equal-bytes baselines TurboQuant must beat, one copy for the CLI, the quality scripts and the tests.

* KIVI-style round-to-nearest (:class:`UniformKVBaseline`): keys are quantized per channel over groups of
  ``group_tokens`` consecutive tokens (a float16 scale and zero point per channel per group), values per
  token (a float16 scale and zero point per token), both asymmetric min-max round-to-nearest.  Bytes per
  token-head::

      ceil(d * key_bits / 8) + 4 * d / group_tokens + ceil(d * value_bits / 8) + 4

* vLLM-like (:class:`VLLMLikeBaseline`): vLLM's own TurboQuant presets as its documentation describes them,
  re-implemented from tq_core's pieces (not vLLM's code): keys rotated by the plain normalized Hadamard
  matrix, Lloyd-Max codes and a float16 norm (fp8 keys for ``turboquant_k8v4``), values per-token min/max
  round-to-nearest with a float16 scale and zero point; the slot is vLLM's (:func:`tq_core.budget_bytes`).

* vLLM's uncalibrated fp8 cache (:func:`fp8_round`): e4m3 with scale 1.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from tq_core._validate import check_bits, check_float_tensor, check_head_dim
from tq_core.codebooks import lloyd_max_codebook
from tq_core.packing import packed_bytes
from tq_core.presets import VLLM_PRESETS

__all__ = [
    "UniformKVBaseline",
    "VLLMLikeBaseline",
    "fp8_round",
    "round_to_nearest",
    "uniform_baseline_for_budget",
    "uniform_candidates",
    "vllm_like_baseline",
    "vllm_like_keys",
]

_GROUPS = (32, 64, 128, 256, 512)


def round_to_nearest(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Quantize and dequantize ``x`` with asymmetric min-max round-to-nearest along ``dim``.

    Each slice along ``dim`` gets ``2**bits`` levels between its minimum and maximum, with the zero
    point (the minimum) and the scale ``(max - min) / (2**bits - 1)`` rounded to float16, as a cache
    storing them in float16 would.  This is the uniform quantizer of :class:`UniformKVBaseline`
    (``dim=-2`` over a token group for keys per channel, ``dim=-1`` for values per token) and of the
    vLLM-like baseline's values, for scripts that build other equal-bytes baselines from it.

    Args:
        x: float16/bfloat16/float32/float64 tensor, at least one dimension.
        bits: bits per element, 1..8.
        dim: the dimension the minimum and maximum run along (negative counts from the end).

    Returns:
        The reconstruction, float32 (float64 for float64 input), ``x``'s shape.

    Raises:
        ValueError: for a non-float tensor, ``bits`` outside 1..8 or ``dim`` out of range.

    Example:
        >>> x = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
        >>> round_to_nearest(x, 2, -1)  # 4 levels: exact
        tensor([[0., 1., 2., 3.]])
        >>> round_to_nearest(x, 1, -1)  # 2 levels: the minimum and the maximum
        tensor([[0., 0., 3., 3.]])
    """
    check_float_tensor(x, "x")
    check_bits(bits, "bits")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(
            f"dim must be an integer in {-x.dim()}..{x.dim() - 1} for x of shape {tuple(x.shape)}, got {dim!r}"
        )
    lo = x.amin(dim=dim, keepdim=True).to(torch.float16).to(torch.float32)
    hi = x.amax(dim=dim, keepdim=True)
    levels = 2**bits - 1
    scale = ((hi - lo) / levels).to(torch.float16).to(torch.float32).clamp_min(1e-8)
    q = torch.clamp(torch.round((x - lo) / scale), 0, levels)
    return q * scale + lo


@dataclass(frozen=True)
class UniformKVBaseline:
    """KIVI-style uniform quantization of K (per channel, token groups) and V (per token).

    Example:
        >>> base = uniform_baseline_for_budget(134, 128)
        >>> (base.key_bits, base.value_bits, base.bytes_per_token_head <= 134)
        (4, 4, True)
    """

    head_dim: int
    key_bits: int
    value_bits: int
    group_tokens: int = 128

    def __post_init__(self) -> None:
        check_head_dim(self.head_dim, "head_dim")
        check_bits(self.key_bits, "key_bits")
        check_bits(self.value_bits, "value_bits")
        if self.group_tokens < 1:
            raise ValueError(f"group_tokens must be >= 1, got {self.group_tokens}")

    @property
    def bytes_per_token_head(self) -> float:
        d = self.head_dim
        return (
            packed_bytes(d, self.key_bits) + 4 * d / self.group_tokens + packed_bytes(d, self.value_bits) + 4
        )

    def describe(self) -> str:
        return f"RTN K{self.key_bits}/ch(g{self.group_tokens}) V{self.value_bits}/tok"

    def quantize_dequantize(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Round-trip K and V `[..., seq_len, d]` (token groups run along ``seq_len``); float32 out."""
        check_float_tensor(k, "k")
        check_float_tensor(v, "v")
        if k.shape != v.shape or k.shape[-1] != self.head_dim or k.dim() < 2:
            raise ValueError(
                f"k and v must both be [..., seq_len, {self.head_dim}], got {tuple(k.shape)}, "
                f"{tuple(v.shape)}"
            )
        k32, v32 = k.to(torch.float32), v.to(torch.float32)
        kq = torch.empty_like(k32)
        t = k32.shape[-2]
        for s in range(0, t, self.group_tokens):
            kq[..., s : s + self.group_tokens, :] = round_to_nearest(
                k32[..., s : s + self.group_tokens, :], self.key_bits, -2
            )
        return kq, round_to_nearest(v32, self.value_bits, -1)


def uniform_candidates(budget: float, head_dim: int) -> list[UniformKVBaseline]:
    """Every sensible KIVI-style split of ``budget``: for each (key bits, value bits) that fits, the
    smallest token group that fits, keeping only splits with no whole bit left unspent on either side."""
    check_head_dim(head_dim, "head_dim")
    fits = {}
    for kb in range(1, 9):
        for vb in range(1, 9):
            for g in _GROUPS:
                cand = UniformKVBaseline(head_dim, kb, vb, g)
                if cand.bytes_per_token_head <= budget:
                    fits[(kb, vb)] = cand
                    break
    out = [c for (kb, vb), c in fits.items() if (kb + 1, vb) not in fits and (kb, vb + 1) not in fits]
    if not out:
        raise ValueError(f"no uniform configuration fits {budget} bytes at head_dim {head_dim}")
    return out


def uniform_baseline_for_budget(budget: float, head_dim: int) -> UniformKVBaseline:
    """The most balanced KIVI-style split of ``budget`` (max of min(key bits, value bits), then keys)."""
    return max(
        uniform_candidates(budget, head_dim), key=lambda c: (min(c.key_bits, c.value_bits), c.key_bits)
    )


# -- vLLM's fp8 cache and its TurboQuant presets, re-implemented ------------------------------------------
FP8_MAX = 448.0  # the largest float8_e4m3fn


def fp8_round(x: torch.Tensor) -> torch.Tensor:
    """Round ``x`` to float8 e4m3 with scale 1 and back, as vLLM's fp8 KV cache without calibration stores
    it: values beyond +-448 saturate.  Returns ``x``'s dtype and shape.

    Example:
        >>> fp8_round(torch.tensor([0.1, 1000.0]))
        tensor([1.0156e-01, 4.4800e+02])
    """
    check_float_tensor(x, "x")
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype)


@functools.lru_cache(maxsize=16)
def _hadamard(d: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix of order ``d`` (a power of two) divided by sqrt(d), float32."""
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / h.shape[0] ** 0.5


def _check_power_of_two(d: int, what: str) -> None:
    if d & (d - 1):
        raise ValueError(
            f"{what} needs a power-of-two head_dim (a plain Hadamard rotation), got {d}; vLLM's presets "
            f"serve head dims 64, 128 and 256"
        )


def vllm_like_keys(k: torch.Tensor, bits: int, *, norm_correction: bool = False) -> torch.Tensor:
    """Keys ``[..., d]`` round-tripped as vLLM's TurboQuant presets store them: rotated by the plain
    normalized Hadamard matrix, quantized to the ``bits``-bit Lloyd-Max codebook of the sphere at ``d``,
    with a float16 norm.

    Args:
        k: float tensor ``[..., d]``, ``d`` a power of two.
        bits: code bits per coordinate, 1..8.
        norm_correction: rescale the centroid vector to unit norm before applying the stored norm (vLLM's
            ``_nc`` presets); without it the reconstruction's norm is the centroid vector's times the norm.

    Returns:
        The reconstruction, float32, ``k``'s shape.

    Raises:
        ValueError: a non-float ``k``, ``bits`` outside 1..8 or a last dimension that is not a power of two.

    Example:
        >>> k = torch.randn(4, 128)
        >>> k_hat = vllm_like_keys(k, 4, norm_correction=True)
        >>> bool(torch.allclose(k_hat.norm(dim=-1), k.norm(dim=-1).half().float(), rtol=1e-5))
        True
    """
    check_float_tensor(k, "k")
    check_bits(bits, "bits")
    if k.dim() < 1:
        raise ValueError("k must have a last dimension (the head_dim)")
    d = k.shape[-1]
    _check_power_of_two(d, "vllm_like_keys")
    k = k.to(torch.float32)
    hm = _hadamard(d).to(k.device)
    norm = k.norm(dim=-1, keepdim=True)
    y = (k / (norm + 1e-8)) @ hm
    cb = lloyd_max_codebook(d, bits)
    idx = torch.bucketize(y, cb.boundaries.to(y.device, y.dtype))
    c = cb.centroids.to(y.device, y.dtype)[idx]
    if norm_correction:
        c = c / c.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return norm.to(torch.float16).float() * (c @ hm.T)


@dataclass(frozen=True)
class VLLMLikeBaseline:
    """vLLM's TurboQuant scheme at one split of the bytes, for equal-bytes comparisons.

    Keys: ``key_bits``-bit Lloyd-Max codes after a plain Hadamard rotation and a float16 norm
    (:func:`vllm_like_keys`), or raw fp8 (:func:`fp8_round`) when ``key_bits`` is 8, as ``turboquant_k8v4``.
    Values: ``value_bits``-bit per-token min/max round-to-nearest with a float16 scale and zero point
    (:func:`round_to_nearest` along the last dimension).  Its bytes are vLLM's at any ``head_dim``;
    round-tripping Lloyd-Max keys needs a power-of-two ``head_dim`` (the plain Hadamard matrix).

    Example:
        >>> base = vllm_like_baseline("turboquant_4bit_nc", 128)
        >>> (base.key_bits, base.value_bits, base.bytes_per_token_head)
        (4, 4, 134)
        >>> k_hat, v_hat = base.quantize_dequantize(torch.randn(2, 16, 128), torch.randn(2, 16, 128))
    """

    head_dim: int
    key_bits: int
    value_bits: int
    norm_correction: bool = True

    def __post_init__(self) -> None:
        check_head_dim(self.head_dim, "head_dim")
        check_bits(self.key_bits, "key_bits")
        check_bits(self.value_bits, "value_bits")
        if not isinstance(self.norm_correction, bool):
            raise ValueError(f"norm_correction must be a bool, got {self.norm_correction!r}")

    @property
    def bytes_per_token_head(self) -> int:
        """vLLM's slot: key codes (+ a float16 norm unless fp8), value codes + float16 scale and zero
        point, rounded up to an even size."""
        d = self.head_dim
        key = d if self.key_bits == 8 else packed_bytes(d, self.key_bits) + 2
        slot = key + packed_bytes(d, self.value_bits) + 4
        return slot + slot % 2

    def describe(self) -> str:
        key = "K fp8" if self.key_bits == 8 else f"K{self.key_bits} Hadamard+Lloyd-Max"
        return f"vLLM-like {key}{' nc' if self.norm_correction else ''} V{self.value_bits}/tok"

    def quantize_dequantize(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Round-trip K and V ``[..., d]`` (every token on its own); float32 out (fp8 keys keep ``k``'s dtype)."""
        check_float_tensor(k, "k")
        check_float_tensor(v, "v")
        if k.shape[-1:] != (self.head_dim,) or v.shape[-1:] != (self.head_dim,):
            raise ValueError(
                f"k and v must both be [..., {self.head_dim}], got {tuple(k.shape)}, {tuple(v.shape)}"
            )
        if self.key_bits == 8:
            k_hat = fp8_round(k)
        else:
            k_hat = vllm_like_keys(k, self.key_bits, norm_correction=self.norm_correction)
        return k_hat, round_to_nearest(v, self.value_bits, -1)


def vllm_like_baseline(preset: str, head_dim: int = 128, *, norm_correction: bool = True) -> VLLMLikeBaseline:
    """The vLLM-like baseline of vLLM's preset ``preset`` (its key and value bits, its slot bytes).

    Example:
        >>> vllm_like_baseline("turboquant_k3v4_nc").describe()
        'vLLM-like K3 Hadamard+Lloyd-Max nc V4/tok'
    """
    if not isinstance(preset, str) or preset not in VLLM_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(VLLM_PRESETS)}")
    kb, vb, _ = VLLM_PRESETS[preset]
    return VLLMLikeBaseline(head_dim, kb, vb, norm_correction)
