"""pytest configuration of the kernel benchmarks: CUDA only, one copy-bandwidth measurement per run.

    pytest packages/tq-kernels/benchmarks --benchmark-only --benchmark-json=.benchmarks/tq-kernels.json
    pytest packages/tq-kernels/benchmarks --benchmark-only -m "not tune"   # without the config sweeps

Without a CUDA device every case is skipped with the reason (they time compiled Triton kernels and CUDA
graphs; the Triton interpreter has no timing worth reporting), and collection still imports every
module, which ``tests/test_benchmarks_collect.py`` checks on CPU.
"""

from __future__ import annotations

import shlex
import sys

import pytest
import torch
from _workload import RUN, environment

from tq_core.testing import register_markers
from tq_kernels.testing import copy_bandwidth_gbps

NO_CUDA = (
    "kernel benchmarks need a CUDA device (they time compiled Triton kernels and CUDA graphs); "
    "run `nox -s gpu-bench` on a GPU machine"
)


def pytest_configure(config: pytest.Config) -> None:
    register_markers(config)
    config.addinivalue_line("markers", "tune: a launch-configuration sweep case; deselect with -m 'not tune'")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not torch.cuda.is_available():
        for item in items:
            item.add_marker(pytest.mark.skip(reason=NO_CUDA))


@pytest.fixture(scope="session")
def copy_gbps() -> float:
    """Device-to-device copy bandwidth of this GPU, measured once per run (GB/s)."""
    RUN["copy_gbps"] = copy_bandwidth_gbps()
    return RUN["copy_gbps"]


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-benchmark: unknown where it is not installed
def pytest_benchmark_update_json(config: pytest.Config, benchmarks: list, output_json: dict) -> None:
    """The run's command, GPU, versions and copy bandwidth at the JSON's top level (bench_report.py)."""
    args = [sys.executable.rsplit("/", 1)[-1], "-m", "pytest", *config.invocation_params.args]
    output_json["command"] = " ".join(shlex.quote(str(a)) for a in args)
    if torch.cuda.is_available():
        output_json["environment"] = environment()
    output_json.update(RUN)
