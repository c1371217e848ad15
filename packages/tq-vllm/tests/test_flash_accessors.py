"""The public FlashAttention accessors of ``tq_vllm.impl`` (``flash_varlen``, ``prefill_flash_version``):
they answer as the impl's own choice does, and reject bad arguments with a message.

On a CPU machine vLLM's platform is not CUDA, so ``flash_varlen`` answers None there; the version
choice is pure logic and runs everywhere.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

import tq_vllm.impl
from tq_vllm.impl import flash_varlen, prefill_flash_version


def test_prefill_flash_version_follows_the_impl(monkeypatch) -> None:
    monkeypatch.delenv("TQ_VLLM_FLASH_VERSION", raising=False)
    for head_size, configured in ((128, None), (128, 3), (512, 2), (64, 2)):
        want = tq_vllm.impl._prefill_fa_version(head_size, configured)
        assert prefill_flash_version(head_size, configured) == want
    assert prefill_flash_version(512, 2) == 2  # FA3 runs head sizes up to 256
    monkeypatch.setenv("TQ_VLLM_FLASH_VERSION", "4")
    assert prefill_flash_version(128, 2) == 4
    monkeypatch.setenv("TQ_VLLM_FLASH_VERSION", "fa3")
    with pytest.raises(ValueError, match="TQ_VLLM_FLASH_VERSION must be 2, 3 or 4"):
        prefill_flash_version(128, 2)


@pytest.mark.parametrize(
    ("head_size", "configured", "match"),
    [(0, 2, "head_size"), (128.0, 2, "head_size"), (True, 2, "head_size"), (128, "3", "configured")],
    ids=["head-0", "head-float", "head-bool", "configured-str"],
)
def test_prefill_flash_version_rejects_bad_arguments(head_size, configured, match) -> None:
    with pytest.raises(ValueError, match=match):
        prefill_flash_version(head_size, configured)


def test_flash_varlen_is_what_the_impl_gets(monkeypatch) -> None:
    seen = []
    sentinel = object()

    def fake(head_size, contiguous_kv=False):
        seen.append((head_size, contiguous_kv))
        return sentinel

    monkeypatch.setattr(tq_vllm.impl, "_flash_varlen", fake)
    assert flash_varlen(96, contiguous_kv=True) is sentinel
    assert flash_varlen(64) is sentinel
    assert seen == [(96, True), (64, False)]


def test_flash_varlen_off_and_bad_arguments(monkeypatch) -> None:
    monkeypatch.setenv("TQ_VLLM_PREFILL_FLASH", "0")
    assert flash_varlen(128, contiguous_kv=True) is None
    monkeypatch.setenv("TQ_VLLM_PREFILL_FLASH", "off")
    with pytest.raises(ValueError, match="TQ_VLLM_PREFILL_FLASH must be 0 or 1"):
        flash_varlen(128)
    monkeypatch.delenv("TQ_VLLM_PREFILL_FLASH")
    with pytest.raises(ValueError, match="head_size must be a positive int"):
        flash_varlen(-64)
