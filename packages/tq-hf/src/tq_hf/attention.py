"""The ``"turboquant"`` attention implementation for transformers.

:func:`register` adds :func:`turboquant_attention_forward` to transformers' ``AttentionInterface`` and
:func:`turboquant_mask` to its ``AttentionMaskInterface`` (``import tq_hf`` does it), so a model loaded
with ``attn_implementation="turboquant"`` (or switched with ``model.set_attn_implementation``) calls it.

With a :class:`~tq_hf.cache.TurboQuantCache` the attention reads each layer's compressed slots in place:

* one new token per sequence (decode) on CUDA: ``tq_kernels``' paged decode kernel streams the
  compressed tokens (split-K, GQA heads sharing each K/V load) and returns its log-sum-exp; the exact
  residual window is attended separately and the two softmax parts are merged by their log-sum-exps;
* several new tokens (prefill, assisted-decoding verification), or on CPU: the layer is dequantized
  (tq_core's reference decoder on CPU) and attended with masked softmax attention (SDPA on CUDA).

With any other cache the function is plain attention over the K/V it is given: causal for decoder
layers, bidirectional for encoder layers (a vision-language model's image encoder).

Masks: for a plain causal pattern the mask function hands over the 2D padding mask (``None`` when
nothing is padded), like the FlashAttention integration; causality and sliding windows come from
positions.  Left padding is served by the kernel path (each row's compressed range starts after its
padding); any other padding pattern takes the dequantize path.  When transformers lays something over
the causal pattern (``or``/``and`` mask functions, ``block_sequence_ids``, packed sequences: the
bidirectional image ranges of Gemma 3 and PaliGemma), the mask function builds the full 4D boolean mask
of SDPA, which replaces the causal pattern on the prompt and dequantize paths; the kernel path, which
only knows the causal pattern, is then not taken.
"""

from __future__ import annotations

import os
import warnings
from importlib.util import find_spec
from typing import Any

import torch

from tq_hf._dense import dense_attention
from tq_hf.cache import KERNEL_HEAD_DIMS
from tq_hf.layer import CompressedKV, DecodeRead, TurboQuantLayer

__all__ = ["ATTENTION_NAME", "dense_attention", "register", "turboquant_attention_forward", "turboquant_mask"]

ATTENTION_NAME = "turboquant"


# -- mask ---------------------------------------------------------------------------------------------
def turboquant_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """The mask transformers builds for ``"turboquant"``: the 2D key-padding mask `[B, positions]` (bool)
    or ``None`` when nothing is padded.

    When the pattern is more than causal (transformers then passes ``allow_is_causal_skip=False`` or
    ``use_vmap=True``: ``or``/``and`` mask functions, block or packed sequences, a compiled cache), the
    full 4D boolean mask of SDPA `[B, 1, q_length, kv_length]` instead, which the attention applies as
    the whole pattern.  Either mask carries ``tq_pads`` (left-padding length per row, host tuple;
    ``None`` when the padding is not only on the left) and ``tq_pads_dev`` (the same on the device)
    when some row is padded, so that a prompt's storage skips the padding.
    """
    if kwargs.get("use_vmap") or kwargs.get("allow_is_causal_skip", True) is False:
        from transformers.masking_utils import sdpa_mask

        kwargs.pop("allow_is_causal_skip", None)
        if attention_mask is not None and attention_mask.dim() == 2:
            attention_mask = attention_mask.to(torch.bool)  # as create_causal_mask hands it over
        full = sdpa_mask(
            batch_size=batch_size,
            q_length=q_length,
            kv_length=kv_length,
            q_offset=q_offset,
            kv_offset=kv_offset,
            mask_function=mask_function,
            attention_mask=attention_mask,
            allow_is_causal_skip=False,
            **kwargs,
        )
        if full is not None and attention_mask is not None and attention_mask.dim() == 2:
            _mark_pads(full, attention_mask)
        return full
    if attention_mask is None or attention_mask.dim() != 2:
        return attention_mask
    mask = attention_mask.to(torch.bool)
    return mask if _mark_pads(mask, mask) else None


def _mark_pads(target: torch.Tensor, mask2d: torch.Tensor) -> bool:
    """Set ``target.tq_pads``/``tq_pads_dev`` from the 2D padding mask; False when nothing is padded."""
    first = mask2d.to(torch.int32).argmax(dim=1)
    count = mask2d.sum(dim=1)
    stats = torch.stack([first.to(count.dtype), count]).tolist()  # one sync per forward, like FA's mask
    length = mask2d.shape[1]
    if all(c == length for c in stats[1]):
        return False
    left_only = all(c == length - f for f, c in zip(*stats, strict=True))
    target.tq_pads = tuple(stats[0]) if left_only else None  # type: ignore[attr-defined]
    target.tq_pads_dev = first  # type: ignore[attr-defined]
    return True


def _pads_of(mask: torch.Tensor) -> tuple[tuple[int, ...] | None, torch.Tensor]:
    pads = getattr(mask, "tq_pads", "missing")
    dev = getattr(mask, "tq_pads_dev", None)
    if isinstance(pads, str) or dev is None:  # a mask that did not come through turboquant_mask
        first = mask.to(torch.int32).argmax(dim=1)
        count = mask.sum(dim=1)
        f, c = torch.stack([first.to(count.dtype), count]).tolist()
        length = mask.shape[1]
        pads = tuple(f) if all(ci == length - fi for fi, ci in zip(f, c, strict=True)) else None
        dev = first
    return pads, dev


# -- attention over a TurboQuantLayer ----------------------------------------------------------------
def _split_mask(attention_mask: Any, n: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if attention_mask is None:
        return None, None
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(
            f"the turboquant attention takes a 2D padding mask or a 4D tensor mask, got {type(attention_mask).__name__}"
        )
    if attention_mask.dim() == 2:
        if attention_mask.shape[1] != n:
            raise ValueError(
                f"the padding mask covers {attention_mask.shape[1]} positions but the cache holds {n} tokens"
            )
        return attention_mask.to(torch.bool), None
    if attention_mask.dim() == 4:
        return None, attention_mask
    raise ValueError(f"attention_mask must be 2D or 4D, got shape {tuple(attention_mask.shape)}")


def _layer_attention(
    layer: TurboQuantLayer,
    q: torch.Tensor,
    attention_mask: Any,
    *,
    scale: float,
    window: int | None,
    softcap: float | None,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    n, t = layer.cumulative_length, q.shape[2]
    mask2d, mask4d = _split_mask(attention_mask, n)
    pads: tuple[int, ...] | None = None
    pads_dev = None
    if mask2d is not None:
        pads, pads_dev = _pads_of(mask2d)
    elif mask4d is not None and getattr(mask4d, "tq_pads_dev", None) is not None:
        pads, pads_dev = mask4d.tq_pads, mask4d.tq_pads_dev  # type: ignore[attr-defined]
    if layer.pending is not None:  # the prompt: exact attention, then store it knowing the padding
        k, v = layer.pending
        out = dense_attention(
            q,
            k,
            v,
            scale=scale,
            key_mask=mask2d,
            mask4d=None if mask4d is None else _mask4d_keys(mask4d, layer, t, k.shape[2]),
            window=window,
            softcap=softcap,
            sinks=sinks,
        )
        layer.flush_pending(pads, pads_dev)
        return out
    if t == 1 and q.is_cuda and layer.backend == "triton" and mask4d is None:
        read = layer.decode_read(pads, pads_dev, window)
        if read is not None and _fused_path_ok(layer, q, window, softcap):
            STATS["fused"] += 1
            return _fused_decode(
                q, read, pads, pads_dev, scale=scale, window=window, softcap=softcap, sinks=sinks
            )
    STATS["dequantize"] += 1
    k, v = layer.dequantize()
    length = k.shape[2]
    return dense_attention(
        q,
        k,
        v,
        scale=scale,
        key_mask=None if mask2d is None else mask2d[:, n - length :],
        mask4d=None if mask4d is None else _mask4d_keys(mask4d, layer, t, length),
        window=window,
        softcap=softcap,
        sinks=sinks,
    )


def _mask4d_keys(mask4d: torch.Tensor, layer: TurboQuantLayer, t: int, length: int) -> torch.Tensor:
    """The columns of a 4D mask `[B, 1 or H, t, L]` for the ``length`` newest keys the layer holds.

    The mask covers the positions the cache announced for this forward (``get_mask_sizes``), which end
    at the newest key; a sliding layer may since have dropped its oldest tokens.  Raises when the mask
    lets a query see a dropped token: that attention cannot be computed any more, and attending
    without it would be silently wrong.
    """
    if mask4d.shape[-2] != t or mask4d.shape[-1] < length:
        raise ValueError(
            f"the 4D attention mask has shape {tuple(mask4d.shape)}, but TurboQuantCache layer "
            f"{layer.layer_idx} attends {t} queries over {length} keys: pass the 2D padding mask and let the "
            "model build the 4D one, or build it with the sizes the cache's get_mask_sizes gives"
        )
    cut = mask4d.shape[-1] - length
    if cut:
        dropped = mask4d[..., :cut]
        if dropped.dtype != torch.bool:  # additive: 0 sees, -inf or the dtype's minimum hides
            dropped = torch.isfinite(dropped) & (dropped > torch.finfo(dropped.dtype).min)
        if bool(dropped.any()):
            raise ValueError(
                f"the attention mask lets queries see positions that sliding-window layer {layer.layer_idx} "
                f"of the TurboQuantCache no longer holds (it keeps positions >= {layer.start}, its window "
                f"{layer.sliding_window} plus {layer.chunk_tokens} spare); a mask pattern that reaches behind "
                "the window cannot be served by this cache"
            )
    return mask4d[..., cut:]


# how many attention calls over a TurboQuantLayer took each path (prompts excluded)
STATS = {"fused": 0, "dequantize": 0}
_VERIFIED: dict[tuple[Any, ...], bool] = {}


def _fused_path_ok(
    layer: TurboQuantLayer, q: torch.Tensor, window: int | None, softcap: float | None
) -> bool:
    """Whether decode attention over ``layer`` takes the fused kernel path.

    It does not, with a warning (once per device, format, dtype and shape), when the kernel does not
    serve these inputs (:func:`_fused_unsupported`), or when its result on a synthetic layer
    (multi-split, left-padded) disagrees with the dequantize path: that costs speed, never correctness.
    Anything else that goes wrong in the kernel path is a bug and raises.
    """
    key = (q.device, layer.fmt, q.dtype, layer.num_kv_heads, q.shape[1], layer.chunk_tokens, softcap, window)
    ok = _VERIFIED.get(key)
    if ok is None:
        why = _fused_unsupported(layer, q)
        if why is None:
            err = _check_fused_path(layer, q, window, softcap)
            if not err < 3e-2:
                why = (
                    f"its result differs from the dequantize path by a relative error of {err:.3g}; please "
                    "report this as a tq-hf bug"
                )
        ok = why is None
        _VERIFIED[key] = ok
        if not ok:
            warnings.warn(
                f"tq_hf: the fused decode kernel does not serve {layer.fmt.name or 'this format'}, {q.dtype}, "
                f"on {q.device}: {why}. This model's decode attention dequantizes instead (slower)",
                RuntimeWarning,
                stacklevel=4,
            )
    return ok


def _fused_unsupported(layer: TurboQuantLayer, q: torch.Tensor) -> str | None:
    """Why tq_kernels' decode kernel cannot serve queries ``q`` over ``layer`` (its documented limits:
    device, dtype, head_dim, format layout, Triton installed), or ``None`` when it can."""
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "the kernel runs on CUDA devices (or on CPU under TRITON_INTERPRET=1)"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return "the kernel takes float16, bfloat16 or float32 queries"
    if layer.head_dim not in KERNEL_HEAD_DIMS:
        return f"head_dim {layer.head_dim} has no kernel (supported: {KERNEL_HEAD_DIMS})"
    if find_spec("triton") is None:
        return "Triton is not installed (pip install triton)"
    from tq_kernels._format import kernel_format

    try:
        kernel_format(layer.fmt)  # raises ValueError for layouts the kernels do not read
    except ValueError as e:
        return str(e)
    return None


def _check_fused_path(
    layer: TurboQuantLayer, q: torch.Tensor, window: int | None, softcap: float | None
) -> float:
    hkv, d, c = layer.num_kv_heads, layer.head_dim, layer.chunk_tokens
    probe = TurboQuantLayer(
        layer.fmt,
        0,
        num_kv_heads=hkv,
        sliding_window=None if window is None else min(window, 2 * c),
        residual_length=max(layer.residual_length, 2),
        chunk_tokens=c,
        backend="triton",
        fused_attention=True,
    )
    g = torch.Generator(device="cpu").manual_seed(0)

    def kv(t: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.randn(2, hkv, t, d, generator=g).to(q.device, q.dtype)
        return k, torch.randn(2, hkv, t, d, generator=g).to(q.device, q.dtype)

    prompt = 5 * c + 3
    probe.update(*kv(prompt))
    pads = (0, c + 5)
    pads_dev = torch.tensor(pads, device=q.device)
    probe.flush_pending(pads, pads_dev)
    for _ in range(3):
        probe.update(*kv(1))
    qq = torch.randn(2, q.shape[1], 1, d, generator=g).to(q.device, q.dtype)
    win = probe.sliding_window
    read = probe.decode_read(pads, pads_dev, win)
    if read is None or read.compressed is None:
        raise RuntimeError("the probe layer has nothing for the decode kernel to read")
    got = _fused_decode(qq, read, pads, pads_dev, scale=d**-0.5, window=win, softcap=softcap, sinks=None)
    k, v = probe.dequantize()
    n = probe.cumulative_length
    mask = (torch.arange(n, device=q.device)[None, :] >= pads_dev[:, None])[:, n - k.shape[2] :]
    want = dense_attention(
        qq.float(), k.float(), v.float(), scale=d**-0.5, key_mask=mask, window=win, softcap=softcap
    )
    if not bool(torch.isfinite(got).all()):
        return float("inf")
    return float((got.float() - want).norm() / want.norm())


def _residual_part(
    read: DecodeRead,
    q1: torch.Tensor,
    pads: tuple[int, ...] | None,
    pads_dev: torch.Tensor | None,
    *,
    scale: float,
    window: int | None,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of decode queries `[B, H, d]` over the residual window, in float32: (normalized
    output `[B, H, d]`, log-sum-exp `[B, H]`)."""
    b, h, d = q1.shape
    kr, vr = read.residual_k, read.residual_v
    hkv, r = kr.shape[1], kr.shape[2]
    s = torch.matmul(q1.reshape(b, hkv, h // hkv, d).float() * scale, kr.float().transpose(-1, -2))
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    n0, n = read.residual_pos, read.length
    cut_pad = pads is not None and pads_dev is not None and max(pads) > n0
    cut_window = window is not None and n - window > n0
    if cut_pad or cut_window:  # short prompts with padding, or windows shorter than the residual
        pos = n0 + torch.arange(r, device=q1.device)
        ok = torch.ones(b, r, dtype=torch.bool, device=q1.device)
        if cut_pad:
            assert pads_dev is not None
            ok &= pos[None, :] >= pads_dev.to(q1.device)[:, None]
        if cut_window:
            assert window is not None
            ok &= (n - 1 - pos)[None, :] < window
        s = s.masked_fill(~ok[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)  # [b, hkv, g, 1]
    out = torch.matmul(torch.exp(s - lse), vr.float())
    return out.reshape(b, h, d), lse.reshape(b, h)


def _fused_decode(
    q: torch.Tensor,
    read: DecodeRead,
    pads: tuple[int, ...] | None,
    pads_dev: torch.Tensor | None = None,
    *,
    scale: float,
    window: int | None,
    softcap: float | None,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """One decode step of queries `[B, H, 1, d]` over what ``read`` names: the compressed tokens
    through tq_kernels' paged decode kernel (launched as ``plan_decode`` plans it), the residual window
    exactly, merged by their log-sum-exps."""
    from tq_kernels.ops.decode import plan_decode, tq_decode_attention

    b, h, _, d = q.shape
    q1 = q[:, :, 0]
    r = read.residual_k.shape[2]
    window_c = None if window is None else window - r  # compressed tokens inside the window
    out = lse = None
    if r:
        out, lse = _residual_part(read, q1, pads, pads_dev, scale=scale, window=window, softcap=softcap)
    paged = read.compressed
    if paged is not None and (window_c is None or window_c > 0):
        hkv = read.residual_k.shape[1]
        launch = plan_decode(read.fmt, h, hkv, b, max(paged.max_seq_len, 1), q.device, cache=paged.slots)
        o_c, lse_c = tq_decode_attention(
            q1.float(),
            paged.slots,
            paged.block_table,
            paged.seq_lens,
            read.fmt,
            layer=read.layer_idx,
            scale=scale,
            sliding_window=window_c,
            softcap=softcap,
            plan=launch,
            return_lse=True,
        )
        if out is None or lse is None:
            out, lse = o_c, lse_c
        else:
            w = torch.sigmoid(lse_c - lse)  # share of the compressed tokens in the softmax mass
            out = torch.lerp(out, o_c, w.unsqueeze(-1))
            if sinks is not None:
                lse = torch.logaddexp(lse, lse_c)
    if out is None or lse is None:  # nothing visible (residual_length=0 and a window of 0)
        return q.new_zeros(b, 1, h, d)
    if sinks is not None:
        out = out * torch.sigmoid(lse - sinks.float()).unsqueeze(-1)
    return out.to(q.dtype).view(b, 1, h, d)


# -- the AttentionInterface entry point -------------------------------------------------------------
def turboquant_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function (``AttentionInterface`` signature).

    Args:
        module: the attention module (``training`` is read, and ``is_causal`` for K/V that do not come
            from a TurboQuantCache: an image encoder's attention is bidirectional).
        query: `[B, H, T, d]`.
        key, value: `[B, Hkv, L, d]`, or :class:`~tq_hf.cache.CompressedKV` placeholders from a
            :class:`~tq_hf.cache.TurboQuantCache` layer.
        attention_mask: from :func:`turboquant_mask`: the 2D padding mask, ``None``, or a 4D mask,
            which is then the whole pattern (a vision-language model's bidirectional image ranges).
        scaling: softmax scale (default ``d ** -0.5``).
        sliding_window: the layer's window, if any.
        softcap: logit soft-capping (Gemma 2).
        kwargs: ``s_aux`` (attention sinks `[H]`) is honored; the rest is ignored.

    Returns:
        (`[B, T, H, d]`, ``None``): attention weights are never materialized.

    Example:
        >>> import torch
        >>> q, k = torch.randn(1, 4, 3, 64), torch.randn(1, 2, 3, 64)
        >>> m = torch.nn.Module()
        >>> out, _ = turboquant_attention_forward(m, q, k, k, None)
        >>> out.shape
        torch.Size([1, 3, 4, 64])
    """
    if dropout and module.training:
        raise ValueError("the turboquant attention is for inference: dropout is not supported")
    # Without a 4D mask, as in transformers' SDPA attention, the module says whether the pattern is causal
    # (an image encoder's is not).  Over a TurboQuantCache it always is: a decoder whose module is flagged
    # bidirectional (PaliGemma's, Gemma 3's) gets its bidirectional ranges through the 4D mask.
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if kwargs.get("position_bias") is not None:
        raise ValueError("the turboquant attention does not support additive position biases (ALiBi, T5)")
    if kwargs.get("output_attentions"):
        warnings.warn("the turboquant attention does not return attention weights", stacklevel=2)
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    sinks = kwargs.get("s_aux")
    if isinstance(key, CompressedKV):
        window = sliding_window if sliding_window is not None else key.tq_layer.sliding_window
        out = _layer_attention(
            key.tq_layer, query, attention_mask, scale=scale, window=window, softcap=softcap, sinks=sinks
        )
        return out, None
    tagged = getattr(key, "tq_layer", None)
    if isinstance(tagged, TurboQuantLayer):
        tagged.claim_for_fused_attention()
        if tagged.pending is not None and tagged.pending[0] is key:
            return _layer_attention(
                tagged,
                query,
                attention_mask,
                scale=scale,
                window=sliding_window if sliding_window is not None else tagged.sliding_window,
                softcap=softcap,
                sinks=sinks,
            ), None
    mask2d, mask4d = None, None
    if isinstance(attention_mask, torch.Tensor):
        if attention_mask.dim() == 2:
            mask2d = attention_mask.to(torch.bool)[:, -key.shape[2] :]
        else:
            mask4d = attention_mask[..., -key.shape[2] :]
    out = dense_attention(
        query,
        key,
        value,
        scale=scale,
        key_mask=mask2d,
        mask4d=mask4d,
        window=sliding_window if causal else None,
        softcap=softcap,
        sinks=sinks,
        causal=causal,
    )
    return out, None


def register(name: str = ATTENTION_NAME) -> None:
    """Register the attention function and its mask function with transformers under ``name``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, turboquant_attention_forward)
    AttentionMaskInterface.register(name, turboquant_mask)
