"""Patch ``backend_selection``: tq-vllm's own dtypes pick its backend; a forgotten CUSTOM gets a hint.

Target: ``_cached_get_attn_backend`` in ``vllm/v1/attention/selector.py``, the cached function behind
``get_attn_backend`` with the same shape in 0.26-0.34: ``(backend, attn_selector_config,
num_heads=None)``, plus the keyword ``_run_kv_cache_dtype`` (the run's ``--kv-cache-dtype``) from 0.32.
``get_attn_backend`` calls it through the module global, with keywords, once per attention layer, so
replacing the global changes every layer's choice.  The replacement, keyed on the layer's dtype:

1. a layer of a run with one of tq-vllm's own dtypes (``tq_4bit`` ..., vLLM 0.33+) goes to that
   dtype's named backend (``TQ_VLLM_4BIT``) when the user chose no backend or CUSTOM; vLLM's own
   choice walks a fixed list of its backends, so a registered dtype alone finds none.  Uncompressed
   layers of the run (``--kv-cache-dtype-skip-layers``) go there too, as every layer goes to CUSTOM
   with ``--attention-backend CUSTOM``;
2. a ``turboquant_*`` layer that vLLM gives one of its own backends because no backend was chosen
   logs, once per process, that tq-vllm is installed but idle and how to switch to it.

Every other call passes through unchanged.  See the ledger entry in :mod:`tq_vllm.patches` for why,
upstream and removal.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from tq_vllm.presets import DENSE_CACHE_DTYPES, OWN_CACHE_DTYPES, backend_name

__all__ = ["TARGET", "apply", "check", "hint_for", "is_applied", "revert"]

TARGET = "vllm.v1.attention.selector._cached_get_attn_backend"
_MARK = "_tq_vllm_backend_selection"
_log = logging.getLogger("vllm.tq_vllm")
_original: Any = None
_hinted = False


def _selector() -> Any:
    import vllm.v1.attention.selector as selector

    return selector


def check() -> None:
    """Raise if the target is missing or no longer takes ``(backend, attn_selector_config, ...)``."""
    fn = getattr(_selector(), "_cached_get_attn_backend", None)
    if fn is None:
        raise AttributeError(f"{TARGET} does not exist in this vLLM")
    params = list(inspect.signature(getattr(fn, "__wrapped__", fn)).parameters)
    if params[:2] != ["backend", "attn_selector_config"]:
        raise TypeError(f"{TARGET} has an unexpected signature {params}")


def is_applied() -> bool:
    return bool(getattr(_selector()._cached_get_attn_backend, _MARK, False))


def apply() -> bool:
    """Install the replacement; returns False when it was already in place."""
    global _original
    if is_applied():
        return False
    check()
    selector = _selector()
    _original = selector._cached_get_attn_backend
    _select.cache_clear = _original.cache_clear  # type: ignore[attr-defined]  # vLLM's tests call it
    selector._cached_get_attn_backend = _select
    return True


def revert() -> None:
    if is_applied() and _original is not None:
        _selector()._cached_get_attn_backend = _original


def _own_dtype(layer_dtype: Any, run_dtype: Any) -> str | None:
    """The own dtype whose named backend serves this layer, if any."""
    if layer_dtype in OWN_CACHE_DTYPES:
        return str(layer_dtype)
    if (layer_dtype is None or layer_dtype in DENSE_CACHE_DTYPES) and run_dtype in OWN_CACHE_DTYPES:
        return str(run_dtype)
    return None


def _select(backend: Any, attn_selector_config: Any, *args: Any, **kwargs: Any) -> Any:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    layer_dtype = getattr(attn_selector_config, "kv_cache_dtype", None)
    own = _own_dtype(layer_dtype, kwargs.get("_run_kv_cache_dtype", layer_dtype))
    if own is not None and backend in (None, AttentionBackendEnum.CUSTOM):
        named = AttentionBackendEnum.__members__.get(backend_name(own))
        if named is not None:  # registered by tq_vllm.register() in this process
            backend = named
    chosen = _original(backend, attn_selector_config, *args, **kwargs)
    if backend is None and isinstance(layer_dtype, str) and layer_dtype.startswith("turboquant_"):
        _hint(layer_dtype, chosen)
    return chosen


def hint_for(kv_cache_dtype: str, backend_name_: str) -> str:
    """The line logged when a ``turboquant_*`` layer runs on vLLM's ``backend_name_`` backend."""
    from tq_vllm._compat import has_kv_cache_dtype_registry
    from tq_vllm._version import __version__

    own = [name for name, layout in OWN_CACHE_DTYPES.items() if layout == kv_cache_dtype]
    alternative = (
        f", or use --kv-cache-dtype {own[0]} (tq-vllm's own name for this budget: no "
        "--attention-backend needed, and every layer compressed)"
        if own and has_kv_cache_dtype_registry()
        else ""
    )
    return (
        f"tq-vllm {__version__} is installed but idle: --kv-cache-dtype {kv_cache_dtype} runs on vLLM's "
        f"own {backend_name_} attention backend. To serve it with tq-vllm's kernels (same bytes per "
        f"token-head), add --attention-backend CUSTOM{alternative}."
    )


def _hint(kv_cache_dtype: str, chosen: Any) -> None:
    global _hinted
    from tq_vllm.backend import TurboQuantBackend

    if _hinted or (isinstance(chosen, type) and issubclass(chosen, TurboQuantBackend)):
        return
    _hinted = True
    name = chosen.get_name() if hasattr(chosen, "get_name") else str(chosen)
    _log.warning(hint_for(kv_cache_dtype, name))


setattr(_select, _MARK, True)
