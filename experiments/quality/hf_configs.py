"""The KV-cache configs hf_quality.py measures: tq-hf's TurboQuantCache at every vLLM budget, and
quantize-dequantize caches (fp8, the value-scheme study's variants, outlier split, QJL) for configs the
cache's slot layout cannot hold."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tq_core.baselines import fp8_round, round_to_nearest, vllm_like_keys

PRESETS = ("turboquant_k8v4", "turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_3bit_nc")


@dataclass
class Config:
    kv: str
    bytes_per_token_head: float
    make_cache: Callable[[Any], Any]
    attn: str  # attention implementation for this config
    note: str = ""


# -- quantize-dequantize caches, for configs TurboQuantCache's slot layout cannot hold -----------------
def qdq_cache(model, qdq: Callable[[torch.Tensor, int, str], torch.Tensor]):
    """A cache whose layers store ``qdq(K)``, ``qdq(V)`` (rounded on write, kept in the model dtype).

    Like ``TurboQuantCache`` with ``residual_length=0``: the first forward (the prompt's first chunk)
    attends to its exact K/V; every later forward reads only rounded K/V, its own tokens included.
    """
    from transformers.cache_utils import Cache, DynamicLayer

    class QDQLayer(DynamicLayer):
        def __init__(self, idx: int) -> None:
            super().__init__()
            self.idx = idx

        def update(self, key_states, value_states, *args, **kwargs):
            first = not self.is_initialized
            kq = qdq(key_states, self.idx, "k").to(key_states.dtype)
            vq = qdq(value_states, self.idx, "v").to(value_states.dtype)
            keys, values = super().update(kq, vq, *args, **kwargs)
            return (key_states, value_states) if first else (keys, values)

    return Cache(layers=[QDQLayer(i) for i in range(model.config.num_hidden_layers)])


def fp8_qdq(x: torch.Tensor, layer: int, which: str) -> torch.Tensor:
    return fp8_round(x)  # vLLM's fp8 KV cache without calibration: e4m3 with scale 1 (saturating at +-448)


def format_qdq(fmt, values: str = "format", vllm_bits: tuple[int, int] | None = None):
    """qdq of K and V [B, Hkv, T, d] through a format's exact encode/decode (``KVFormat.encode`` /
    ``decode``: codes, norm rounding and correction as the cache stores them), with two variants for
    the value-scheme study (experiments/quality/attention_error.py): ``values="minmax"`` replaces the
    values by per-token min/max round-to-nearest at the format's value width with a float16 scale and
    zero (the same bytes), and ``vllm_bits`` (key bits, value bits) replaces the keys by a
    re-implementation of vLLM's (plain Hadamard, Lloyd-Max codes, float16 norm, no norm correction) and
    sizes the min/max values as vLLM's preset does."""

    def qdq(x: torch.Tensor, layer: int, which: str) -> torch.Tensor:
        x32 = x.float()
        if which == "v" and values == "minmax":
            bits = fmt.value.bits if vllm_bits is None else vllm_bits[1]
            return round_to_nearest(x32, bits, -1).to(x.dtype)
        if which == "k" and vllm_bits is not None:
            return vllm_like_keys(x32, vllm_bits[0]).to(x.dtype)
        k_hat, v_hat = fmt.decode(fmt.encode(x32, x32, layer=layer), layer=layer)
        return (k_hat if which == "k" else v_hat).to(x.dtype)

    return qdq


def tq_qdq(build: Callable[[torch.Tensor, int, str], Any]):
    """qdq through tq_core quantizers built lazily per (layer, K/V, KV head) from the first K/V seen."""
    quantizers: dict[tuple[int, str, int], Any] = {}

    def qdq(x: torch.Tensor, layer: int, which: str) -> torch.Tensor:
        out = torch.empty_like(x)
        for h in range(x.shape[1]):  # x: [B, Hkv, T, d]
            key = (layer, which, h)
            if key not in quantizers:
                quantizers[key] = build(x[:, h], layer, which)
            q = quantizers[key]
            out[:, h] = q.dequantize(q.quantize(x[:, h].float())).to(x.dtype)
        return out

    return qdq


def outlier_builder(bits_out: int, bits: int, n_out: int):
    from tq_core.quantizers import OutlierSplitQuantizer, top_rms_channels

    def build(x: torch.Tensor, layer: int, which: str):
        # outlier channels calibrated on the first tokens this layer/head sees (the first prompt chunk)
        ch = top_rms_channels(x.reshape(-1, x.shape[-1]), n_out).cpu()
        return OutlierSplitQuantizer(x.shape[-1], ch, bits_out, bits, seed=layer, norm_correction=True)

    return build


def qjl_builder(bits: int):
    from tq_core.quantizers import TurboQuantMSE, TurboQuantProd

    def build(x: torch.Tensor, layer: int, which: str):
        d = x.shape[-1]
        if which == "k":  # keys: (bits-1)-bit MSE + 1-bit QJL on the residual (unbiased inner products)
            return TurboQuantProd(d, bits, seed=layer)
        return TurboQuantMSE(d, bits, seed=layer, norm_correction=True)

    return build


def configs(head_dim: int, residual: int) -> dict[str, Config]:
    from transformers import DynamicCache

    import tq_hf
    from tq_core import ComponentFormat, KVFormat, named_format

    def tq_cache(fmt):
        def make(model):
            try:
                return tq_hf.TurboQuantCache(model.config, fmt, residual_length=residual)
            except ValueError:  # a layout the tq_kernels kernels do not serve: tq_core reference path
                return tq_hf.TurboQuantCache(model.config, fmt, residual_length=residual, backend="torch")

        return make

    d = head_dim
    out = {
        "bf16": Config("bf16", 4 * d, lambda m: DynamicCache(config=m.config), "sdpa"),
        "fp8": Config("fp8_e4m3", 2 * d, lambda m: qdq_cache(m, fp8_qdq), "sdpa", "qdq: e4m3, scale 1"),
    }
    for name in PRESETS:
        fmt = named_format(name, d)
        out[f"ours-{name.removeprefix('turboquant_')}"] = Config(
            name, fmt.slot_bytes, tq_cache(fmt), "turboquant"
        )
    # 2.5 / 3.5 bits per coordinate, two ways: TurboQuantCache's own mixed width (the first half of the
    # rotated coordinates get one more bit), and the paper's outlier-channel split (qdq, not a cache layout)
    for bits in (2, 3):
        comp = ComponentFormat(bits, d // 2)
        fmt = KVFormat(d, comp, comp, 0, name=f"tq_{bits}.5bit")
        out[f"ours-{bits}.5bit"] = Config(
            f"{bits}.5 bits ({bits}b+{d // 2} rotated coords)", fmt.slot_bytes, tq_cache(fmt), "turboquant"
        )
        nbytes = 2 * ((bits * d + d // 2 + 7) // 8 + 4)  # K and V: codes + two float16 norms each
        out[f"ours-{bits}.5bit-outlier"] = Config(
            f"{bits}.5 bits (outlier split {d // 2}@{bits + 1}b + {d // 2}@{bits}b)",
            nbytes,
            lambda m, b=bits: qdq_cache(m, tq_qdq(outlier_builder(b + 1, b, d // 2))),
            "sdpa",
            "qdq with tq_core.OutlierSplitQuantizer; channels calibrated on the first chunk per layer/head",
        )
    # the value-scheme study: every layer rounded on write (qdq), SDPA attention
    for name, vllm_kv in (
        ("turboquant_4bit_nc", (4, 4)),
        ("turboquant_k3v4_nc", (3, 4)),
        ("turboquant_3bit_nc", (3, 3)),
    ):
        fmt = named_format(name, d)
        short = name.removeprefix("turboquant_")
        out[f"qdq-ours-{short}"] = Config(
            name,
            fmt.slot_bytes,
            lambda m, f=fmt: qdq_cache(m, format_qdq(f)),
            "sdpa",
            "qdq: KVFormat encode/decode",
        )
        out[f"qdq-ours-{short}-minmaxV"] = Config(
            f"{name}, values min/max", fmt.slot_bytes, lambda m, f=fmt: qdq_cache(m, format_qdq(f, "minmax")),
            "sdpa", "qdq: our keys; values per-token min/max RTN at our value width, float16 scale and zero",
        )  # fmt: skip
        out[f"qdq-vllm-like-{short}"] = Config(
            f"{name}, vLLM-like", fmt.slot_bytes,
            lambda m, f=fmt, bits=vllm_kv: qdq_cache(m, format_qdq(f, "minmax", vllm_bits=bits)), "sdpa",
            "qdq: Hadamard + Lloyd-Max keys without norm correction, min/max values (vLLM's split of the bytes)",
        )  # fmt: skip
    # QJL variant in the 134 B budget: K = TurboQuantProd 4 bits (3-bit MSE + 1-bit QJL, float16 norm and
    # residual norm), V = TurboQuantMSE 4 bits + float16 norm
    out["ours-qjl-4bit"] = Config(
        "K prod 4b (3b MSE + 1b QJL), V MSE 4b",
        (4 * d // 8 + 4) + (4 * d // 8 + 2),
        lambda m: qdq_cache(m, tq_qdq(qjl_builder(4))),
        "sdpa",
        "qdq with tq_core.TurboQuantProd / TurboQuantMSE",
    )
    return out
