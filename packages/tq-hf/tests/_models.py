"""Tiny random models of the families tq-hf serves, built from configs (no downloads), and helpers."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 256
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=512,
)


def tiny_model(family: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A float32 model in eval mode with random weights (``torch.manual_seed(seed)``)."""
    family_defaults: dict[str, dict[str, Any]] = {
        "mistral": {"sliding_window": 16},
        # alternating sliding/full layers, logit soft-capping
        "gemma2": {"num_hidden_layers": 4, "sliding_window": 16, "query_pre_attn_scalar": 64},
        # 5 sliding : 1 full, head_dim 128
        "gemma3": {
            "num_hidden_layers": 6,
            "sliding_window": 16,
            "head_dim": 128,
            "query_pre_attn_scalar": 128,
            "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
        },
    }
    kw = {**COMMON, **family_defaults.get(family, {}), **overrides}
    if family == "llama":
        cfg, cls = LlamaConfig(**kw), LlamaForCausalLM
    elif family == "qwen2":
        cfg, cls = Qwen2Config(**kw), Qwen2ForCausalLM
    elif family == "qwen3":
        cfg, cls = Qwen3Config(**kw), Qwen3ForCausalLM
    elif family == "mistral":
        cfg, cls = MistralConfig(**kw), MistralForCausalLM
    elif family == "gemma2":
        cfg, cls = Gemma2Config(**kw), Gemma2ForCausalLM
    elif family == "gemma3":
        cfg, cls = Gemma3TextConfig(**kw), Gemma3ForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    return model


def reference_attention(family: str) -> str:
    """transformers' own attention to compare with (sdpa cannot soft-cap)."""
    return "eager" if family == "gemma2" else "sdpa"


def cache_kwarg(model: torch.nn.Module) -> str:
    """``cache`` (transformers >= 5.24, which deprecates ``past_key_values``) or ``past_key_values``: the
    name forward/generate take."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def stored_layer(
    prompt,
    steps,
    *,
    dtype=torch.float32,
    pads=None,
    window=None,
    residual=8,
    chunk=8,
    seed=0,
    device="cpu",
    backend="auto",
    fmt="turboquant_4bit_nc",
):
    """Layer 0 of a one-layer TurboQuantCache (head_dim 64, 2 KV heads) after a random prompt of
    ``prompt`` tokens stored with left padding ``pads`` and ``steps`` single-token updates.

    Returns (layer, pads on ``device`` or None)."""
    from tq_core import named_format
    from tq_hf import TurboQuantCache

    kw = {**COMMON, "num_hidden_layers": 1, **({"sliding_window": window} if window else {})}
    d, hkv = kw["head_dim"], kw["num_key_value_heads"]
    cache = TurboQuantCache(
        LlamaConfig(**kw),
        named_format(fmt, d) if isinstance(fmt, str) else fmt,
        residual_length=residual,
        chunk_tokens=chunk,
        fused_attention=True,
        backend=backend,
    )
    g = torch.Generator().manual_seed(seed)
    b = 1 if pads is None else len(pads)

    def kv(t):
        return torch.randn(b, hkv, t, d, generator=g).to(device), torch.randn(b, hkv, t, d, generator=g).to(
            device
        )

    cache.update(*kv(prompt), 0)
    pads_dev = None if pads is None else torch.tensor(pads, device=device)
    cache.layers[0].flush_pending(pads, pads_dev)
    for _ in range(steps):
        cache.update(*kv(1), 0)
    return cache.layers[0], pads_dev
