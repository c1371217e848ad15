"""Helpers for testing kernels and integrations against the tq_core reference, like :mod:`torch.testing`.

The test suites of tq-core, tq-kernels, tq-hf and tq-vllm share these, so that the error measure, the
tolerance each comparison allows and the hardware markers are written once:

* :func:`rel_err`: relative RMS error ``||actual - expected|| / ||expected||``, the measure every
  comparison of dequantized values or attention outputs uses (codes compare exactly instead).
* :data:`ATTENTION_RTOL` and :data:`DEQUANT_RTOL`: per-dtype bounds of :func:`rel_err` for a kernel
  against the tq_core reference on the same compressed cache.  A test that needs a looser bound says
  why next to it.
* :func:`poisoned` / :func:`poisoned_like`: fresh output buffers filled with NaN (floating dtypes) or
  :data:`POISON_BYTE` (uint8 caches), so that an element a kernel never writes fails the comparison.
* :data:`MARKERS`, :func:`register_markers` and :func:`hardware_skips`: the pytest markers every suite
  knows (``slow``, ``gpu``, ``hopper``, ``multi_gpu``, ``benchmark``) and the skips of the hardware
  markers on machines without the hardware, for the packages' ``conftest.py``.

Pure torch: importing this module imports neither pytest nor triton.

Example:
    >>> import torch
    >>> from tq_core.testing import ATTENTION_RTOL, poisoned_like, rel_err
    >>> want = torch.randn(4, 8)
    >>> got = poisoned_like(want)
    >>> _ = got.copy_(want)
    >>> rel_err(got, want) < ATTENTION_RTOL[torch.float32]
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, TypeVar

import torch

__all__ = [
    "rel_err",
    "ATTENTION_RTOL",
    "DEQUANT_RTOL",
    "POISON_BYTE",
    "poisoned",
    "poisoned_like",
    "MARKERS",
    "HARDWARE_MARKERS",
    "hardware_skip_reasons",
    "register_markers",
    "hardware_skips",
]

# Relative RMS error (:func:`rel_err`) allowed between a kernel's attention output and tq_core's
# reference attention over the same compressed cache.  Both decode identical codes; the differences are
# accumulation order, the rotation GEMMs and the float16 operands the kernels feed tensor cores, so
# float32 errors are ~1e-6 and the 16-bit bounds are set by the output dtype's rounding.
ATTENTION_RTOL: dict[torch.dtype, float] = {torch.float32: 2e-3, torch.float16: 4e-3, torch.bfloat16: 2e-2}
# Relative RMS error allowed between a kernel's dequantized K/V and ``KVFormat.decode`` cast to the same
# dtype.  In float32 they differ by accumulation order only (~1e-7); that can flip the final rounding of
# an element by one ulp of a 16-bit dtype, rarely.
DEQUANT_RTOL: dict[torch.dtype, float] = {torch.float32: 1e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3}
# Bytes of never-written cache slots: not a valid slot of any format to rely on, and easy to spot.
POISON_BYTE = 0xAB

_REL_ERR_DTYPES = (torch.float32, torch.float64)


def rel_err(actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> float:
    """Relative RMS error ``||actual - expected||_F / ||expected||_F``, computed in ``dtype``.

    NaN anywhere in ``actual`` (an unwritten :func:`poisoned` element, say) gives NaN, which fails any
    ``rel_err(...) < tol`` assertion.  An all-zero ``expected`` divides by 1e-30 instead of 0.

    Args:
        actual: the tensor under test, any shape and dtype.
        expected: the reference, the same shape (no broadcasting).
        dtype: ``torch.float32`` (default) or ``torch.float64`` for both operands and the norms.

    Returns:
        The ratio as a Python float.

    Raises:
        ValueError: if the arguments are not tensors of the same shape, or ``dtype`` is not float32/64.

    Example:
        >>> import torch
        >>> rel_err(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]))
        0.0
        >>> round(rel_err(torch.tensor([3.0, 0.0]), torch.tensor([4.0, 0.0])), 3)
        0.25
    """
    if not isinstance(actual, torch.Tensor) or not isinstance(expected, torch.Tensor):
        raise ValueError(
            f"actual and expected must be torch.Tensors, got {type(actual).__name__} and "
            f"{type(expected).__name__}"
        )
    if actual.shape != expected.shape:
        raise ValueError(
            f"actual and expected must have the same shape, got {tuple(actual.shape)} and "
            f"{tuple(expected.shape)}; index or reshape them first (rel_err does not broadcast)"
        )
    if dtype not in _REL_ERR_DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    a, b = actual.detach().to(dtype), expected.detach().to(dtype)
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def poisoned(
    shape: Sequence[int] | torch.Size, *, dtype: torch.dtype, device: torch.device | str | None = None
) -> torch.Tensor:
    """A fresh buffer a kernel is to fill: NaN for floating dtypes, :data:`POISON_BYTE` for uint8.

    An element the kernel does not write keeps the poison, so a comparison with :func:`rel_err` (NaN)
    or an equality of bytes fails instead of passing on whatever memory ``torch.empty`` returned.

    Args:
        shape: the buffer's shape.
        dtype: a floating dtype or ``torch.uint8``.
        device: where to allocate it (default: torch's current default device).

    Raises:
        ValueError: for any other dtype (integers have no value that cannot be a valid result).

    Example:
        >>> import torch
        >>> poisoned((2,), dtype=torch.float16)
        tensor([nan, nan], dtype=torch.float16)
        >>> poisoned((2,), dtype=torch.uint8).tolist()
        [171, 171]
    """
    if dtype == torch.uint8:
        return torch.full(tuple(shape), POISON_BYTE, dtype=dtype, device=device)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"poisoned buffers are floating (filled with NaN) or torch.uint8 (filled with "
            f"{POISON_BYTE:#x}), got dtype {dtype}"
        )
    return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)


def poisoned_like(like: torch.Tensor) -> torch.Tensor:
    """:func:`poisoned` with ``like``'s shape, dtype and device (a fresh contiguous tensor).

    Example:
        >>> import torch
        >>> poisoned_like(torch.zeros(3)).isnan().all().item()
        True
    """
    if not isinstance(like, torch.Tensor):
        raise ValueError(f"like must be a torch.Tensor, got {type(like).__name__}")
    return poisoned(like.shape, dtype=like.dtype, device=like.device)


# -- pytest markers (used by the packages' conftest.py; no pytest import here) ----------------------
# Also listed under [tool.pytest.ini_options] in each package's pyproject.toml. Registering them from
# conftest.py too keeps them known when pytest runs under another rootdir, e.g. several packages in one
# call.
MARKERS: dict[str, str] = {
    "slow": "statistical or long-running checks; run by default, deselect with -m 'not slow'",
    "gpu": "needs a CUDA device; skipped without one",
    "hopper": "needs a CUDA device of compute capability 9.0 or newer (H100/H200)",
    "multi_gpu": "needs two or more CUDA devices",
    "benchmark": "a timing benchmark (pytest-benchmark)",
}
HARDWARE_MARKERS = ("gpu", "hopper", "multi_gpu")


def hardware_skip_reasons() -> dict[str, str | None]:
    """Why each of :data:`HARDWARE_MARKERS` cannot run on this machine, or None where it can.

    Example:
        >>> sorted(hardware_skip_reasons())
        ['gpu', 'hopper', 'multi_gpu']
    """
    if not torch.cuda.is_available():
        no_cuda = "needs a CUDA device (torch.cuda.is_available() is False)"
        return dict.fromkeys(HARDWARE_MARKERS, no_cuda)
    major, minor = torch.cuda.get_device_capability(0)
    count = torch.cuda.device_count()
    return {
        "gpu": None,
        "hopper": None if major >= 9 else f"needs compute capability >= 9.0, device 0 has {major}.{minor}",
        "multi_gpu": None if count >= 2 else f"needs two or more CUDA devices, found {count}",
    }


class _Config(Protocol):
    def addinivalue_line(self, name: str, line: str) -> None: ...


class _Marked(Protocol):
    def get_closest_marker(self, name: str) -> object: ...


_Item = TypeVar("_Item", bound=_Marked)


def register_markers(config: _Config) -> None:
    """Register :data:`MARKERS` with pytest; call it from ``pytest_configure(config)``.

    Example:
        >>> class Config:
        ...     lines = []
        ...
        ...     def addinivalue_line(self, name, line):
        ...         self.lines.append(line)
        >>> register_markers(cfg := Config())
        >>> cfg.lines[1]
        'gpu: needs a CUDA device; skipped without one'
    """
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")


def hardware_skips(items: Iterable[_Item]) -> list[tuple[_Item, str]]:
    """``(item, reason)`` for every collected test whose hardware marker cannot run on this machine.

    Call it from ``pytest_collection_modifyitems`` and add ``pytest.mark.skip(reason=reason)`` to each
    item (this module does not import pytest).

    Example:
        >>> import pytest
        >>> def pytest_collection_modifyitems(config, items):  # in a conftest.py
        ...     for item, reason in hardware_skips(items):
        ...         item.add_marker(pytest.mark.skip(reason=reason))
    """
    reasons = hardware_skip_reasons()
    skips = []
    for item in items:
        for marker, reason in reasons.items():
            if reason is not None and item.get_closest_marker(marker) is not None:
                skips.append((item, reason))
    return skips
