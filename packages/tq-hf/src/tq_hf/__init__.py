"""TurboQuant compressed KV cache for Hugging Face transformers.

`tq_hf` plugs TurboQuant into transformers 5.x: :class:`TurboQuantCache`, a `Cache` whose layers keep
keys and values compressed (rotated, quantized per coordinate with a Lloyd-Max codebook and bit-packed,
norm kept beside them) apart from a small residual window of recent tokens, and the ``"turboquant"``
attention implementation, which reads the compressed bytes through `tq_kernels` (registered with
transformers' ``AttentionInterface`` on import).

Example:
    >>> import tq_hf
    >>> isinstance(tq_hf.__version__, str)
    True
    >>> tq_hf.ATTENTION_NAME
    'turboquant'
"""

from importlib.metadata import PackageNotFoundError, version

from tq_hf._validate import MAX_CHUNK_TOKENS, MAX_RESIDUAL_LENGTH
from tq_hf.attention import (
    ATTENTION_NAME,
    dense_attention,
    register,
    turboquant_attention_forward,
    turboquant_mask,
)
from tq_hf.cache import CompressedKV, TurboQuantCache, TurboQuantLayer

try:
    __version__ = version("tq-hf")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0.0.0+unknown"

register()

__all__ = [
    "ATTENTION_NAME",
    "MAX_CHUNK_TOKENS",
    "MAX_RESIDUAL_LENGTH",
    "CompressedKV",
    "TurboQuantCache",
    "TurboQuantLayer",
    "__version__",
    "dense_attention",
    "register",
    "turboquant_attention_forward",
    "turboquant_mask",
]
