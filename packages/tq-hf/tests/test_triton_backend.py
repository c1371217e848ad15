"""The cache's Triton backend (tq_kernels' paged store and dequantize) against its tq_core reference
backend: the same bytes and the same decoded K/V.  On CPU this runs under TRITON_INTERPRET=1 (set by
conftest), so the shapes are small."""

from __future__ import annotations

import warnings

import pytest
import torch
from _models import COMMON, stored_layer
from transformers import LlamaConfig

from tq_core import ComponentFormat, KVFormat, named_format
from tq_core.testing import rel_err
from tq_hf import TurboQuantCache, TurboQuantLayer, attention, dense_attention

D, HKV = 64, 2


@pytest.mark.parametrize("name", ["turboquant_4bit_nc", "turboquant_k3v4_nc"])
def test_triton_store_and_dequantize_match_reference(name):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = LlamaConfig(**{**COMMON, "num_hidden_layers": 1})
    fmt = named_format(name, D)
    g = torch.Generator().manual_seed(0)
    prompt = [torch.randn(2, HKV, 13, D, generator=g).to(device) for _ in range(2)]
    steps = [[torch.randn(2, HKV, 1, D, generator=g).to(device) for _ in range(2)] for _ in range(3)]
    layers = []
    for backend in ("torch", "triton"):
        cache = TurboQuantCache(
            cfg, fmt, residual_length=4, chunk_tokens=8, backend=backend, fused_attention=True
        )
        cache.update(*prompt, 0)
        cache.layers[0].flush_pending((0, 3), torch.tensor([0, 3], device=device))
        for k, v in steps:
            cache.update(k, v, 0)
        layers.append(cache.layers[0])
    ref, tri = layers
    assert tri.backend == "triton" and tri.n_comp == ref.n_comp == 14
    used = -(-(ref.n_comp + max(ref.shift)) // 8)
    torch.testing.assert_close(
        tri.dequantize_compressed()[0], ref.dequantize_compressed()[0], rtol=0, atol=1e-5
    )
    torch.testing.assert_close(tri.dequantize()[1], ref.dequantize()[1], rtol=0, atol=1e-5)
    # the tq_core reference reads what the kernel stored (row 1 starts shift[1] slots into its block)
    for row, first in ((0, 0), (1, ref.shift[1])):
        a = ref.fmt.gather_paged(ref.slots, torch.arange(used) + row * ref.chunks, first + 14)[0][first:]
        b = ref.fmt.gather_paged(tri.slots, torch.arange(used) + row * tri.chunks, first + 14)[0][first:]
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


@pytest.mark.parametrize("splits", [None, 3], ids=["splits-default", "splits-3"])
@pytest.mark.parametrize(
    ("prompt", "steps", "pads", "window"),
    [(40, 3, None, None), (40, 5, (0, 5, 13), None), (60, 30, None, 20)],
    ids=["plain", "left-padding", "sliding"],
)
def test_decode_kernel_path_matches_dense(monkeypatch, prompt, steps, pads, window, splits):
    """tq_kernels' paged decode kernel (with the log-sum-exp read off its reduce) plus the residual
    merge, against dense attention over the dequantized layer; also with the context split in several
    parts (the GPU default; one part on the CPU interpreter, where the split heuristic sees one SM)."""
    if splits is not None:
        from tq_kernels.ops import decode as decode_ops

        monkeypatch.setattr(decode_ops, "default_num_splits", lambda *a, **k: splits)
    layer, pads_dev = stored_layer(prompt, steps, pads=pads, window=window)
    q = torch.randn(layer.batch_size, 4, 1, D, generator=torch.Generator().manual_seed(7))
    plan = layer.decode_read(pads, pads_dev, window)
    got = attention._fused_decode(q, plan, pads, pads_dev, scale=0.2, window=window, softcap=None, sinks=None)
    k, v = layer.dequantize()
    n = layer.cumulative_length
    mask = None
    if pads is not None:
        mask = (torch.arange(n)[None, :] >= torch.tensor(pads)[:, None])[:, n - k.shape[2] :]
    want = dense_attention(q, k, v, scale=0.2, key_mask=mask, window=window)
    err = rel_err(got, want)
    assert err < 5e-3, err  # the kernel's tensor-core operands are float16


@pytest.mark.parametrize("window", [None, 40])
def test_fused_path_self_check(window):
    """The check the attention runs once per device/format/dtype before trusting the kernel path."""
    layer, _ = stored_layer(20, 0, window=window)
    q = torch.zeros(1, 4, 1, D)
    assert attention._check_fused_path(layer, q, window, None) < 5e-3


# -- when the fused decode path falls back, and when it raises ------------------------------------------
@pytest.fixture
def fresh_verdicts(monkeypatch):
    """An empty memo of the fused path's verdicts, so that each test makes its own."""
    verdicts: dict = {}
    monkeypatch.setattr(attention, "_VERIFIED", verdicts)
    return verdicts


def test_fused_path_taken_when_the_kernel_agrees(fresh_verdicts):
    layer, _ = stored_layer(20, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert attention._fused_path_ok(layer, torch.zeros(1, 4, 1, D), None, None) is True


@pytest.mark.parametrize("exc", [TypeError, KeyError, AttributeError, RuntimeError, ValueError, ImportError])
def test_fused_path_bug_propagates(fresh_verdicts, monkeypatch, exc):
    """A launcher that raises is a bug: it surfaces, instead of turning into a warning and a slower path
    (and nothing is memoized, so the next call raises again)."""
    from tq_kernels.ops import decode as decode_ops

    def broken(*args, **kwargs):
        raise exc("simulated launcher bug")

    monkeypatch.setattr(decode_ops, "tq_decode_attention", broken)
    layer, _ = stored_layer(20, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(2):
            with pytest.raises(exc, match="simulated launcher bug"):
                attention._fused_path_ok(layer, torch.zeros(1, 4, 1, D), None, None)
    assert fresh_verdicts == {}


def _head_dim_48_layer():
    return TurboQuantLayer(named_format("turboquant_4bit_nc", 48), 0, num_kv_heads=HKV, backend="torch")


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("float64", r"float16, bfloat16 or float32"),
        ("cpu-without-interpreter", r"CUDA devices"),
        ("head_dim-48", r"head_dim 48 has no kernel"),
        ("no-triton", r"Triton is not installed"),
        ("extra-bit-format", r"hi_bits_coords=8"),
    ],
)
def test_unsupported_inputs_fall_back_with_a_warning(fresh_verdicts, monkeypatch, case, reason):
    """Inputs outside the kernel's documented limits take the dequantize path, say why, and never run
    the kernel."""

    def must_not_run(*args, **kwargs):
        raise AssertionError("the kernel check ran for inputs the kernel does not serve")

    monkeypatch.setattr(attention, "_check_fused_path", must_not_run)
    layer, _ = stored_layer(20, 0)
    q = torch.zeros(1, 4, 1, D)
    if case == "float64":
        q = q.double()
    elif case == "cpu-without-interpreter":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    elif case == "head_dim-48":
        layer, q = _head_dim_48_layer(), torch.zeros(1, 4, 1, 48)
    elif case == "no-triton":
        real = attention.find_spec
        monkeypatch.setattr(attention, "find_spec", lambda name: None if name == "triton" else real(name))
    else:
        fmt = KVFormat(D, ComponentFormat(3, 8), ComponentFormat(3, 8))
        layer = TurboQuantLayer(fmt, 0, num_kv_heads=HKV, backend="torch")
    with pytest.warns(RuntimeWarning, match=rf"does not serve .*{reason}.*dequantizes instead"):
        assert attention._fused_path_ok(layer, q, None, None) is False
    with warnings.catch_warnings():  # memoized: said once
        warnings.simplefilter("error", RuntimeWarning)
        assert attention._fused_path_ok(layer, q, None, None) is False


def test_kernel_disagreement_falls_back_with_a_warning(fresh_verdicts, monkeypatch):
    """A kernel whose result disagrees with the dequantize path costs speed, never correctness."""
    monkeypatch.setattr(attention, "_check_fused_path", lambda *a: 0.5)
    layer, _ = stored_layer(20, 0)
    with pytest.warns(RuntimeWarning, match=r"relative error of 0.5; please report this as a tq-hf bug"):
        assert attention._fused_path_ok(layer, torch.zeros(1, 4, 1, D), None, None) is False
