"""Round-to-nearest uniform KV quantization (KIVI-style), the baseline TurboQuant must beat at equal bytes.

Keys are quantized per channel over groups of ``group_tokens`` consecutive tokens (a float16 scale and
zero point per channel per group), values per token (a float16 scale and zero point per token), both
asymmetric min-max round-to-nearest.  Bytes per token-head::

    ceil(d * key_bits / 8) + 4 * d / group_tokens + ceil(d * value_bits / 8) + 4
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tq_core._validate import check_bits, check_float_tensor, check_head_dim
from tq_core.packing import packed_bytes

__all__ = ["UniformKVBaseline", "round_to_nearest", "uniform_baseline_for_budget", "uniform_candidates"]

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
