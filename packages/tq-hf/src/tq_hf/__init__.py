"""TurboQuant compressed KV cache for Hugging Face transformers.

`tq_hf` plugs TurboQuant into transformers: a `Cache` whose layers keep keys and values compressed
(normalized, rotated, quantized per coordinate with a Lloyd-Max codebook and bit-packed, with the
norm kept beside them) and an attention function that reads them through `tq_kernels`.

Example:
    >>> import tq_hf
    >>> isinstance(tq_hf.__version__, str)
    True
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tq-hf")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
