"""`TurboQuantCache`: a transformers `Cache` whose layers keep keys and values TurboQuant-compressed.

Each layer is a :class:`~tq_hf.layer.TurboQuantLayer` (compressed paged tokens plus an exact residual
window of the newest tokens; :mod:`tq_hf.layer` describes the layout).  This module checks at creation
that every layer of the model is attention the cache can serve, picks each layer's format, and stores
the prompts the ``"turboquant"`` attention did not claim.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache

from tq_core import KVFormat
from tq_hf import _validate as _v
from tq_hf.layer import Backend, ChunkKV, CompressedKV, TurboQuantLayer
from tq_kernels import SUPPORTED_HEAD_DIMS

__all__ = ["CompressedKV", "TurboQuantCache", "TurboQuantLayer", "KERNEL_HEAD_DIMS"]

FormatSpec = str | KVFormat
LayerFormats = Mapping[int, FormatSpec] | Sequence[FormatSpec] | Callable[[int], FormatSpec] | None

# head dims the tq_kernels attention kernels are built for (tq-kernels' one list)
KERNEL_HEAD_DIMS = SUPPORTED_HEAD_DIMS
_SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


# -- the cache --------------------------------------------------------------------------------------
def _text_config(config: Any) -> Any:
    if hasattr(config, "config") and not hasattr(config, "num_hidden_layers"):
        config = config.config  # a model
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"TurboQuantCache supports decoder-only models; {getattr(config, 'model_type', '?')} is an "
            "encoder-decoder model"
        )
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    return config


def _model_name(cfg: Any) -> str:
    return str(getattr(cfg, "model_type", None) or type(cfg).__name__)


def _layer_types(cfg: Any) -> list[str]:
    n = getattr(cfg, "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"config of {_model_name(cfg)} has no num_hidden_layers")
    types = getattr(cfg, "layer_types", None)
    if types is None:
        if getattr(cfg, "attention_chunk_size", None) is not None:
            types = ["chunked_attention"] * n
        elif getattr(cfg, "sliding_window", None) is not None:
            types = ["sliding_attention"] * n
        else:
            types = ["full_attention"] * n
    return list(types)


def _check_config(cfg: Any) -> tuple[list[str], int, int, int]:
    """Validate that every layer is attention TurboQuantCache can serve; returns
    (layer_types, num_heads, num_kv_heads, head_dim)."""
    name = _model_name(cfg)
    types = _layer_types(cfg)
    bad = sorted({t for t in types if t not in _SUPPORTED_LAYER_TYPES})
    if bad:
        raise ValueError(
            f"TurboQuantCache cannot serve {name}: layer types {bad} are not supported (supported: "
            f"{list(_SUPPORTED_LAYER_TYPES)})"
        )
    unsupported = {
        "kv_lora_rank": "multi-head latent attention (compressed KV projections)",
        "kv_sharing_modes": "KV sharing between layers",
        "cross_attention_layers": "cross-attention layers",
    }
    for attr, what in unsupported.items():
        if getattr(cfg, attr, None) is not None:
            raise ValueError(f"TurboQuantCache cannot serve {name}: {what} ({attr}) is not supported")
    if getattr(cfg, "num_kv_shared_layers", 0):
        raise ValueError(f"TurboQuantCache cannot serve {name}: KV sharing between layers is not supported")
    if getattr(cfg, "alibi", False) or name in ("bloom", "mpt"):
        raise ValueError(f"TurboQuantCache cannot serve {name}: ALiBi position biases are not supported")
    if getattr(cfg, "is_causal", True) is False:
        raise ValueError(f"TurboQuantCache cannot serve {name}: its attention is not causal")
    num_heads = getattr(cfg, "num_attention_heads", None)
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(
            f"TurboQuantCache cannot serve {name}: its config has no attention heads (num_attention_heads)"
        )
    num_kv = getattr(cfg, "num_key_value_heads", None) or num_heads
    if num_heads % num_kv:
        raise ValueError(
            f"{name}: num_attention_heads ({num_heads}) is not a multiple of num_key_value_heads ({num_kv})"
        )
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
    for attr in ("v_head_dim", "global_head_dim"):
        other = getattr(cfg, attr, None)
        if other is not None and other != head_dim:
            raise ValueError(
                f"TurboQuantCache cannot serve {name}: {attr}={other} differs from head_dim={head_dim} "
                "(one head_dim for keys and values of every layer is required)"
            )
    if "sliding_attention" in types and not isinstance(getattr(cfg, "sliding_window", None), int):
        raise ValueError(f"{name} has sliding_attention layers but no integer sliding_window")
    return types, num_heads, num_kv, head_dim


def _check_kernel_format(fmt: KVFormat, where: str) -> None:
    if fmt.head_dim not in KERNEL_HEAD_DIMS:
        raise ValueError(
            f"{where}: head_dim {fmt.head_dim} has no tq_kernels kernels (supported: {KERNEL_HEAD_DIMS}); "
            "pass backend='torch' for the (slow) tq_core reference path"
        )
    from tq_kernels._format import kernel_format  # the kernels' own check of a format's layout

    try:
        kernel_format(fmt)
    except ValueError as e:
        raise ValueError(f"{where}: {e}; or pass backend='torch' for the tq_core reference path") from e


class TurboQuantCache(Cache):
    """A transformers 5.x `Cache` that keeps keys and values TurboQuant-compressed.

    All but the newest ``residual_length`` tokens of every layer are stored compressed in the given
    tq_core format (``slot_bytes`` per token and KV head, e.g. 134 B instead of 512 B for bf16 at
    head_dim 128); the residual window stays in the model's dtype.  Works with any attention
    implementation (layers are dequantized one at a time); with ``attn_implementation="turboquant"``
    attention reads the compressed bytes directly (fused kernels on GPU).

    Args:
        config: the model's config (or the model); its layer types, heads and head_dim are checked here,
            so an unsupported model fails at creation with an error naming the problem.
        format: a named tq_core format (``tq_core.format_names()``, e.g. ``"turboquant_4bit_nc"``) or a
            `tq_core.KVFormat` for every layer.
        layer_formats: per-layer overrides: a mapping ``{layer_idx: format}`` (indices 0 to
            ``num_hidden_layers - 1``), a sequence with one format per layer, or a callable
            ``layer_idx -> format``.
        residual_length: tokens kept uncompressed per layer (the newest), 0 to
            ``tq_hf.MAX_RESIDUAL_LENGTH`` (65536), and at most the model's ``max_position_embeddings``
            and ``max_cache_len``: the window is allocated in full at the first forward.
        chunk_tokens: granularity of the compressed storage (and the block size the decode kernel
            sees), 1 to ``tq_hf.MAX_CHUNK_TOKENS`` (4096).
        max_cache_len: preallocate compressed storage for this many tokens (>= 1; no reallocation
            below it), or ``None`` to grow as needed.
        backend: ``"triton"`` (tq_kernels; CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"torch"``
            (tq_core reference) or ``"auto"`` (triton on CUDA tensors, torch otherwise).
        fused_attention: ``None`` detects whether the model runs the ``"turboquant"`` attention; ``False``
            always hands full dequantized K/V to attention.
        chunk_kv: what a multi-token forward over a filled cache (a prompt fed in chunks, assisted-decoding
            verification) attends of its own tokens with the ``"turboquant"`` attention: ``"exact"`` (the
            K/V as computed, like transformers' QuantizedCache and tq-vllm's default) or ``"compressed"``
            (as stored, so the result does not depend on how a prompt is cut into chunks).  Earlier tokens
            are read from the compressed store either way; other attention implementations always see the
            forward's own K/V exact.

    Every argument is checked here: a wrong type raises ``TypeError``, a value out of range
    ``ValueError``, each saying what is allowed.

    Example:
        >>> import torch, tq_hf
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(
        ...     hidden_size=128,
        ...     intermediate_size=256,
        ...     num_hidden_layers=2,
        ...     num_attention_heads=4,
        ...     num_key_value_heads=2,
        ...     head_dim=64,
        ...     vocab_size=128,
        ... )
        >>> model = LlamaForCausalLM(cfg).eval()
        >>> model.set_attn_implementation("turboquant")
        >>> cache = tq_hf.TurboQuantCache(model.config, "turboquant_4bit_nc", residual_length=8)
        >>> ids = torch.randint(0, 128, (1, 20))
        >>> # past_key_values=cache before transformers 5.24
        >>> out = model.generate(ids, cache=cache, max_new_tokens=4, do_sample=False)  # doctest: +SKIP
        >>> cache.get_seq_length()  # doctest: +SKIP
        23
    """

    def __init__(
        self,
        config: Any,
        format: FormatSpec = "turboquant_4bit_nc",
        *,
        layer_formats: LayerFormats = None,
        residual_length: int = 64,
        chunk_tokens: int = 128,
        max_cache_len: int | None = None,
        backend: Backend = "auto",
        fused_attention: bool | None = None,
        chunk_kv: ChunkKV = "exact",
    ) -> None:
        _v.check_config(config)
        cfg = _text_config(config)
        types, num_heads, num_kv, head_dim = _check_config(cfg)
        residual_length, chunk_tokens, max_cache_len = _v.check_options(
            residual_length=residual_length,
            chunk_tokens=chunk_tokens,
            max_cache_len=max_cache_len,
            backend=backend,
            fused_attention=fused_attention,
            chunk_kv=chunk_kv,
            config=cfg,
        )
        check_kernels = backend == "triton" or (backend == "auto" and torch.cuda.is_available())
        if check_kernels:
            _v.check_triton(backend)
        _v.resolve_format(format, head_dim, "format")
        specs = _v.layer_format_specs(format, layer_formats, len(types))
        self.formats: list[KVFormat] = []
        self._pending: set[int] = set()
        layers: list[TurboQuantLayer] = []
        for i, (kind, (spec, where)) in enumerate(zip(types, specs, strict=True)):
            fmt = _v.resolve_format(spec, head_dim, where)
            if check_kernels:
                _check_kernel_format(fmt, f"layer {i} ({_model_name(cfg)})")
            self.formats.append(fmt)
            layers.append(
                TurboQuantLayer(
                    fmt,
                    i,
                    num_kv_heads=num_kv,
                    sliding_window=cfg.sliding_window if kind == "sliding_attention" else None,
                    residual_length=residual_length,
                    chunk_tokens=chunk_tokens,
                    max_cache_len=max_cache_len,
                    backend=backend,
                    fused_attention=fused_attention,
                    chunk_kv=chunk_kv,
                    pending_registry=self._pending,
                )
            )
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv, head_dim
        self.residual_length = residual_length
        super().__init__(layers=layers)  # type: ignore[arg-type]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new K/V `[B, Hkv, T, d]` of layer ``layer_idx`` (see :meth:`TurboQuantLayer.update`)."""
        if self._pending:
            # a layer whose prompt is still pending after the next layer started: its attention was not
            # the turboquant one, so store the prompt now (no per-row padding shift)
            for idx in [i for i in self._pending if i != layer_idx]:
                self.tq_layers[idx].flush_pending()
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @property
    def tq_layers(self) -> list[TurboQuantLayer]:
        """The layers, typed."""
        return self.layers  # type: ignore[return-value]

    def flush_pending(self) -> None:
        """Store every layer's pending prompt tokens now."""
        for idx in list(self._pending):
            self.tq_layers[idx].flush_pending()

    @property
    def nbytes(self) -> int:
        """Bytes allocated by all layers (compressed slots, preallocated headroom and residual windows)."""
        return sum(layer.nbytes for layer in self.tq_layers)

    @property
    def used_bytes(self) -> int:
        """Bytes holding live tokens."""
        return sum(layer.used_bytes for layer in self.tq_layers)

    def dense_bytes(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes a `DynamicCache` would hold for the same tokens in ``dtype`` (sliding layers capped at
        their window, as `DynamicCache` does)."""
        total = 0
        for layer in self.tq_layers:
            if not layer.is_initialized:
                continue
            n = layer.cumulative_length
            if layer.sliding_window is not None:
                n = min(n, layer.sliding_window - 1)
            total += 2 * layer.batch_size * layer.num_kv_heads * n * layer.head_dim * dtype.itemsize
        return total

    def __repr__(self) -> str:
        names = sorted({f.name or f.describe() for f in self.formats})
        return (
            f"TurboQuantCache({len(self.layers)} layers, formats={names}, residual_length="
            f"{self.residual_length}, seq_length={self.get_seq_length()})"
        )
