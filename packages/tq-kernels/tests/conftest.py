"""pytest configuration for tq-kernels: Triton interpreter on CPU, hardware markers and their skips.

Without a CUDA device the Triton kernels cannot compile, so the suite runs them under Triton's
interpreter (`TRITON_INTERPRET=1`), which executes the `@triton.jit` bodies with numpy/torch on the
CPU. Triton reads that variable when kernels are defined (at import of the modules that hold them),
so it is set here, before any test module imports `tq_kernels` and through it `triton`; setting it
inside a test would be too late. `import torch` does not import Triton, so asking torch whether CUDA
is present first is safe.

`slow` tests run by default (deselect them with `-m "not slow"`); `gpu`, `hopper` and `multi_gpu`
tests skip themselves on machines without the hardware they need.
"""

from __future__ import annotations

import os

import pytest
import torch

from tq_core.testing import hardware_skips, register_markers

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_configure(config: pytest.Config) -> None:
    register_markers(config)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item, reason in hardware_skips(items):
        item.add_marker(pytest.mark.skip(reason=reason))
