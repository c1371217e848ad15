"""Patch ``full_capacity``: no boundary skip layers for ``turboquant_*`` kv-cache dtypes.

Target: ``TurboQuantConfig.get_boundary_skip_layers`` (a staticmethod in
``vllm/model_executor/layers/quantization/turboquant/config.py``, identical in vLLM 0.26 and 0.32).
``EngineArgs.create_engine_config`` imports the class when it runs and unions the result into
``CacheConfig.kv_cache_dtype_skip_layers``; replacing the staticmethod on the class before that (a
general plugin runs from ``EngineArgs.__post_init__``) leaves the skip list as the user gave it.
The patch applies to every ``turboquant_*`` run of the process, vLLM's own TURBOQUANT backend included.
See the ledger entry in :mod:`tq_vllm.patches` for why, upstream and removal.
"""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["TARGET", "apply", "check", "is_applied", "revert"]

TARGET = "vllm.model_executor.layers.quantization.turboquant.config.TurboQuantConfig.get_boundary_skip_layers"
_MARK = "_tq_vllm_full_capacity"
_original: Any = None


def _config_class() -> Any:
    from vllm.model_executor.layers.quantization.turboquant.config import TurboQuantConfig

    return TurboQuantConfig


def _no_boundary_skip(model_config: Any, n: int = 2) -> list[str]:
    """Replacement: no layer is kept uncompressed by position (the user's own list still applies)."""
    return []


setattr(_no_boundary_skip, _MARK, True)


def check() -> None:
    """Raise if the target is missing or no longer a ``(model_config, n=2)`` staticmethod."""
    cls = _config_class()
    raw = inspect.getattr_static(cls, "get_boundary_skip_layers", None)
    if raw is None:
        raise AttributeError(f"{TARGET} does not exist in this vLLM")
    if not isinstance(raw, staticmethod):
        raise TypeError(f"{TARGET} is no longer a staticmethod")
    params = list(inspect.signature(raw.__func__).parameters)
    if params[:1] != ["model_config"]:
        raise TypeError(f"{TARGET} has an unexpected signature {params}")


def is_applied() -> bool:
    return bool(getattr(_config_class().get_boundary_skip_layers, _MARK, False))


def apply() -> bool:
    """Install the replacement; returns False when it was already in place."""
    global _original
    if is_applied():
        return False
    check()
    cls = _config_class()
    _original = inspect.getattr_static(cls, "get_boundary_skip_layers")
    cls.get_boundary_skip_layers = staticmethod(_no_boundary_skip)
    return True


def revert() -> None:
    if is_applied() and _original is not None:
        _config_class().get_boundary_skip_layers = _original
