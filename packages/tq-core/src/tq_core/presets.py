"""vLLM's TurboQuant presets: the byte budget of each ``kv_cache_dtype`` name and what vLLM stores in it.

tq's named formats (:func:`tq_core.formats.named_format`) take only a preset's bytes per token-head from
here and lay out their own codes inside them; :func:`vllm_layout` says what vLLM itself stores under the
name, which is what the name describes.  :mod:`tq_core.formats` re-exports every name of this module.

Example:
    >>> budget_bytes("turboquant_4bit_nc", 128)
    134
"""

from __future__ import annotations

from tq_core._validate import check_head_dim
from tq_core.packing import packed_bytes

__all__ = ["PRESET_NAMES_NOTE", "VLLM_PRESETS", "budget_bytes", "vllm_layout"]

# vLLM's TurboQuant presets at head_dim d: (key bits, value bits, metadata bytes per token-head).
# vLLM stores keys as Hadamard-rotated Lloyd-Max codes (k8v4: raw fp8) + a float16 norm, and values with
# per-token uniform min/max codes + float16 scale and zero point; the slot is rounded up to even bytes.
VLLM_PRESETS: dict[str, tuple[int, int, int]] = {
    "turboquant_k8v4": (8, 4, 4),
    "turboquant_4bit_nc": (4, 4, 6),
    "turboquant_k3v4_nc": (3, 4, 6),
    "turboquant_3bit_nc": (3, 3, 6),
}


def vllm_layout(preset: str) -> str:
    """What vLLM itself stores under the dtype name ``preset``: the name describes this, not tq's layout.

    tq's named format of the same name keeps only the preset's bytes per token-head
    (:func:`budget_bytes`) and lays out its own codes inside them (:func:`named_format`).

    Example:
        >>> vllm_layout("turboquant_k8v4")
        'K fp8, V 4 bit uniform'
        >>> vllm_layout("turboquant_4bit_nc")
        'K 4 bit Lloyd-Max, V 4 bit uniform'
    """
    if not isinstance(preset, str) or preset not in VLLM_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(VLLM_PRESETS)}")
    kb, vb, _ = VLLM_PRESETS[preset]
    key = "K fp8" if kb == 8 else f"K {kb} bit Lloyd-Max"
    return f"{key}, V {vb} bit uniform"


#: One sentence for wherever a user meets the named formats (``turboquant formats``, READMEs, docs).
PRESET_NAMES_NOTE = (
    "The format names are vLLM's kv_cache_dtype names and describe vLLM's own layouts (turboquant_k8v4 "
    f"in vLLM: {vllm_layout('turboquant_k8v4')}); tq keeps only each preset's bytes per token-head and "
    "stores its own layout in them."
)


def budget_bytes(preset: str, head_dim: int) -> int:
    """Bytes per token-head that vLLM's preset ``preset`` takes at ``head_dim`` (196/134/118/102 at 128)."""
    if not isinstance(preset, str) or preset not in VLLM_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(VLLM_PRESETS)}")
    check_head_dim(head_dim, "head_dim")
    kb, vb, meta = VLLM_PRESETS[preset]
    total = packed_bytes(head_dim, kb) + packed_bytes(head_dim, vb) + meta
    return total + (total & 1)  # vLLM rounds the slot up to an even size
