"""KV-cache schemes compared on real models, and their bytes per token and KV head (see README.md).

Every scheme serves the same contract, so the comparison is fair: a forward's own K/V are exact (attention
over the tokens of the current chunk or decode step uses them as computed), and every earlier token is read
back from the scheme's storage, with no exact window:

- ``ours-<preset>``: ``tq_hf.TurboQuantCache(named_format(preset, d), residual_length=0,
  fused_attention=False)`` under SDPA: each layer's update dequantizes the stored past and appends the
  chunk's exact K/V (the fused ``"turboquant"`` attention would read the chunk compressed too).
- ``fp8``, ``vllm-like-<preset>``: :func:`past_qdq_cache`, storage rounded on write, per token
  (``tq_core.baselines.fp8_round`` and ``vllm_like_baseline(preset)``).
- ``kivi-k<b>v<b>``: per-channel keys need whole groups of ``KIVI_GROUP`` tokens, so, as in KIVI, the newest
  tokens of an unfinished group stay exact.  With 64-token chunks and groups of 64, every past token of the
  perplexity task is read rounded; during greedy decoding up to 63 newest tokens are exact.
- ``quanto-<b>bit``: transformers' ``QuantizedCache(backend="quanto", residual_length=0)``, which also
  returns the chunk's own K/V exact and re-quantizes the stored past at every update (its design).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from tq_core import named_format
from tq_core.baselines import UniformKVBaseline, fp8_round, vllm_like_baseline

PRESETS = ("turboquant_k8v4", "turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_3bit_nc")
# presets also measured with the nearest-centroid encoder, to show what the gain search buys
NEAREST_PRESETS = ("turboquant_4bit_nc", "turboquant_3bit_nc")
KIVI_GROUP = 64  # tokens per per-channel key group: one 64-token chunk
QUANTO_GROUP = 64  # transformers' QuantizedCache default q_group_size
KIVI_BITS = ((4, 4), (3, 3), (2, 2))
QUANTO_BITS = (4, 2)


# -- bytes per token and KV head (K + V) ----------------------------------------------------------------
def quanto_bytes(bits: int, head_dim: int, group: int = QUANTO_GROUP) -> float:
    """K and V, each ``bits``-bit codes plus a 16-bit scale and zero point per group of ``group`` values."""
    return 2 * (head_dim * bits / 8 + 4 * head_dim / group)


def kivi(key_bits: int, value_bits: int, head_dim: int) -> UniformKVBaseline:
    """KIVI-style per-channel keys (groups of ``KIVI_GROUP`` tokens), per-token values (tq_core's baseline)."""
    return UniformKVBaseline(head_dim, key_bits, value_bits, KIVI_GROUP)


# -- a cache that stores rounded K/V and hands a forward its own K/V exact ------------------------------
Rounder = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def past_qdq_layer(base: type, rounder: Rounder, group: int) -> Any:
    """A transformers cache layer class (``base``: DynamicLayer or DynamicSlidingWindowLayer) whose stored
    K/V are ``rounder``-ed once they form whole groups of ``group`` tokens (1: every token at once)."""

    class PastQDQLayer(base):  # type: ignore[misc, valid-type]
        done = 0  # absolute position up to which the stored tokens are rounded

        def update(self, key_states, value_states, *args, **kwargs):
            out = super().update(key_states, value_states, *args, **kwargs)  # past as stored, new exact
            total = self.cumulative_length if hasattr(self, "cumulative_length") else self.keys.shape[-2]
            end = self.done + (total - self.done) // group * group
            if end > self.done:
                held = self.keys.shape[-2]
                first = total - held  # absolute position of the stored tensor's index 0
                lo = max(self.done, first) - first
                hi = end - first
                k, v = self.keys.clone(), self.values.clone()
                kq, vq = rounder(k[..., lo:hi, :].float(), v[..., lo:hi, :].float())
                k[..., lo:hi, :], v[..., lo:hi, :] = kq.to(k.dtype), vq.to(v.dtype)
                self.keys, self.values = k, v  # new tensors: ``out`` may alias the old ones
                self.done = end
            return out

    return PastQDQLayer


def past_qdq_cache(config: Any, rounder: Rounder, group: int = 1) -> Any:
    from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    layers = []
    for kind in types:
        if kind == "sliding_attention":
            layers.append(past_qdq_layer(DynamicSlidingWindowLayer, rounder, group)(cfg.sliding_window))
        else:
            layers.append(past_qdq_layer(DynamicLayer, rounder, group)())
    return Cache(layers=layers)


# -- the schemes ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scheme:
    name: str
    preset: str | None  # the vLLM preset whose byte budget it targets, if any
    bytes_per_token_head: float
    make_cache: Callable[[Any], Any]  # model config -> fresh cache
    note: str = ""


def schemes(head_dim: int, model_dtype_bytes: int = 2) -> dict[str, Scheme]:
    """Every scheme at ``head_dim``, baseline first."""
    from transformers import DynamicCache

    d = head_dim
    base = "bf16" if model_dtype_bytes == 2 else "fp32"
    out = {
        base: Scheme(base, None, 2 * d * model_dtype_bytes, lambda c: DynamicCache(config=c)),
        "fp8": Scheme(
            "fp8",
            None,
            2 * d,
            lambda c: past_qdq_cache(c, lambda k, v: (fp8_round(k), fp8_round(v))),
            "e4m3, scale 1 (vLLM's uncalibrated fp8)",
        ),
    }
    for preset in PRESETS:
        short = preset.removeprefix("turboquant_")
        fmt = named_format(preset, d)
        out[f"ours-{short}"] = Scheme(f"ours-{short}", preset, fmt.slot_bytes, _tq_cache(fmt))
        if preset in NEAREST_PRESETS:  # the same slots, encoded as before the gain search
            near = replace(
                fmt, key=replace(fmt.key, gain_search=False), value=replace(fmt.value, gain_search=False)
            )
            out[f"ours-{short}-nearest"] = Scheme(
                f"ours-{short}-nearest", preset, near.slot_bytes, _tq_cache(near),
                "nearest-centroid encoder (ComponentFormat(gain_search=False))",
            )  # fmt: skip
        theirs = vllm_like_baseline(
            preset, d
        )  # Hadamard + Lloyd-Max keys with norm correction (fp8 for k8v4)
        out[f"vllm-like-{short}"] = Scheme(
            f"vllm-like-{short}", preset, theirs.bytes_per_token_head,
            lambda c, b=theirs: past_qdq_cache(c, b.quantize_dequantize),
            "fp8 keys, 4-bit min/max values" if short == "k8v4"
            else "Hadamard + Lloyd-Max keys (float16 norm, norm correction), per-token min/max values",
        )  # fmt: skip
    for kb, vb in KIVI_BITS:
        base_kivi = kivi(kb, vb, d)
        out[f"kivi-k{kb}v{vb}"] = Scheme(
            f"kivi-k{kb}v{vb}", None, base_kivi.bytes_per_token_head,
            lambda c, b=base_kivi: past_qdq_cache(c, b.quantize_dequantize, KIVI_GROUP),
            f"per-channel keys over {KIVI_GROUP}-token groups, per-token values, float16 scale and zero",
        )  # fmt: skip
    for bits in QUANTO_BITS:
        out[f"quanto-{bits}bit"] = Scheme(
            f"quanto-{bits}bit", None, quanto_bytes(bits, d),
            lambda c, b=bits: _quanto_cache(c, b),
            f"transformers QuantizedCache(backend='quanto', nbits={bits}, q_group_size={QUANTO_GROUP}, residual_length=0)",
        )  # fmt: skip
    return out


def _tq_cache(fmt: Any) -> Callable[[Any], Any]:
    def make(config: Any) -> Any:
        import tq_hf

        return tq_hf.TurboQuantCache(config, fmt, residual_length=0, fused_attention=False, backend="torch")

    return make


def _quanto_cache(config: Any, bits: int) -> Any:
    from transformers import QuantizedCache

    return QuantizedCache(
        "quanto", config, nbits=bits, q_group_size=QUANTO_GROUP, residual_length=0, axis_key=0, axis_value=0
    )
