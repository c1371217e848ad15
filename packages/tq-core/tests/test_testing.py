"""tq_core.testing: the error measure, tolerance tables, poisoned buffers and hardware skips the suites share."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tq_core.testing import (
    ATTENTION_RTOL,
    DEQUANT_RTOL,
    MARKERS,
    POISON_BYTE,
    hardware_skip_reasons,
    hardware_skips,
    poisoned,
    poisoned_like,
    register_markers,
    rel_err,
)


# -- rel_err -----------------------------------------------------------------------------------------
def test_rel_err_is_the_relative_frobenius_error():
    expected = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # norm 5
    actual = expected + torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    assert rel_err(actual, expected) == pytest.approx(0.2)
    assert rel_err(expected, expected) == 0.0
    # relative to the second argument, not symmetric
    assert rel_err(expected, 2 * expected) == pytest.approx(0.5)
    assert rel_err(2 * expected, expected) == pytest.approx(1.0)


def test_rel_err_accepts_16_bit_and_grad_tensors():
    x = torch.randn(64, generator=torch.Generator().manual_seed(0))
    y = x.to(torch.bfloat16)
    assert 0 < rel_err(y, x) < 2.0**-8  # bf16 keeps 8 significant bits
    w = x.clone().requires_grad_(True)
    assert rel_err(w, x) == 0.0


def test_rel_err_float64_sees_what_float32_rounds_away():
    expected = torch.ones(4, dtype=torch.float64)
    actual = expected + 1e-10
    assert rel_err(actual, expected) == 0.0  # 1 + 1e-10 is 1 in float32
    assert rel_err(actual, expected, dtype=torch.float64) == pytest.approx(1e-10, rel=1e-4)


def test_rel_err_of_an_unwritten_poisoned_buffer_fails_any_tolerance():
    want = torch.randn(3, 5)
    got = poisoned_like(want)
    got[:2] = want[:2]  # one row never written
    err = rel_err(got, want)
    assert math.isnan(err)
    assert not err < ATTENTION_RTOL[torch.float32]


def test_rel_err_of_zero_reference_does_not_divide_by_zero():
    assert rel_err(torch.zeros(3), torch.zeros(3)) == 0.0
    assert rel_err(torch.ones(1), torch.zeros(1)) == pytest.approx(1e30, rel=1e-6)


@pytest.mark.parametrize(
    ("actual", "expected", "kwargs", "match"),
    [
        (torch.ones(3), torch.ones(1), {}, "same shape"),
        (torch.ones(2, 3), torch.ones(3), {}, "does not broadcast"),
        ([1.0], torch.ones(1), {}, r"torch\.Tensors"),
        (torch.ones(3), torch.ones(3), {"dtype": torch.float16}, r"float32 or torch\.float64"),
    ],
    ids=["shape", "broadcast", "list", "dtype"],
)
def test_rel_err_rejects_bad_arguments(actual, expected, kwargs, match):
    with pytest.raises(ValueError, match=match):
        rel_err(actual, expected, **kwargs)


# -- tolerance tables --------------------------------------------------------------------------------
def test_tolerance_tables_hold_the_suites_values():
    # The kernels' and plugins' assertions were written against these numbers; loosening one is a
    # decision to make here, with a reason, not a side effect.
    attention = {torch.float32: 2e-3, torch.float16: 4e-3, torch.bfloat16: 2e-2}
    dequant = {torch.float32: 1e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3}
    assert (attention, dequant) == (ATTENTION_RTOL, DEQUANT_RTOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_attention_tolerance_admits_the_output_dtypes_rounding(dtype):
    """A kernel that computes exactly and rounds its output once must pass; twice the tolerance's
    worth of error must not."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(1))
    assert rel_err(x.to(dtype), x) < ATTENTION_RTOL[dtype]
    noise = torch.randn(4096, generator=torch.Generator().manual_seed(2))
    off = x + 2 * ATTENTION_RTOL[dtype] * noise * x.norm() / noise.norm()
    assert not rel_err(off, x) < ATTENTION_RTOL[dtype]


# -- poisoned buffers --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_poisoned_float_buffers_are_all_nan(dtype):
    buf = poisoned((2, 3), dtype=dtype)
    assert buf.shape == (2, 3) and buf.dtype == dtype
    assert bool(buf.isnan().all())


def test_poisoned_uint8_buffers_hold_the_poison_byte():
    buf = poisoned(torch.Size([4, 2]), dtype=torch.uint8)
    assert buf.dtype == torch.uint8 and bool((buf == POISON_BYTE).all())
    assert POISON_BYTE == 0xAB


def test_poisoned_like_copies_shape_dtype_device():
    like = torch.zeros(5, 7, dtype=torch.bfloat16).t()  # non-contiguous source
    buf = poisoned_like(like)
    assert (buf.shape, buf.dtype, buf.device) == (like.shape, like.dtype, like.device)
    assert buf.is_contiguous() and bool(buf.isnan().all())


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool])
def test_poisoned_rejects_dtypes_without_a_poison(dtype):
    with pytest.raises(ValueError, match=r"floating .* or torch\.uint8"):
        poisoned((2,), dtype=dtype)


def test_poisoned_like_rejects_non_tensors():
    with pytest.raises(ValueError, match=r"torch\.Tensor"):
        poisoned_like([1.0, 2.0])


# -- pytest markers and hardware skips ---------------------------------------------------------------
def test_markers_match_the_package_configuration():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    ini = tomllib.loads(pyproject.read_text())["tool"]["pytest"]["ini_options"]["markers"]
    assert sorted(line.split(":")[0] for line in ini) == sorted(MARKERS)


def test_register_markers_adds_one_line_per_marker():
    class Config:
        def __init__(self):
            self.lines = []

        def addinivalue_line(self, name, line):
            self.lines.append((name, line))

    cfg = Config()
    register_markers(cfg)
    assert [line.split(":")[0] for _, line in cfg.lines] == list(MARKERS)
    assert {name for name, _ in cfg.lines} == {"markers"}


def _fake_cuda(monkeypatch, available, capability=(9, 0), count=1):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_hardware_skip_reasons_per_machine(monkeypatch):
    _fake_cuda(monkeypatch, False)
    assert all(reason and "CUDA device" in reason for reason in hardware_skip_reasons().values())
    _fake_cuda(monkeypatch, True, (8, 0), 1)
    reasons = hardware_skip_reasons()
    assert reasons["gpu"] is None
    assert "8.0" in reasons["hopper"] and "found 1" in reasons["multi_gpu"]
    _fake_cuda(monkeypatch, True, (9, 0), 2)
    assert set(hardware_skip_reasons().values()) == {None}


class _Item:
    def __init__(self, *markers):
        self.markers = set(markers)

    def get_closest_marker(self, name):
        return name if name in self.markers else None


def test_hardware_skips_select_only_tests_the_machine_cannot_run(monkeypatch):
    plain, slow, gpu, hopper = _Item(), _Item("slow"), _Item("gpu"), _Item("gpu", "hopper")
    _fake_cuda(monkeypatch, True, (8, 6), 1)
    skips = hardware_skips([plain, slow, gpu, hopper])
    assert [item for item, _ in skips] == [hopper]
    assert "compute capability >= 9.0" in skips[0][1]
    _fake_cuda(monkeypatch, False)
    skipped = [item for item, _ in hardware_skips([plain, slow, gpu, hopper])]
    assert skipped == [gpu, hopper, hopper]  # one skip per marker the machine lacks, as before


def test_importing_testing_needs_neither_pytest_nor_triton():
    code = "import sys, tq_core.testing; print(sorted({'pytest', 'triton'} & set(sys.modules)))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
