"""pytest configuration for tq-hf: Triton interpreter on CPU, hardware markers and their skips.

Without a CUDA device the few tests that run tq_kernels' Triton kernels (``backend="triton"``) need
Triton's interpreter, which must be switched on before anything imports triton; everything else on CPU
uses the tq_core reference path.

`slow` tests run by default (deselect them with `-m "not slow"`); `gpu`, `hopper` and `multi_gpu`
tests skip themselves on machines without the hardware they need.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from tq_core.testing import hardware_skips, register_markers

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/_models.py


def pytest_configure(config: pytest.Config) -> None:
    register_markers(config)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item, reason in hardware_skips(items):
        item.add_marker(pytest.mark.skip(reason=reason))
