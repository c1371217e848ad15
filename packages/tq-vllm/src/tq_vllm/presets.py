"""What the backend serves: kv-cache dtypes, head dims, model dtypes, and the layer index.

Before 0.33 vLLM only accepts its own kv-cache dtype strings (a ``Literal`` it asserts on), so tq-vllm
serves vLLM's four TurboQuant preset names with our formats in the same bytes per token-head
(:func:`tq_core.named_format`), through ``--attention-backend CUSTOM``.  vLLM 0.33 and later let a
plugin register names of its own; there tq-vllm adds :data:`OWN_CACHE_DTYPES` (``tq_4bit`` ...), which
select its backend without ``--attention-backend``.  Layers kept uncompressed (the first and last two
layers with a ``turboquant_*`` dtype, or ``--kv-cache-dtype-skip-layers``) arrive with ``"auto"`` and
are served from a plain cache of the model dtype.

Importing this module imports torch and tq_core, never vLLM or Triton.

Example:
    >>> kv_format("turboquant_4bit_nc", 128).slot_bytes
    134
    >>> kv_format("auto", 128) is None
    True
    >>> kv_format("tq_2bit", 128).slot_bytes
    68
    >>> layer_index("model.layers.7.self_attn.attn")
    7
"""

from __future__ import annotations

import functools
import re

from tq_core.formats import ComponentFormat, KVFormat, named_format
from tq_kernels import SUPPORTED_HEAD_DIMS

__all__ = [
    "COMPRESSED_CACHE_DTYPES",
    "DENSE_CACHE_DTYPES",
    "MODEL_DTYPES",
    "OWN_CACHE_DTYPES",
    "SUPPORTED_HEAD_DIMS",
    "backend_name",
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
# tq-vllm's own names (vLLM 0.33 and later): the layout of the vLLM preset whose byte budget a name
# takes, or (key bits, value bits) for a budget vLLM has no preset for (one code width per component,
# a float16 norm each, no padding: 68 and 164 bytes per token-head at head_dim 128).
OWN_CACHE_DTYPES: dict[str, str | tuple[int, int]] = {
    "tq_k8v4": "turboquant_k8v4",
    "tq_4bit": "turboquant_4bit_nc",
    "tq_k3v4": "turboquant_k3v4_nc",
    "tq_3bit": "turboquant_3bit_nc",
    "tq_5bit": (5, 5),
    "tq_2bit": (2, 2),
}


def is_compressed(kv_cache_dtype: str | None) -> bool:
    """True for the dtypes tq-vllm stores compressed: ``turboquant_*`` and its own ``tq_*`` names."""
    return kv_cache_dtype in COMPRESSED_CACHE_DTYPES or kv_cache_dtype in OWN_CACHE_DTYPES


def backend_name(kv_cache_dtype: str) -> str:
    """The attention backend that serves one of :data:`OWN_CACHE_DTYPES` (``tq_4bit`` -> ``TQ_VLLM_4BIT``).

    Each own name gets a backend of its own (vLLM 0.33+), since vLLM hands a backend's page-size hook
    only the layer's spec, whose quantization mode (``KVQuantMode.CUSTOM``) is the same for every
    registered name; the backend class carries the format.
    """
    if kv_cache_dtype not in OWN_CACHE_DTYPES:
        raise ValueError(
            f"{kv_cache_dtype!r} is not one of tq-vllm's own kv-cache dtypes {list(OWN_CACHE_DTYPES)}"
        )
    return "TQ_VLLM_" + kv_cache_dtype.removeprefix("tq_").upper()


def kv_format(kv_cache_dtype: str, head_dim: int) -> KVFormat | None:
    """The slot format of a layer, or None for an uncompressed (``auto``/bf16/fp16) layer.

    Raises:
        ValueError: for a kv-cache dtype or head dim that tq-vllm does not serve, with the list of
            what it does serve.
    """
    if kv_cache_dtype in DENSE_CACHE_DTYPES:
        return None
    if not is_compressed(kv_cache_dtype):
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} is not served; {describe_support()}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} is not served; {describe_support()}")
    layout = OWN_CACHE_DTYPES.get(kv_cache_dtype, kv_cache_dtype)
    if isinstance(layout, str):
        return named_format(layout, head_dim)
    return _own_format(kv_cache_dtype, head_dim)


@functools.lru_cache(maxsize=64)
def _own_format(kv_cache_dtype: str, head_dim: int) -> KVFormat:
    bits = OWN_CACHE_DTYPES[kv_cache_dtype]
    if isinstance(bits, str):  # a vLLM preset's layout name: named_format serves it
        raise ValueError(f"{kv_cache_dtype} is a vLLM preset layout, not a bit split")
    key_bits, value_bits = bits
    return KVFormat(head_dim, ComponentFormat(key_bits), ComponentFormat(value_bits), name=kv_cache_dtype)


def describe_support() -> str:
    """One sentence listing what the CUSTOM backend serves, for error messages and logs."""
    from tq_vllm._compat import SUPPORTED_RANGE

    return (
        "tq-vllm's attention backends (CUSTOM; TQ_VLLM_* for its own names) serve --kv-cache-dtype "
        f"{', '.join(COMPRESSED_CACHE_DTYPES)} (compressed; on vLLM 0.33+ also its own "
        f"{', '.join(OWN_CACHE_DTYPES)}, no --attention-backend needed) and {'/'.join(DENSE_CACHE_DTYPES)} "
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
