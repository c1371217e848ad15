"""What the CUSTOM backend serves: kv-cache dtypes, head dims, model dtypes, and the layer index.

vLLM only accepts its own kv-cache dtype strings (a ``Literal`` it asserts on), so tq-vllm serves
vLLM's four TurboQuant preset names with our formats in the same bytes per token-head
(:func:`tq_core.named_format`).  Layers that vLLM keeps uncompressed (the first and last two layers
with a ``turboquant_*`` dtype, or ``--kv-cache-dtype-skip-layers``) arrive with ``"auto"`` and are
served from a plain cache of the model dtype.

Importing this module imports torch and tq_core, never vLLM or Triton.

Example:
    >>> kv_format("turboquant_4bit_nc", 128).slot_bytes
    134
    >>> kv_format("auto", 128) is None
    True
    >>> layer_index("model.layers.7.self_attn.attn")
    7
"""

from __future__ import annotations

import re

from tq_core.formats import KVFormat, named_format
from tq_kernels import SUPPORTED_HEAD_DIMS

__all__ = [
    "COMPRESSED_CACHE_DTYPES",
    "DENSE_CACHE_DTYPES",
    "MODEL_DTYPES",
    "SUPPORTED_HEAD_DIMS",
    "describe_support",
    "is_compressed",
    "kv_format",
    "layer_index",
]

# vLLM's preset names; each is served with tq_core's format of the same name and byte budget.
COMPRESSED_CACHE_DTYPES = (
    "turboquant_k8v4",
    "turboquant_4bit_nc",
    "turboquant_k3v4_nc",
    "turboquant_3bit_nc",
)
# Uncompressed layers: vLLM's boundary skip layers and any layer the user keeps at the model dtype.
DENSE_CACHE_DTYPES = ("auto", "bfloat16", "float16")
MODEL_DTYPES = ("float16", "bfloat16")


def is_compressed(kv_cache_dtype: str | None) -> bool:
    """True for the ``turboquant_*`` dtypes tq-vllm stores compressed."""
    return kv_cache_dtype in COMPRESSED_CACHE_DTYPES


def kv_format(kv_cache_dtype: str, head_dim: int) -> KVFormat | None:
    """The slot format of a layer, or None for an uncompressed (``auto``/bf16/fp16) layer.

    Raises:
        ValueError: for a kv-cache dtype or head dim that tq-vllm does not serve, with the list of
            what it does serve.
    """
    if kv_cache_dtype in DENSE_CACHE_DTYPES:
        return None
    if kv_cache_dtype not in COMPRESSED_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} is not served; {describe_support()}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} is not served; {describe_support()}")
    return named_format(kv_cache_dtype, head_dim)


def describe_support() -> str:
    """One sentence listing what the CUSTOM backend serves, for error messages and logs."""
    from tq_vllm._compat import SUPPORTED_RANGE

    return (
        "tq-vllm's CUSTOM attention backend serves --kv-cache-dtype "
        f"{', '.join(COMPRESSED_CACHE_DTYPES)} (compressed) and {'/'.join(DENSE_CACHE_DTYPES)} "
        f"(uncompressed boundary layers); head_dim {', '.join(map(str, SUPPORTED_HEAD_DIMS))}; "
        f"model dtype {' or '.join(MODEL_DTYPES)}; causal decoder self-attention only (no MLA, no "
        f"encoder or cross attention, no ALiBi, no fused output quantization); vLLM {SUPPORTED_RANGE}"
    )


_INT_PART = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")


def layer_index(layer_name: str) -> int:
    """The layer number in a vLLM layer name, which selects the layer's rotation.

    The first dotted integer component counts (``"model.layers.7.self_attn.attn"`` -> 7); a name
    without one is layer 0.  Store and attention of a layer use the same name, so any deterministic
    rule is correct; this one matches vLLM's ``extract_layer_index`` wherever that is defined.
    """
    match = _INT_PART.search(layer_name)
    return int(match.group(1)) if match else 0
