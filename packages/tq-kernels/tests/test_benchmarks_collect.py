"""The GPU benchmarks (``packages/tq-kernels/benchmarks``) import and collect on a CPU machine.

CI has no GPU, so nothing else would notice a benchmark module that no longer imports (a renamed
launcher argument, a moved helper) until the next device run.  Collection runs in its own pytest
process, with the benchmarks' own conftest, as ``nox -s gpu-bench`` runs it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _pytest(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args, str(BENCHMARKS)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_every_benchmark_module_collects():
    proc = _pytest("--collect-only", "-q")
    assert proc.returncode == 0, (
        f"collecting {BENCHMARKS} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    )
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    for module in sorted(BENCHMARKS.glob("bench_*.py")):
        assert any(line.startswith(f"benchmarks/{module.name}::") for line in ids), f"{module.name}: no cases"
    # readable ids: shape and format in the name, one case each
    assert "benchmarks/bench_decode.py::test_decode[B32xL8192-turboquant_4bit_nc]" in ids
    assert "benchmarks/bench_decode.py::test_decode[B32xL8192-bf16]" in ids
    assert len(ids) == len(set(ids))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip on machines without CUDA")
def test_benchmarks_skip_without_cuda_with_the_reason():
    proc = _pytest("-q", "-rs", "-k", "B32xL8192 or T32 or P8192")
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "passed" not in proc.stdout.splitlines()[-1]
    assert "need a CUDA device" in proc.stdout
