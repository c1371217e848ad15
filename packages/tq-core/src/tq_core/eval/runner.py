"""``turboquant eval``: TurboQuant against the paper and against uniform quantization at equal bytes.

Two parts:

* distortion per bit width at d = 128: the codebook's exact ``D_mse`` (sphere law), a Monte Carlo
  measurement through the real quantizer, the paper's value and the ``4^-b`` lower bound;
* for every vLLM byte budget: attention-output relative error of our named format and of a KIVI-style
  round-to-nearest baseline with the same bytes, on real activations (all-MiniLM-L6-v2, head_dim 32)
  and on a synthetic head_dim-128 set with outlier channels.

``sweep`` additionally scores every sensible layout inside each budget; it is how the named layouts
were chosen.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from tq_core.attention import attention_ref
from tq_core.baselines import UniformKVBaseline, uniform_candidates
from tq_core.codebooks import lloyd_max_codebook, mse_lower_bound
from tq_core.eval.activations import (
    AttentionSample,
    check_minilm_ready,
    minilm_activations,
    synthetic_outlier_activations,
)
from tq_core.formats import VLLM_PRESETS, ComponentFormat, KVFormat, budget_bytes, named_format
from tq_core.metrics import attention_relative_error, mse_distortion
from tq_core.quantizers import TurboQuantMSE

__all__ = [
    "PAPER_MSE",
    "EvalData",
    "check_eval_inputs",
    "load_eval_data",
    "distortion_rows",
    "format_rows",
    "sweep_rows",
    "run_eval",
]

PAPER_MSE = {1: 0.3634, 2: 0.1175, 3: 0.0345, 4: 0.0095}

Progress = Callable[[Iterable[Any], str, int], Iterable[Any]]


def _no_progress(it: Iterable[Any], desc: str, total: int) -> Iterable[Any]:
    return it


@dataclass(frozen=True)
class EvalData:
    """Named groups of attention samples that share a head_dim."""

    groups: dict[str, list[AttentionSample]]


def load_eval_data(max_tokens: int = 256, seed: int = 0) -> EvalData:
    """The embedded default: MiniLM activations over the bundled text and the synthetic outlier set."""
    return EvalData(
        groups={
            "minilm": minilm_activations(max_tokens=max_tokens),
            "synthetic-outliers": synthetic_outlier_activations(seed=seed),
        }
    )


def distortion_rows(d: int = 128, num_vectors: int = 20_000, seed: int = 0) -> list[dict[str, Any]]:
    """Exact and measured ``D_mse`` per bit width, with the paper's values and the lower bound."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(num_vectors, d, generator=gen)
    u = u / u.norm(dim=-1, keepdim=True)
    rows = []
    for bits in range(1, 9):
        cb = lloyd_max_codebook(d, bits)
        q = TurboQuantMSE(d, bits, rotation="hadamard", seed=seed)
        rows.append(
            {
                "bits": bits,
                "d": d,
                "mse": cb.mse_per_vector,
                "mse_measured": mse_distortion(u, q.dequantize(q.quantize(u))),
                "mse_gaussian_limit": lloyd_max_codebook(d, bits, "gaussian").mse_per_vector,
                "paper": PAPER_MSE.get(bits),
                "lower_bound": mse_lower_bound(bits),
            }
        )
    return rows


def _tokens_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1)  # [H, T, d] -> [T, H, d]


def _attn_error(
    samples: list[AttentionSample],
    roundtrip: Callable[[AttentionSample, int], tuple[torch.Tensor, torch.Tensor]],
) -> float:
    """Frobenius relative error of attention outputs, pooled over all samples of a group."""
    num = den = 0.0
    for layer, s in enumerate(samples):
        q, k, v = (_tokens_first(t) for t in (s.q, s.k, s.v))
        exact = attention_ref(q, k, v, causal=s.causal)
        kh, vh = roundtrip(s, layer)
        approx = attention_ref(q, _tokens_first(kh), _tokens_first(vh), causal=s.causal)
        err = attention_relative_error(exact, approx)
        num += (err * exact.norm().item()) ** 2
        den += exact.norm().item() ** 2
    return math.sqrt(num / den)


def _tq_roundtrip(fmt: KVFormat) -> Callable[[AttentionSample, int], tuple[torch.Tensor, torch.Tensor]]:
    def rt(s: AttentionSample, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return fmt.decode(fmt.encode(s.k, s.v, layer=layer), layer=layer)

    return rt


def _uniform_roundtrip(
    base: UniformKVBaseline,
) -> Callable[[AttentionSample, int], tuple[torch.Tensor, torch.Tensor]]:
    def rt(s: AttentionSample, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return base.quantize_dequantize(s.k, s.v)

    return rt


def format_rows(data: EvalData, progress: Progress = _no_progress) -> list[dict[str, Any]]:
    """Our named format vs the uniform baseline at every budget, on every data group."""
    work = [(name, group) for name in VLLM_PRESETS for group in data.groups]
    rows = []
    for name, group in progress(work, "formats", len(work)):
        samples = data.groups[group]
        d = samples[0].k.shape[-1]
        fmt = named_format(name, d)
        # The baseline gets every split of the same bytes and keeps its best on this very data.
        base_err, base = min(
            (
                (_attn_error(samples, _uniform_roundtrip(c)), c)
                for c in uniform_candidates(budget_bytes(name, d), d)
            ),
            key=lambda t: t[0],
        )
        rows.append(
            {
                "name": name,
                "bytes_per_token_head": fmt.slot_bytes,
                "head_dim": d,
                "layout": fmt.describe(),
                "attn_rel_err": _attn_error(samples, _tq_roundtrip(fmt)),
                "baseline": base.describe(),
                "baseline_bytes_per_token_head": base.bytes_per_token_head,
                "baseline_rel_err": base_err,
                "data": group,
            }
        )
    return rows


def candidate_layouts(budget: int, d: int) -> list[tuple[ComponentFormat, ComponentFormat]]:
    """Layouts that use a budget well: integer K/V bits plus extra-bit coordinates filling the rest."""
    out = []
    meta = 4  # two float16 norms
    for kb in range(1, 9):
        for vb in range(1, 9):
            spare_bits = (budget - meta) * 8 - d * (kb + vb)
            if spare_bits < 0 or spare_bits >= 2 * d:  # does not fit, or wastes a whole bit per coordinate
                continue
            spare = spare_bits // 8 * 8  # extra-bit coordinates come in multiples of 8
            splits = {(min(spare, d), 0), (0, min(spare, d)), (spare // 16 * 8, spare - spare // 16 * 8)}
            for kh, vh in sorted(splits):
                if (kh and kb == 8) or (vh and vb == 8) or kh > d or vh > d:
                    continue
                for nc in (True, False):
                    out.append(
                        (
                            ComponentFormat(kb, kh, norm_correction=nc),
                            ComponentFormat(vb, vh, norm_correction=nc),
                        )
                    )
    return out


def sweep_rows(data: EvalData, progress: Progress = _no_progress) -> list[dict[str, Any]]:
    """Attention error of every candidate layout per budget, per data group (head_dim 128 budgets)."""
    work = []
    for name in VLLM_PRESETS:
        for group, samples in data.groups.items():
            d = samples[0].k.shape[-1]
            budget = budget_bytes(name, d)
            for key, value in candidate_layouts(budget, d):
                fmt = KVFormat(d, key, value, 0, name=f"{name}/candidate")
                if fmt.used_bytes <= budget:
                    work.append((name, group, fmt))
    rows = []
    for name, group, fmt in progress(work, "sweep", len(work)):
        rows.append(
            {
                "budget": name,
                "data": group,
                "head_dim": fmt.head_dim,
                "key": fmt.key.describe(fmt.head_dim),
                "value": fmt.value.describe(fmt.head_dim),
                "used_bytes": fmt.used_bytes,
                "attn_rel_err": _attn_error(data.groups[group], _tq_roundtrip(fmt)),
            }
        )
    return rows


def check_eval_inputs(max_tokens: int = 256, seed: int = 0) -> None:
    """What :func:`run_eval` checks before any work, in well under a second: the ``eval`` extra is
    installed, ``max_tokens`` is in range and ``seed >= 0``.  Raises ``ValueError`` or
    ``ModuleNotFoundError`` with what to change."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    check_minilm_ready(max_tokens)


def run_eval(
    max_tokens: int = 256, seed: int = 0, sweep: bool = False, progress: Progress = _no_progress
) -> dict[str, Any]:
    """Everything ``turboquant eval`` prints, as a JSON-ready dict."""
    check_eval_inputs(max_tokens, seed)
    data = load_eval_data(max_tokens=max_tokens, seed=seed)
    result: dict[str, Any] = {
        "distortion": distortion_rows(seed=seed),
        "formats": format_rows(data, progress),
        "data": {
            g: {
                "samples": len(s),
                "head_dim": s[0].k.shape[-1],
                "tokens": s[0].k.shape[1],
                "heads": s[0].k.shape[0],
            }
            for g, s in data.groups.items()
        },
    }
    if sweep:
        result["sweep"] = sweep_rows(data, progress)
    return result
