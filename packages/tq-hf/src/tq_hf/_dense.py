"""Attention over full K/V tensors: the prompt, the dequantize path and any cache but
:class:`~tq_hf.cache.TurboQuantCache` (SDPA on CUDA, float32 reference math otherwise).

The pattern is causal (with an optional sliding window and a key-padding mask) unless a 4D mask is
given: transformers' 4D masks spell out the whole pattern (causality, windows, padding, and what a
model lays over them, such as the bidirectional image ranges of vision-language models), so they
replace the causal one, as in transformers' SDPA and eager attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dense_attention"]


def _allowed(t: int, length: int, q_offset: int, window: int | None, device: torch.device) -> torch.Tensor:
    """bool `[t, length]`: query i (at key index q_offset + i) sees key j."""
    i = torch.arange(t, device=device)[:, None] + q_offset
    j = torch.arange(length, device=device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= (i - j) < window
    return allowed


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    q_offset: int | None = None,
    key_mask: torch.Tensor | None = None,
    mask4d: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """Attention of queries `[B, H, T, d]` over keys/values `[B, Hkv, L, d]`, causal by default.

    Query ``i`` sits at key index ``q_offset + i`` (default ``L - T``: the queries are the last keys).

    Args:
        key_mask: bool `[B, L]`, False for padding keys.
        mask4d: bool (True = attend) or additive float `[B or 1, 1 or H, T, L]`: the whole pattern;
            when given, neither causality nor ``window`` is applied again.
        window: sliding window (key j visible from query position p iff ``p - j < window``).
        softcap: tanh soft-capping of the scores.
        sinks: `[H]` attention-sink logits.
        causal: ``False`` for bidirectional attention (an image encoder's); takes no ``window``.

    Returns:
        `[B, T, H, d]` in ``q``'s dtype (the layout transformers' attention functions return).
    """
    b, h, t, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    group = h // hkv
    if not causal and window is not None:
        raise ValueError("a sliding window needs causal attention (causal=True)")
    off = length - t if q_offset is None else q_offset
    pattern = causal and mask4d is None  # whether causality (and the window) are applied here
    window_cuts = pattern and window is not None and off + t - 1 >= window  # some query cannot see key 0
    # whether the causal pattern may be skipped: one query, the newest key (it sees every key)
    sees_all = not pattern or (t == 1 and off == length - 1 and not window_cuts)

    if q.is_cuda and softcap is None and sinks is None:
        if key_mask is None and mask4d is None and sees_all:
            out = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=group > 1)
        elif key_mask is None and pattern and not window_cuts and off == 0 and t == length:
            # a prompt: the flash kernels' causal mask
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=group > 1)
        else:
            attn_mask = None if sees_all else _allowed(t, length, off, window, q.device)[None, None]
            if key_mask is not None:
                km = key_mask[:, None, None, :]
                attn_mask = km if attn_mask is None else attn_mask & km
            if mask4d is not None:
                if mask4d.dtype == torch.bool:
                    attn_mask = mask4d if attn_mask is None else attn_mask & mask4d
                elif attn_mask is None:
                    attn_mask = mask4d.to(q.dtype)
                else:
                    attn_mask = torch.where(attn_mask, mask4d.to(q.dtype), float("-inf"))
            if group > 1:  # SDPA's mask-capable kernels do not all take enable_gqa
                k = k.repeat_interleave(group, dim=1)
                v = v.repeat_interleave(group, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
        return out.transpose(1, 2).contiguous()

    allowed = None if sees_all else _allowed(t, length, off, window, q.device)[None, None]
    if key_mask is not None:
        km = key_mask[:, None, None, :]
        allowed = km if allowed is None else allowed & km
    bias = None
    if mask4d is not None:
        if mask4d.dtype == torch.bool:
            allowed = mask4d if allowed is None else allowed & mask4d
        else:
            bias = mask4d

    # float32 reference math (CPU, softcap, sinks)
    def per_group(x: torch.Tensor) -> torch.Tensor:  # [B', 1 or H, T, L] -> [B', hkv or 1, g or 1, T, L]
        return x[:, :, None] if x.shape[1] == 1 else x.reshape(x.shape[0], hkv, group, t, length)

    # Non-finite inputs follow tq_core.attention_ref: a query's output is NaN if the query or a key/value
    # it sees holds a NaN/Inf; hidden keys never affect it (they are zeroed first, so no 0 * NaN leaks in);
    # a query that sees no key outputs 0.
    qf, bad_q = _zero_nonfinite(q.float().view(b, hkv, group, t, d))  # bad_q [B, hkv, g, T]
    kf, bad_k = _zero_nonfinite(k.float())  # [B, hkv, L]
    vf, bad_v = _zero_nonfinite(v.float())
    s = torch.einsum("bkgtd,bkld->bkgtl", qf, kf) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + per_group(bias.float())
    if allowed is not None:
        s = s.masked_fill(~per_group(allowed), float("-inf"))
    visible = s != float("-inf")  # masked by `allowed` or by a -inf bias
    sees_any = visible.any(-1)  # [B, hkv, g, T]
    if sinks is not None:
        col = sinks.float().view(1, hkv, group, 1, 1).expand(b, hkv, group, t, 1)
        p = torch.softmax(torch.cat([s, col], dim=-1), dim=-1)[..., :length]
    else:
        p = torch.softmax(s, dim=-1)
        p = p.masked_fill(~sees_any[..., None], 0.0)  # a query that sees no key outputs 0
    out = torch.einsum("bkgtl,bkld->bkgtd", p, vf)
    seen_bad = (visible & (bad_k | bad_v)[:, :, None, None, :]).any(-1)
    poisoned = seen_bad | (bad_q & sees_any)
    out = out.masked_fill(poisoned[..., None], float("nan")).reshape(b, h, t, d)
    return out.transpose(1, 2).contiguous().to(q.dtype)


def _zero_nonfinite(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` with its non-finite vectors (last dim) zeroed, and which vectors those were."""
    bad = ~torch.isfinite(x).all(-1)
    return x.masked_fill(bad[..., None], 0.0), bad
