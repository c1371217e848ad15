"""The data-less K/V placeholders :class:`~tq_hf.layer.TurboQuantLayer` hands the ``"turboquant"`` attention.

:meth:`TurboQuantLayer.update <tq_hf.layer.TurboQuantLayer.update>` returns a :class:`CompressedKV` for
K and for V when the layer's tokens stay compressed; the attention function finds the layer through
``.tq_layer`` and asks it what to read.  Anything else that computes with a placeholder gets an error
that says how to load the model, instead of a wrong answer.  :mod:`tq_hf.layer` re-exports the class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tq_hf.layer import TurboQuantLayer

__all__ = ["CompressedKV"]

_PLACEHOLDER_OK = {
    torch.Tensor.shape.__get__,  # type: ignore[attr-defined]
    torch.Tensor.dtype.__get__,  # type: ignore[attr-defined]
    torch.Tensor.device.__get__,
    torch.Tensor.ndim.__get__,  # type: ignore[attr-defined]
    torch.Tensor.dim,
    torch.Tensor.size,
    torch.Tensor.__repr__,
    torch.Tensor.__format__,
}


class CompressedKV(torch.Tensor):
    """Stands in for a layer's K or V when they live compressed in a :class:`TurboQuantLayer`.

    Only the ``"turboquant"`` attention function reads it (through ``.tq_layer``).  It has no data
    (``meta`` device, sequence length 0): any other attention implementation that tries to compute with
    it gets an error naming the problem instead of a wrong answer.
    """

    tq_layer: TurboQuantLayer

    @staticmethod
    def __new__(cls, layer: TurboQuantLayer, shape: tuple[int, ...], dtype: torch.dtype) -> CompressedKV:
        t = torch.Tensor._make_subclass(cls, torch.empty(shape, dtype=dtype, device="meta"))
        t.tq_layer = layer
        return t

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in _PLACEHOLDER_OK:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        layer = next((a.tq_layer for a in args if isinstance(a, CompressedKV)), None)
        idx = layer.layer_idx if layer is not None else "?"
        raise RuntimeError(
            f"TurboQuantCache layer {idx} keeps its keys and values compressed for the 'turboquant' "
            f"attention, but another attention implementation tried to use them "
            f"({getattr(func, '__name__', func)}). Load the model with attn_implementation='turboquant' "
            "(after `import tq_hf`), or create the cache with TurboQuantCache(..., fused_attention=False) so "
            "every layer is dequantized for any attention."
        )


def _tag(t: torch.Tensor, layer: TurboQuantLayer) -> torch.Tensor:
    t.tq_layer = layer  # type: ignore[attr-defined]
    return t
