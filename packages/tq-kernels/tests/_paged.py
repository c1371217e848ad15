"""The kernel tests' name for :func:`tq_kernels.testing.random_paged_cache` (the experiments use it too)."""

from __future__ import annotations

from tq_kernels.testing import random_paged_cache as make_paged

__all__ = ["make_paged"]
