"""The patch ledger against the installed vLLM: every entry documented, its target present, the
``full_capacity`` patch doing what it says inside ``EngineArgs.create_engine_config``, and the
``backend_selection`` patch always on and quiet (what it does: ``test_selection.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from vllm.model_executor.layers.quantization.turboquant.config import TurboQuantConfig

import tq_vllm
from tq_vllm.patches import LEDGER, apply_enabled, backend_selection, boundary_skip, self_check

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "vocab_size": 1000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "torch_dtype": "bfloat16",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


@pytest.fixture
def unpatched():
    """Start without any patch; leave vLLM as each test found it."""
    was = {patch.name: patch.is_applied() for patch in LEDGER}
    for patch in LEDGER:
        patch.revert()
    yield
    for patch in LEDGER:
        patch.revert()
        if was[patch.name]:
            patch.apply()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    (path / "config.json").write_text(json.dumps(TINY_LLAMA))
    return path


def _skip_layers(model: Path, kv_cache_dtype: str) -> list[str]:
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(
        model=str(model),
        load_format="dummy",
        skip_tokenizer_init=True,
        kv_cache_dtype=kv_cache_dtype,
        max_model_len=256,
    )
    return list(args.create_engine_config().cache_config.kv_cache_dtype_skip_layers)


def test_every_ledger_entry_is_documented() -> None:
    for patch in LEDGER:
        for field in ("name", "target", "why", "upstream", "remove_when", "tested_on"):
            assert getattr(patch, field).strip(), f"{patch.name}: {field} is empty"
        assert "vllm-project/vllm#" in patch.upstream
        assert patch.target.startswith("vllm.")


def test_self_check_passes_on_the_installed_vllm(unpatched) -> None:
    assert self_check() == {patch.name: "ok" for patch in LEDGER}
    assert not boundary_skip.is_applied() and not backend_selection.is_applied()


def test_full_capacity_patch_is_opt_in_and_idempotent(unpatched) -> None:
    assert apply_enabled({}) == ["backend_selection"]
    assert not boundary_skip.is_applied()
    assert apply_enabled({"TQ_VLLM_FULL_CAPACITY": "1"}) == ["full_capacity", "backend_selection"]
    assert apply_enabled({"TQ_VLLM_FULL_CAPACITY": "1"}) == ["full_capacity", "backend_selection"]
    assert boundary_skip.is_applied()
    boundary_skip.revert()
    assert not boundary_skip.is_applied()


def test_backend_selection_is_always_on_idempotent_and_quiet(unpatched, caplog, monkeypatch) -> None:
    import logging

    monkeypatch.setattr(logging.getLogger("vllm"), "propagate", True)  # vLLM's setup stops it
    with caplog.at_level(logging.DEBUG, logger="vllm.tq_vllm"):
        assert apply_enabled({}) == ["backend_selection"]
        assert apply_enabled({}) == ["backend_selection"]
    assert backend_selection.is_applied()
    assert [r for r in caplog.records if r.name == "vllm.tq_vllm"] == []  # every vLLM process applies it
    from vllm.v1.attention import selector

    selector._cached_get_attn_backend.cache_clear()  # vLLM's own tests call it on the patched function
    backend_selection.revert()
    assert not backend_selection.is_applied()


def test_a_bad_full_capacity_value_warns_and_stays_off(unpatched, caplog) -> None:
    import logging

    with caplog.at_level(logging.WARNING, logger="vllm.tq_vllm"):
        assert apply_enabled({"TQ_VLLM_FULL_CAPACITY": "yes"}) == ["backend_selection"]
        assert apply_enabled({"TQ_VLLM_FULL_CAPACITY": "0"}) == ["backend_selection"]
    assert not boundary_skip.is_applied()
    assert [r.getMessage() for r in caplog.records if "not 0 or 1" in r.getMessage()] == [
        "tq-vllm: TQ_VLLM_FULL_CAPACITY='yes' is not 0 or 1; the full_capacity patch stays off"
    ]


def test_boundary_layers_are_skipped_without_the_patch(unpatched, tiny_model: Path) -> None:
    assert _skip_layers(tiny_model, "turboquant_4bit_nc") == ["0", "1", "4", "5"]
    assert _skip_layers(tiny_model, "auto") == []


def test_full_capacity_compresses_every_layer(
    unpatched, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TQ_VLLM_FULL_CAPACITY", "1")
    tq_vllm.register()  # what vLLM's plugin loader does in the engine's first process
    assert boundary_skip.is_applied()
    assert _skip_layers(tiny_model, "turboquant_3bit_nc") == []
    assert TurboQuantConfig.get_boundary_skip_layers(None) == []


def test_user_skip_layers_still_apply_with_full_capacity(unpatched, tiny_model: Path) -> None:
    from vllm.engine.arg_utils import EngineArgs

    boundary_skip.apply()
    args = EngineArgs(
        model=str(tiny_model),
        load_format="dummy",
        skip_tokenizer_init=True,
        kv_cache_dtype="turboquant_4bit_nc",
        kv_cache_dtype_skip_layers=["3"],
        max_model_len=256,
    )
    assert list(args.create_engine_config().cache_config.kv_cache_dtype_skip_layers) == ["3"]
