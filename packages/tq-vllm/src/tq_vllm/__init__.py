"""vLLM plugin that serves with a TurboQuant compressed KV cache.

vLLM finds this package through the `vllm.general_plugins` entry point `tq_vllm = "tq_vllm:register"`
and calls `register()` in each of its processes. Importing `tq_vllm` must stay light and must not
import vLLM: a general plugin that fails to import breaks every vLLM start in that environment.

Example:
    >>> import tq_vllm
    >>> tq_vllm.register()
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tq-vllm")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "register"]


def register() -> None:
    """Register the TurboQuant attention backend with vLLM.

    vLLM calls this once in every process it starts (engine core, workers), through the
    `vllm.general_plugins` entry point. It is a placeholder for now and registers nothing: the
    backend, its impl and metadata builder land in this package before this function wires them in.
    It must never raise for a missing optional piece; vLLM treats a failing plugin as fatal.

    Example:
        >>> import tq_vllm
        >>> tq_vllm.register()  # safe to call any number of times, with or without vLLM installed
    """
