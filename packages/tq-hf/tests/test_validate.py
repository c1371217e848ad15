"""Every argument of TurboQuantCache (and TurboQuantLayer) is checked when the cache is created: a wrong
type raises TypeError, a value out of range ValueError, with a message that says what is allowed; nothing
is accepted to fail later inside torch (or to be ignored)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _models import COMMON
from transformers import LlamaConfig

import tq_hf
from tq_core import ComponentFormat, KVFormat, named_format
from tq_hf import TurboQuantCache, TurboQuantLayer, _validate

D = 64


def _id(x):
    """Test ids from the kwargs (no object addresses, so that ids are stable)."""
    if isinstance(x, str):
        return ""
    return ",".join(f"{k}={'callable' if callable(v) else repr(v)[:30]}" for k, v in x.items())


def _cfg(**kw):
    return LlamaConfig(**{**COMMON, **kw})  # 2 layers, max_position_embeddings 512


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"residual_length": 2.5}, r"residual_length must be an int, got float 2.5; .*newest tokens"),
        ({"residual_length": "64"}, r"residual_length must be an int, got str '64'"),
        ({"residual_length": True}, r"residual_length must be an int, got bool"),
        ({"chunk_tokens": 8.0}, r"chunk_tokens must be an int, got float"),
        ({"chunk_tokens": None}, r"chunk_tokens must be an int, got NoneType"),
        ({"max_cache_len": "4096"}, r"max_cache_len must be an int, got str .*pass None to grow"),
        ({"backend": None}, r"backend must be one of \('auto', 'torch', 'triton'\)"),
        ({"fused_attention": "yes"}, r"fused_attention must be None .*, True or False"),
        ({"fused_attention": 1}, r"fused_attention must be None"),
        ({"format": None}, r"format: a format is the name of a tq_core format .*got NoneType"),
        ({"format": 4}, r"format: a format is .*tq_core.KVFormat, got int 4"),
        ({"layer_formats": "turboquant_k8v4"}, r"For one format in every layer, pass it as format="),
        (
            {"layer_formats": {"0": "turboquant_k8v4"}},
            r"layer_formats keys are layer indices \(int\), got str",
        ),
        ({"layer_formats": {1.0: "turboquant_k8v4"}}, r"layer_formats keys are layer indices"),
        ({"layer_formats": {0: 3}}, r"layer_formats\[0\]: a format is .*got int 3"),
        ({"layer_formats": {1, 2}}, r"layer_formats must be None, a mapping .*got set"),
        ({"layer_formats": lambda i: None}, r"layer_formats\(0\): a format is"),
    ],
    ids=_id,
)
def test_wrong_types_raise_type_error(kwargs, message):
    with pytest.raises(TypeError, match=message):
        TurboQuantCache(_cfg(), **kwargs)


@pytest.mark.parametrize("config", [None, "meta-llama/Llama-3.2-1B", {"num_hidden_layers": 2}])
def test_config_must_be_a_config_or_model(config):
    with pytest.raises(TypeError, match=r"model.config, or transformers.AutoConfig.from_pretrained"):
        TurboQuantCache(config)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"residual_length": -1}, r"residual_length must be >= 0, got -1"),
        # the 512 GB residual window of the issue: refused before anything is allocated
        (
            {"residual_length": 10**9},
            r"residual_length=1000000000 is too large: it must be at most 512, the model's context length "
            r"\(config.max_position_embeddings\).*allocated in full.*DynamicCache",
        ),
        (
            {"residual_length": 64, "max_cache_len": 32},
            r"residual_length=64 is too large: it must be at most 32, max_cache_len",
        ),
        ({"chunk_tokens": 0}, r"chunk_tokens must be between 1 and 4096, got 0; .*default is 128"),
        ({"chunk_tokens": 10**9}, r"chunk_tokens must be between 1 and 4096, got 1000000000"),
        ({"max_cache_len": 0}, r"max_cache_len must be >= 1, got 0; .*pass None to grow"),
        ({"max_cache_len": -1}, r"max_cache_len must be >= 1, got -1"),
        ({"backend": "cuda"}, r"backend must be 'auto' .*'triton' or 'torch', got 'cuda'"),
        (
            {"layer_formats": {5: "turboquant_k8v4"}},
            r"entry for layer 5, but the model has 2 layers: indices go from 0 to 1",
        ),
        (
            {"layer_formats": {-1: "turboquant_k8v4"}},
            r"entry for layer -1, .*negative indices are not accepted",
        ),
        ({"layer_formats": ["turboquant_k8v4"] * 3}, r"layer_formats has 3 entries for 2 layers: give one"),
        ({"layer_formats": {1: "turboquant_2bit"}}, r"layer_formats\[1\]: unknown format 'turboquant_2bit'"),
        ({"format": "turboquant_2bit"}, r"format: unknown format"),
        ({"format": named_format("turboquant_4bit_nc", 128)}, r"format: format has head_dim 128, the model"),
    ],
    ids=_id,
)
def test_out_of_range_raises_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TurboQuantCache(_cfg(), **kwargs)


def test_residual_cap_without_a_context_length():
    """A config without max_position_embeddings still bounds the window, by tq_hf.MAX_RESIDUAL_LENGTH."""
    cfg = SimpleNamespace(
        model_type="toy", num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=D
    )
    big = tq_hf.MAX_RESIDUAL_LENGTH
    assert TurboQuantCache(cfg, backend="torch", residual_length=big).residual_length == big
    with pytest.raises(ValueError, match=rf"at most {big}, tq-hf's cap \(tq_hf.MAX_RESIDUAL_LENGTH\)"):
        TurboQuantCache(cfg, backend="torch", residual_length=big + 1)


def test_limits_are_accepted():
    """The bounds themselves are valid, and integer types other than int (numpy, 0-d tensors) are taken."""
    for kw in (
        {"residual_length": 512},  # the whole context: allowed, if pointless
        {"residual_length": 0},
        {"residual_length": 32, "max_cache_len": 32},
        {"chunk_tokens": tq_hf.MAX_CHUNK_TOKENS},
        {"chunk_tokens": 1},
    ):
        TurboQuantCache(_cfg(), **kw)
    cache = TurboQuantCache(
        _cfg(),
        residual_length=np.int64(16),
        chunk_tokens=torch.tensor(32),
        max_cache_len=np.int32(100),
        layer_formats={np.int64(1): "turboquant_k8v4"},
    )
    layer = cache.tq_layers[1]
    assert type(layer.residual_length) is int and type(layer.chunk_tokens) is int
    assert type(layer._max_cache_len) is int
    assert cache.formats[1].name == "turboquant_k8v4" and cache.formats[0].name == "turboquant_4bit_nc"


def test_layer_formats_forms_still_work():
    fmts = ["turboquant_k8v4", "turboquant_3bit_nc"]
    for lf in ({1: fmts[1]}, fmts, tuple(fmts), lambda i: fmts[i]):
        cache = TurboQuantCache(_cfg(), "turboquant_k8v4", layer_formats=lf)
        assert [f.name for f in cache.formats] == fmts


def test_layer_checks_its_own_arguments():
    fmt = named_format("turboquant_4bit_nc", D)
    with pytest.raises(TypeError, match=r"fmt must be a tq_core KVFormat .*named_format"):
        TurboQuantLayer("turboquant_4bit_nc", 0, num_kv_heads=2)
    with pytest.raises(ValueError, match=r"num_kv_heads must be >= 1, got 0"):
        TurboQuantLayer(fmt, 0, num_kv_heads=0)
    with pytest.raises(ValueError, match=r"layer_idx must be >= 0"):
        TurboQuantLayer(fmt, -1, num_kv_heads=2)
    with pytest.raises(ValueError, match=r"sliding_window must be >= 1, got 0; or None"):
        TurboQuantLayer(fmt, 0, num_kv_heads=2, sliding_window=0)
    with pytest.raises(ValueError, match=r"residual_length=100000 is too large"):
        TurboQuantLayer(fmt, 0, num_kv_heads=2, residual_length=100_000)
    with pytest.raises(TypeError, match=r"residual_length must be an int"):
        TurboQuantLayer(fmt, 0, num_kv_heads=2, residual_length=2.5)


def test_triton_backend_without_triton(monkeypatch):
    real = _validate.find_spec
    monkeypatch.setattr(_validate, "find_spec", lambda name: None if name == "triton" else real(name))
    with pytest.raises(ImportError, match=r"Triton is not installed.*pip install triton.*backend='torch'"):
        TurboQuantCache(_cfg(), backend="triton")
    TurboQuantCache(_cfg(), backend="torch")


def test_kernel_format_checked_for_triton():
    """A format the kernels cannot read fails at creation with backend='triton' (torch serves it)."""
    extra = KVFormat(D, ComponentFormat(3, 8), ComponentFormat(3, 8))
    with pytest.raises(ValueError, match=r"layer 0 .*backend='torch'"):
        TurboQuantCache(_cfg(), extra, backend="triton")
    TurboQuantCache(_cfg(), extra, backend="torch")


def test_triton_backend_refuses_float64_at_the_first_update():
    """The dtype is only known at the first forward: the Triton store's dtypes are checked there, with
    what to do."""
    cache = TurboQuantCache(_cfg(num_hidden_layers=1), backend="triton")
    k = torch.zeros(1, 2, 3, D, dtype=torch.float64)
    with pytest.raises(
        ValueError, match=r"float16, bfloat16 or float32 .*got torch.float64; .*backend='torch'"
    ):
        cache.update(k, k, 0)
