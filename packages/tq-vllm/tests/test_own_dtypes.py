"""tq-vllm's own ``--kv-cache-dtype`` names on vLLM 0.33+, through vLLM's own code from the CLI to the page.

``register()`` adds ``tq_4bit`` ... with vLLM's ``register_kv_cache_dtype`` and one named backend each;
``EngineArgs`` (and ``vllm serve``'s argument parser) then accept the names, the ledger's
``backend_selection`` patch sends every layer of such a run to the dtype's backend without
``--attention-backend``, and vLLM's ``Attention`` layer builds tq-vllm's impl, whose page vLLM sizes
through the backend's ``customize_spec``.  The checks use vLLM's CUDA platform with an H100's
capability (``_platform.py``), the code path of a GPU start up to the first kernel launch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from tq_vllm._compat import has_kv_cache_dtype_registry

if not has_kv_cache_dtype_registry():
    pytest.skip("vLLM before 0.33 takes no kv-cache dtypes from plugins", allow_module_level=True)

import torch
from _platform import use_cuda_platform
from _vllm_compat import customize_attention_spec
from vllm.config import set_current_vllm_config
from vllm.v1.attention.backend import MultipleOf
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVQuantMode, SlidingWindowSpec, get_kv_quant_mode

import tq_vllm
from tq_core import budget_bytes
from tq_vllm.backend import NAMED_BACKENDS, TurboQuantBackend
from tq_vllm.impl import TurboQuantImpl
from tq_vllm.presets import OWN_CACHE_DTYPES, SUPPORTED_HEAD_DIMS, backend_name, kv_format

OWN = list(OWN_CACHE_DTYPES)
BLOCK, HEADS = 16, 2
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
    "torch_dtype": "bfloat16",
}


@pytest.fixture(autouse=True)
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    use_cuda_platform(monkeypatch)
    tq_vllm.register()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    (path / "config.json").write_text(json.dumps(TINY_LLAMA))
    return path


def _engine_config(model: Path, kv_cache_dtype: str, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(
        model=str(model),
        load_format="dummy",
        skip_tokenizer_init=True,
        kv_cache_dtype=kv_cache_dtype,
        **kwargs,
    )
    return args.create_engine_config()


def _spec(kv_cache_dtype: str, head_dim: int, cls=FullAttentionSpec, **extra):
    return cls(
        block_size=BLOCK,
        num_kv_heads=HEADS,
        head_size=head_dim,
        dtype=torch.uint8,
        kv_quant_mode=get_kv_quant_mode(kv_cache_dtype),
        **extra,
    )


# -- registration ---------------------------------------------------------------------------------------
def test_register_adds_each_name_and_backend_once() -> None:
    from vllm.config.cache import KV_CACHE_DTYPES, get_kv_cache_dtype_handler
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    tq_vllm.register()  # again: every process of vLLM may call it more than once
    for dtype in OWN:
        assert KV_CACHE_DTYPES.count(dtype) == 1
        assert STR_DTYPE_TO_TORCH_DTYPE[dtype] is torch.uint8
        assert get_kv_cache_dtype_handler(dtype).quant_mode() is KVQuantMode.CUSTOM
        member = AttentionBackendEnum[backend_name(dtype)]
        assert member.get_class() is NAMED_BACKENDS[dtype]
        assert member.get_class().get_name() == member.name
    assert AttentionBackendEnum.CUSTOM.get_class() is TurboQuantBackend


def test_custom_mode_is_an_alias_and_never_read_as_a_name() -> None:
    """vLLM 0.33/0.34 number KVQuantMode.CUSTOM 12, like OCTAVE_K3V4: the member reads as octave_k3v4.
    Our page size comes from the backend, so the alias cannot turn a tq_* layer into an octave one."""
    mode = get_kv_quant_mode("tq_4bit")
    assert mode is KVQuantMode.CUSTOM and not mode.is_turboquant
    if mode is KVQuantMode.OCTAVE_K3V4:
        assert mode.name == "OCTAVE_K3V4"
    page = customize_attention_spec(
        NAMED_BACKENDS["tq_4bit"], _spec("tq_4bit", 128), "tq_4bit"
    ).page_size_bytes
    assert page == BLOCK * HEADS * 134
    with pytest.raises(ValueError, match="named"):
        TurboQuantBackend.customize_spec(_spec("tq_4bit", 128))  # the plain CUSTOM backend cannot tell
    for backend in (TurboQuantBackend, *NAMED_BACKENDS.values()):
        assert not backend.supports_kv_cache_dtype("octave_k3v4")


# -- EngineArgs and the CLI -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", OWN)
def test_engine_args_accept_own_dtypes_and_compress_every_layer(tiny_model: Path, dtype: str) -> None:
    config = _engine_config(tiny_model, dtype)
    assert config.cache_config.cache_dtype == dtype
    # no boundary skip: vLLM keeps boundary layers only for its turboquant_* / ultraquant names
    assert list(config.cache_config.kv_cache_dtype_skip_layers) == []
    assert config.attention_config.backend is None


def test_user_skip_layers_stay(tiny_model: Path) -> None:
    config = _engine_config(tiny_model, "tq_3bit", kv_cache_dtype_skip_layers=["0", "5"])
    assert sorted(config.cache_config.kv_cache_dtype_skip_layers) == ["0", "5"]


def test_an_unknown_name_is_refused_with_the_valid_ones(tiny_model: Path) -> None:
    with pytest.raises(ValueError, match="tq_9bit") as err:
        _engine_config(tiny_model, "tq_9bit")
    assert "tq_4bit" in str(err.value) and "tq_2bit" in str(err.value)


def test_vllm_serve_arguments_take_an_own_dtype(tiny_model: Path) -> None:
    """What ``vllm serve MODEL --kv-cache-dtype tq_4bit`` parses and configures before it starts."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.cli.serve import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    args = parser.parse_args(
        [
            "--model",
            str(tiny_model),
            "--kv-cache-dtype",
            "tq_4bit",
            "--load-format",
            "dummy",
            "--skip-tokenizer-init",
        ]
    )
    config = AsyncEngineArgs.from_cli_args(args).create_engine_config()
    assert config.cache_config.cache_dtype == "tq_4bit"


# -- backend selection and vLLM's attention layer ---------------------------------------------------------
@pytest.mark.parametrize("dtype", OWN)
def test_every_layer_of_an_own_run_selects_its_backend(tiny_model: Path, dtype: str) -> None:
    from vllm.v1.attention import selector

    config = _engine_config(tiny_model, dtype)
    selector._cached_get_attn_backend.cache_clear()
    with set_current_vllm_config(config):
        # compressed layers, and uncompressed ones the user keeps (--kv-cache-dtype-skip-layers)
        assert selector.get_attn_backend(128, torch.bfloat16, dtype) is NAMED_BACKENDS[dtype]
        assert selector.get_attn_backend(128, torch.bfloat16, "auto") is NAMED_BACKENDS[dtype]
    config.attention_config.backend = AttentionBackendEnum.CUSTOM  # --attention-backend CUSTOM too
    selector._cached_get_attn_backend.cache_clear()
    with set_current_vllm_config(config):
        assert selector.get_attn_backend(128, torch.bfloat16, dtype) is NAMED_BACKENDS[dtype]
    selector._cached_get_attn_backend.cache_clear()


@pytest.mark.parametrize("dtype", ["tq_4bit", "tq_2bit"])
def test_vllms_attention_layer_builds_our_impl_and_page(tiny_model: Path, dtype: str) -> None:
    from vllm.model_executor.layers.attention import Attention
    from vllm.v1.attention import selector

    config = _engine_config(tiny_model, dtype)
    selector._cached_get_attn_backend.cache_clear()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # as vLLM's model loader does
    try:
        with set_current_vllm_config(config):
            layer = Attention(
                4,
                128,
                128**-0.5,
                num_kv_heads=2,
                cache_config=config.cache_config,
                prefix="model.layers.3.self_attn.attn",
            )
            spec = customize_attention_spec(layer.get_attn_backend(), layer.get_kv_cache_spec(config), dtype)
    finally:
        torch.set_default_dtype(default)
        selector._cached_get_attn_backend.cache_clear()
    assert layer.get_attn_backend() is NAMED_BACKENDS[dtype]
    assert isinstance(layer.impl, TurboQuantImpl) and layer.impl.kv_cache_dtype == dtype
    slot = kv_format(dtype, 128).slot_bytes
    assert layer.impl.fmt.slot_bytes == slot
    assert spec.page_size_bytes == spec.block_size * 2 * slot


# -- pages, block sizes, layouts --------------------------------------------------------------------------
@pytest.mark.parametrize("head_dim", SUPPORTED_HEAD_DIMS, ids=lambda d: f"D{d}")
@pytest.mark.parametrize("dtype", OWN)
def test_page_bytes_per_token_head(dtype: str, head_dim: int) -> None:
    page = customize_attention_spec(NAMED_BACKENDS[dtype], _spec(dtype, head_dim), dtype).page_size_bytes
    per_token_head = page // (BLOCK * HEADS)
    assert page == BLOCK * HEADS * per_token_head == BLOCK * HEADS * kv_format(dtype, head_dim).slot_bytes
    layout = OWN_CACHE_DTYPES[dtype]
    if isinstance(layout, str):  # the budget of vLLM's preset
        assert per_token_head == budget_bytes(layout, head_dim)
    else:  # packed codes of both components plus a float16 norm each
        key_bits, value_bits = layout
        assert per_token_head == head_dim * (key_bits + value_bits) // 8 + 4
    window = _spec(dtype, head_dim, SlidingWindowSpec, sliding_window=64)
    assert customize_attention_spec(NAMED_BACKENDS[dtype], window, dtype).page_size_bytes == page


def test_bytes_at_head_dim_128() -> None:
    """The table of the README: vLLM's budgets for the four preset names, 68 and 164 bytes for the rest."""
    got = {dtype: kv_format(dtype, 128).slot_bytes for dtype in OWN}
    assert got == {
        "tq_k8v4": 196,
        "tq_4bit": 134,
        "tq_k3v4": 118,
        "tq_3bit": 102,
        "tq_5bit": 164,
        "tq_2bit": 68,
    }


def test_block_sizes_and_layouts() -> None:
    from vllm.config.cache import CacheConfig
    from vllm.v1.attention.backends.utils import get_supported_kv_cache_layouts
    from vllm.v1.kv_cache_layout import KVCacheLayout
    from vllm.v1.worker.utils import select_common_block_size

    for dtype, backend in NAMED_BACKENDS.items():
        spec = _spec(dtype, 128)
        assert [(type(s), s.base) for s in backend.get_supported_kernel_block_sizes(spec)] == [
            (MultipleOf, 16)
        ]
        # vLLM 0.34's default block of 64 tokens (16 before) is a kernel block as it is
        assert select_common_block_size(CacheConfig.DEFAULT_BLOCK_SIZE, [backend], [spec]) == (
            CacheConfig.DEFAULT_BLOCK_SIZE
        )
        assert backend.supported_kv_cache_layouts() == TurboQuantBackend.supported_kv_cache_layouts()
        assert get_supported_kv_cache_layouts([backend])[0] == KVCacheLayout.LBHNC
