"""The ledger's ``backend_selection`` patch, through vLLM's own ``get_attn_backend`` on its CUDA platform.

A ``turboquant_*`` layer that vLLM gives its own backend because the user chose none (the forgotten
``--attention-backend CUSTOM``) logs one line saying that tq-vllm sits idle and how to switch; with
CUSTOM chosen, or any other dtype, nothing is logged and the choice is vLLM's.  tq-vllm's own dtypes
(vLLM 0.33+) are in ``test_own_dtypes.py``.
"""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("vllm")

import torch
from _platform import use_cuda_platform
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.v1.attention.backends.registry import AttentionBackendEnum

import tq_vllm
from tq_vllm._compat import has_kv_cache_dtype_registry
from tq_vllm.backend import TurboQuantBackend
from tq_vllm.patches import backend_selection
from tq_vllm.presets import COMPRESSED_CACHE_DTYPES


@pytest.fixture
def select(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    """``get_attn_backend`` of vLLM on its CUDA platform (an H100's capability), tq-vllm registered, the
    hint not yet given in this process; returns ``select(kv_cache_dtype, backend=None) -> class``."""
    use_cuda_platform(monkeypatch)
    tq_vllm.register()
    assert backend_selection.is_applied()
    monkeypatch.setattr(backend_selection, "_hinted", False)
    # vLLM's logging setup stops its `vllm` logger (the plugin's parent) from reaching caplog
    monkeypatch.setattr(logging.getLogger("vllm"), "propagate", True)
    caplog.set_level(logging.INFO, logger="vllm.tq_vllm")
    from vllm.config import AttentionConfig
    from vllm.v1.attention import selector

    def run(kv_cache_dtype: str, backend: AttentionBackendEnum | None = None, head_size: int = 128) -> type:
        selector._cached_get_attn_backend.cache_clear()
        config = VllmConfig(attention_config=AttentionConfig(backend=backend))
        with set_current_vllm_config(config):
            return selector.get_attn_backend(head_size, torch.bfloat16, kv_cache_dtype)

    yield run
    selector._cached_get_attn_backend.cache_clear()


def _hints(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "vllm.tq_vllm" and "idle" in r.getMessage()]


@pytest.mark.parametrize("kv", COMPRESSED_CACHE_DTYPES, ids=lambda s: s.removeprefix("turboquant_"))
def test_forgotten_custom_logs_one_line_on_how_to_switch(select, caplog, kv: str) -> None:
    chosen = select(kv)
    select(kv, head_size=64)  # another layer of the same run: still one line
    assert chosen.get_name() == "TURBOQUANT" and not issubclass(chosen, TurboQuantBackend)
    [hint] = _hints(caplog)
    assert "\n" not in hint
    assert f"--kv-cache-dtype {kv} runs on vLLM's own TURBOQUANT attention backend" in hint
    assert "add --attention-backend CUSTOM" in hint
    # where vLLM takes plugin dtypes, the hint also names ours for the same budget
    own = {"turboquant_k8v4": "tq_k8v4", "turboquant_4bit_nc": "tq_4bit"}.get(kv)
    if own is not None:
        assert (f"--kv-cache-dtype {own}" in hint) == has_kv_cache_dtype_registry()


def test_custom_selected_runs_ours_and_stays_quiet(select, caplog) -> None:
    assert select("turboquant_4bit_nc", AttentionBackendEnum.CUSTOM) is TurboQuantBackend
    assert select("auto", AttentionBackendEnum.CUSTOM) is TurboQuantBackend
    assert _hints(caplog) == []


@pytest.mark.parametrize("kv", ["auto", "fp8"])
def test_other_dtypes_keep_vllms_choice_and_stay_quiet(select, caplog, kv: str) -> None:
    patched = select(kv)
    backend_selection.revert()
    try:
        assert select(kv) is patched
    finally:
        backend_selection.apply()
    assert not issubclass(patched, TurboQuantBackend)
    assert _hints(caplog) == []


def test_the_hint_is_one_sentence_naming_the_backend() -> None:
    text = backend_selection.hint_for("turboquant_k3v4_nc", "TURBOQUANT")
    assert text.startswith("tq-vllm ") and "installed but idle" in text and "\n" not in text
    assert "own TURBOQUANT attention backend" in text
    assert "--attention-backend CUSTOM" in text and text.endswith(".")
