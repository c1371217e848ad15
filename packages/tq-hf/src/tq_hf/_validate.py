"""Checks of the arguments of :class:`~tq_hf.cache.TurboQuantCache` and
:class:`~tq_hf.cache.TurboQuantLayer`, run when they are created.

A wrong argument fails there, with the allowed range and what to do: ``TypeError`` for a value of the
wrong type, ``ValueError`` for one out of range; never deep inside torch at the first forward.

Example:
    >>> check_options(
    ...     residual_length=64, chunk_tokens=128, max_cache_len=None, backend="auto", fused_attention=None
    ... )
    (64, 128, None)
    >>> check_options(
    ...     residual_length=2.5, chunk_tokens=128, max_cache_len=None, backend="auto", fused_attention=None
    ... )  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: residual_length must be an int, got float 2.5; it is the number of newest tokens ...
"""

from __future__ import annotations

import operator
import os
from collections.abc import Mapping, Sequence
from importlib.util import find_spec
from typing import Any

from tq_core import KVFormat, named_format

__all__ = [
    "BACKENDS",
    "MAX_CHUNK_TOKENS",
    "MAX_RESIDUAL_LENGTH",
    "as_int",
    "check_config",
    "check_layer_args",
    "check_options",
    "check_triton",
    "layer_format_specs",
    "resolve_format",
]

# The residual window is allocated in full at the first forward (batch x KV heads x residual_length x
# head_dim, for keys and for values, in the model's dtype, per layer) and attended exactly at every
# decode step; 64K tokens is far beyond any useful window and still an allocation that fits.
MAX_RESIDUAL_LENGTH = 65536
# Compressed storage is allocated, and read by the decode kernel, in whole chunks: every sequence holds
# at least one chunk per layer and sliding-window layers keep a spare chunk beyond their window.
MAX_CHUNK_TOKENS = 4096
BACKENDS = ("auto", "torch", "triton")
# what a multi-token forward over a filled cache attends of its own tokens (TurboQuantCache's chunk_kv)
CHUNK_KV_MODES = ("exact", "compressed")


def as_int(value: Any, name: str, *, low: int, high: int | None = None, hint: str = "") -> int:
    """``value`` as an int in ``[low, high]``: TypeError for a non-integer (bools and floats included),
    ValueError out of range; ``hint`` (what the argument means, what to pass) ends both messages."""
    tail = f"; {hint}" if hint else ""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool {value!r}{tail}")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}{tail}") from None
    if number < low or (high is not None and number > high):
        allowed = f">= {low}" if high is None else f"between {low} and {high}"
        raise ValueError(f"{name} must be {allowed}, got {number}{tail}")
    return number


def _context_length(cfg: Any) -> int | None:
    n = getattr(cfg, "max_position_embeddings", None)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def check_options(
    *,
    residual_length: Any,
    chunk_tokens: Any,
    max_cache_len: Any,
    backend: Any,
    fused_attention: Any,
    chunk_kv: Any = "exact",
    config: Any = None,
) -> tuple[int, int, int | None]:
    """Validate the storage options; returns ``(residual_length, chunk_tokens, max_cache_len)`` as ints.

    ``residual_length`` is at most :data:`MAX_RESIDUAL_LENGTH`, ``max_cache_len`` when given, and the
    model's context length (``config.max_position_embeddings``) when the config has one.
    """
    if isinstance(backend, str):
        if backend not in BACKENDS:
            raise ValueError(
                f"backend must be 'auto' (Triton kernels for CUDA tensors, the tq_core reference otherwise), "
                f"'triton' or 'torch', got {backend!r}"
            )
    else:
        raise TypeError(f"backend must be one of {BACKENDS} (a string), got {type(backend).__name__}")
    if fused_attention is not None and not isinstance(fused_attention, bool):
        raise TypeError(
            "fused_attention must be None (detect the 'turboquant' attention on the first forward), True or "
            f"False (always hand dequantized K/V to attention), got {type(fused_attention).__name__} "
            f"{fused_attention!r}"
        )
    if chunk_kv not in CHUNK_KV_MODES:
        raise ValueError(
            f"chunk_kv must be one of {CHUNK_KV_MODES}: what a multi-token forward over a filled cache "
            "attends of its own tokens with the turboquant attention, 'exact' (as computed, the default) or "
            f"'compressed' (as the cache stores them), got {chunk_kv!r}"
        )
    if max_cache_len is not None:
        max_cache_len = as_int(
            max_cache_len,
            "max_cache_len",
            low=1,
            hint="it preallocates compressed storage for that many tokens per sequence; pass None to grow "
            "the storage as needed",
        )
    chunk_tokens = as_int(
        chunk_tokens,
        "chunk_tokens",
        low=1,
        high=MAX_CHUNK_TOKENS,
        hint="compressed storage is allocated and read by the decode kernel in chunks of this many tokens "
        "(every sequence holds at least one chunk per layer, so large chunks only waste memory); the "
        "default is 128, 16 to 256 is typical",
    )
    residual_length = as_int(
        residual_length,
        "residual_length",
        low=0,
        hint="it is the number of newest tokens each layer keeps uncompressed (default 64)",
    )
    never = "since a longer window would never compress anything"
    limits = [(MAX_RESIDUAL_LENGTH, "tq-hf's cap (tq_hf.MAX_RESIDUAL_LENGTH)")]
    context = _context_length(config)
    if context is not None:
        limits.append((context, f"the model's context length (config.max_position_embeddings), {never}"))
    if max_cache_len is not None:
        limits.append((max_cache_len, f"max_cache_len, the tokens this cache is sized for, {never}"))
    limit, what = min(limits)
    if residual_length > limit:
        raise ValueError(
            f"residual_length={residual_length} is too large: it must be at most {limit}, {what}. The "
            "residual window keeps the newest tokens of every layer uncompressed and is allocated in full at "
            "the first forward (batch x KV heads x residual_length x head_dim, for keys and for values). "
            "Pass a smaller residual_length (default 64, 16 to 256 is typical), or use transformers' "
            "DynamicCache to keep every token uncompressed"
        )
    return residual_length, chunk_tokens, max_cache_len


def check_layer_args(
    fmt: Any, layer_idx: Any, num_kv_heads: Any, sliding_window: Any, **options: Any
) -> tuple[int, int, int | None]:
    """:class:`~tq_hf.cache.TurboQuantLayer`'s own arguments plus :func:`check_options`."""
    if not isinstance(fmt, KVFormat):
        raise TypeError(
            f"fmt must be a tq_core KVFormat (e.g. tq_core.named_format('turboquant_4bit_nc', head_dim)), "
            f"got {type(fmt).__name__}"
        )
    as_int(layer_idx, "layer_idx", low=0)
    as_int(num_kv_heads, "num_kv_heads", low=1)
    if sliding_window is not None:
        as_int(sliding_window, "sliding_window", low=1, hint="or None for a full-attention layer")
    return check_options(**options)


def check_triton(backend: str) -> None:
    """The Triton kernels ``backend`` asks for can be imported (``"auto"`` asks when CUDA is available)."""
    if find_spec("triton") is None:
        raise ImportError(
            f"backend={backend!r} runs tq_kernels' Triton kernels on CUDA, but Triton is not installed: "
            "install it (pip install triton; CUDA builds of torch bring it), or pass backend='torch' for the "
            "(slow) tq_core reference path"
        )


def check_config(config: Any) -> None:
    """``config`` is a config object (or a model), not a name, a path or a dict."""
    if config is None or isinstance(config, (str, bytes, os.PathLike, Mapping)):
        raise TypeError(
            "config must be the model's transformers config (model.config, or "
            "transformers.AutoConfig.from_pretrained(name)) or the model itself, got "
            f"{type(config).__name__} {config!r:.80}"
        )


def resolve_format(spec: Any, head_dim: int, where: str) -> KVFormat:
    """The :class:`~tq_core.KVFormat` that ``spec`` (a named format or a KVFormat) stands for."""
    if isinstance(spec, KVFormat):
        if spec.head_dim != head_dim:
            raise ValueError(
                f"{where}: format has head_dim {spec.head_dim}, the model has {head_dim}; build it for "
                f"head_dim {head_dim} or pass its name (e.g. 'turboquant_4bit_nc')"
            )
        return spec
    if isinstance(spec, str):
        try:
            return named_format(spec, head_dim)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    raise TypeError(
        f"{where}: a format is the name of a tq_core format (tq_core.format_names(), e.g. "
        f"'turboquant_4bit_nc') or a tq_core.KVFormat, got {type(spec).__name__} {spec!r}"
    )


def layer_format_specs(format: Any, layer_formats: Any, num_layers: int) -> list[tuple[Any, str]]:
    """The format spec of every layer and where it came from (for error messages)."""
    default = [(format, "format")] * num_layers
    if layer_formats is None:
        return default
    if isinstance(layer_formats, (str, KVFormat)):
        raise TypeError(
            "layer_formats takes per-layer overrides: a mapping {layer_idx: format}, a sequence with one "
            "format per layer or a callable layer_idx -> format. For one format in every layer, pass it as "
            f"format= (the second argument), got layer_formats={layer_formats!r}"
        )
    if isinstance(layer_formats, Mapping):
        specs = list(default)
        for key, spec in layer_formats.items():
            if isinstance(key, bool) or not hasattr(type(key), "__index__"):
                raise TypeError(
                    f"layer_formats keys are layer indices (int), got {type(key).__name__} {key!r}"
                )
            idx = operator.index(key)
            if not 0 <= idx < num_layers:
                raise ValueError(
                    f"layer_formats has an entry for layer {idx}, but the model has {num_layers} layers: "
                    f"indices go from 0 to {num_layers - 1} (negative indices are not accepted). Remove the "
                    "entry or correct its index"
                )
            specs[idx] = (spec, f"layer_formats[{idx}]")
        return specs
    if callable(layer_formats):
        return [(layer_formats(i), f"layer_formats({i})") for i in range(num_layers)]
    if isinstance(layer_formats, Sequence):
        if len(layer_formats) != num_layers:
            raise ValueError(
                f"layer_formats has {len(layer_formats)} entries for {num_layers} layers: give one format per "
                "layer, or a mapping {layer_idx: format} to override only some layers"
            )
        return [(spec, f"layer_formats[{i}]") for i, spec in enumerate(layer_formats)]
    raise TypeError(
        "layer_formats must be None, a mapping {layer_idx: format}, a sequence with one format per layer or "
        f"a callable layer_idx -> format, got {type(layer_formats).__name__}"
    )
