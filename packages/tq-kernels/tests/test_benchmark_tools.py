"""The kernel tools beside the benchmarks run on a CPU machine: the ablated decode kernel
(``benchmarks/ablated_decode.py``) under the Triton interpreter, the offline sm_90 compile report
(``benchmarks/aot_report.py``) with Triton's bundled ``ptxas``.

They live outside the package's source (they reuse private kernel pieces and carry experiment knobs the
production op does not), so nothing else would notice when a kernel change breaks them.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _paged import make_paged

from tq_core import named_format
from tq_core.testing import ATTENTION_RTOL, rel_err
from tq_kernels.ops.decode import tq_decode_attention
from tq_kernels.tuning import LaunchConfig

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ablated_decode_without_ablation_is_the_plane_loop():
    ablated = _module("ablated_decode")
    fmt = named_format("turboquant_4bit_nc", 64)
    lens = [37, 5]
    cache, table, _, _ = make_paged(fmt, lens, 2, 16, seed=1)
    q = torch.randn(2, 8, 64)
    seq = torch.tensor(lens, dtype=torch.int32)
    cfg = LaunchConfig(16, 4, 1, nibble=False)
    want = tq_decode_attention(q, cache, table, seq, fmt, config=cfg, num_splits=2)
    got = ablated.ablated_decode_attention(q, cache, table, seq, fmt, ablate=0, config=cfg,
                                           max_seq_len=max(lens), num_splits=2)  # fmt: skip
    assert rel_err(got, want) < ATTENTION_RTOL[torch.float32]
    # an ablation leaves a stage out: its output is not the attention
    fake = ablated.ablated_decode_attention(q, cache, table, seq, fmt, ablate=3, config=cfg,
                                            max_seq_len=max(lens), num_splits=2)  # fmt: skip
    assert rel_err(fake, want) > 0.1
    with pytest.raises(ValueError, match="ablate must be one of"):
        ablated.ablated_decode_attention(q, cache, table, seq, fmt, ablate=4, config=cfg, max_seq_len=40)


@pytest.mark.slow
def test_aot_report_compiles_the_decode_kernel_for_sm90_offline():
    import triton

    if not (Path(triton.__file__).parent / "backends/nvidia/bin/ptxas").exists():
        pytest.skip("this Triton build bundles no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "aot_report.py"), "--formats", "turboquant_4bit_nc", "--configs", "64x4"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("turboquant_4bit_nc"))
    registers = int(row.split()[2])
    assert 32 <= registers <= 255, row  # read off ptxas -v; an sm_90 thread holds at most 255
    assert "HMMA" in row  # the tile loop's instruction mix: the scores and outputs on tensor cores
