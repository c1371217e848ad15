"""pytest configuration for tq-core: hardware markers and the skips that go with them.

`slow` tests run by default (deselect them with `-m "not slow"`); `gpu`, `hopper` and `multi_gpu`
tests skip themselves on machines without the hardware they need.
"""

from __future__ import annotations

import pytest

from tq_core.testing import hardware_skips, register_markers


def pytest_configure(config: pytest.Config) -> None:
    register_markers(config)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item, reason in hardware_skips(items):
        item.add_marker(pytest.mark.skip(reason=reason))
