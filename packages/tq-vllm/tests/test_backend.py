"""Backend selection and validation as vLLM runs them at startup on a CUDA machine.

vLLM's CUDA platform validates a selected backend with ``validate_configuration`` and raises
``Selected backend CUSTOM is not valid for this configuration. Reason: [...]``.  The CUDA platform
class imports on the CPU build once its compiled-extension import is stubbed and the device capability
is pinned; ``get_attn_backend_cls`` is then the exact code path of a GPU start.
"""

from __future__ import annotations

import sys
import types

import pytest

pytest.importorskip("vllm")

import torch
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm.v1.attention.selector import AttentionSelectorConfig

import tq_vllm
from tq_vllm.backend import TurboQuantBackend
from tq_vllm.presets import COMPRESSED_CACHE_DTYPES, DENSE_CACHE_DTYPES, SUPPORTED_HEAD_DIMS


@pytest.fixture
def cuda_platform(monkeypatch: pytest.MonkeyPatch):
    """vLLM's CudaPlatform class with an H200's capability, importable on a CPU machine."""
    monkeypatch.setitem(
        sys.modules,
        "vllm._C_stable_libtorch",
        sys.modules.get("vllm._C_stable_libtorch") or types.ModuleType("stub"),
    )
    from vllm.platforms.cuda import CudaPlatform
    from vllm.platforms.interface import DeviceCapability

    monkeypatch.setattr(
        CudaPlatform, "get_device_capability", classmethod(lambda cls, device_id=0: DeviceCapability(9, 0))
    )
    tq_vllm.register()
    return CudaPlatform


def _select(platform, **fields) -> str:
    config = dict(head_size=128, dtype=torch.bfloat16, kv_cache_dtype="turboquant_4bit_nc", block_size=None)
    config.update(fields)
    return platform.get_attn_backend_cls(AttentionBackendEnum.CUSTOM, AttentionSelectorConfig(**config))


def test_register_points_custom_at_our_backend() -> None:
    tq_vllm.register()
    backend = AttentionBackendEnum.CUSTOM.get_class()
    assert backend is TurboQuantBackend
    assert AttentionBackendEnum[backend.get_name()] is AttentionBackendEnum.CUSTOM


@pytest.mark.parametrize("kv", [*COMPRESSED_CACHE_DTYPES, *DENSE_CACHE_DTYPES])
def test_selected_for_every_served_kv_cache_dtype(cuda_platform, kv: str) -> None:
    assert _select(cuda_platform, kv_cache_dtype=kv) == tq_vllm.BACKEND_PATH


@pytest.mark.parametrize(
    "fields",
    [
        *({"head_size": d} for d in SUPPORTED_HEAD_DIMS),
        {"dtype": torch.float16},
        {"has_sliding_window": True},
        {"has_sink": True},
        {"block_size": 32},
        {"kv_cache_dtype": "auto", "has_sliding_window": True, "has_sink": True},
    ],
    ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()),
)
def test_selected_for_supported_models(cuda_platform, fields: dict) -> None:
    assert _select(cuda_platform, **fields) == tq_vllm.BACKEND_PATH


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        ({"head_size": 48}, ["head_size not supported", "head_dim=48"]),
        ({"head_size": 512}, ["head_dim=512"]),
        ({"dtype": torch.float32}, ["dtype not supported", "model dtype=float32"]),
        ({"kv_cache_dtype": "fp8"}, ["kv_cache_dtype not supported", "kv_cache_dtype='fp8'"]),
        ({"kv_cache_dtype": "int8_per_token_head"}, ["kv_cache_dtype='int8_per_token_head'"]),
        ({"use_mla": True}, ["MLA not supported", "an MLA model"]),
        ({"attn_type": "encoder_only"}, ["attention type 'encoder_only'"]),
        ({"block_size": 24}, ["block_size not supported"]),
    ],
    ids=["head48", "head512", "fp32", "fp8", "int8", "mla", "encoder", "block24"],
)
def test_startup_error_names_the_problem_and_what_is_supported(
    cuda_platform, fields: dict, names: list[str]
) -> None:
    with pytest.raises(ValueError, match=r"Selected backend .*CUSTOM is not valid") as err:
        _select(cuda_platform, **fields)
    message = str(err.value)
    for name in names:
        assert name in message
    for supported in (
        "turboquant_4bit_nc",
        "head_dim 64, 80, 96, 112, 128, 160, 192, 256",
        "float16 or bfloat16",
    ):
        assert supported in message


def test_supported_head_dims_are_the_kernels_own_list() -> None:
    """One source: the plugin and the launchers' checks use tq-kernels' list itself, not a copy."""
    import tq_kernels
    from tq_kernels.ops import _attn_checks

    assert SUPPORTED_HEAD_DIMS is tq_kernels.SUPPORTED_HEAD_DIMS is _attn_checks.SUPPORTED_HEAD_DIMS


def test_compute_capability_below_ampere_is_rejected() -> None:
    from vllm.platforms.interface import DeviceCapability

    assert TurboQuantBackend.supports_compute_capability(DeviceCapability(8, 0))
    assert not TurboQuantBackend.supports_compute_capability(DeviceCapability(7, 5))
    assert TurboQuantBackend.supports_compute_capability(None)  # the CPU platform
