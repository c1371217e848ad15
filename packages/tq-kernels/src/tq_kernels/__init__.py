"""Triton kernels for TurboQuant KV-cache compression.

`tq_kernels` holds the GPU side of TurboQuant: `@triton.jit` bodies under `_kernels/` and typed
launchers under `ops/` that validate their inputs, pick a grid and launch. Every kernel is checked
against the pure-torch reference of the same math in `tq_core`.

Example:
    >>> import tq_kernels
    >>> isinstance(tq_kernels.__version__, str)
    True
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tq-kernels")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0.0.0+unknown"

# The head dims the attention kernels (decode, extend) are built for: the one list tq-hf and tq-vllm
# check against (importing it loads neither torch nor Triton)
SUPPORTED_HEAD_DIMS = (64, 80, 96, 112, 128, 160, 192, 256)

__all__ = ["SUPPORTED_HEAD_DIMS", "__version__"]
