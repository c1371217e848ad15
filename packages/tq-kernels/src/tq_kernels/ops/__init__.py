"""Typed launchers of the TurboQuant kernels; each validates its inputs before anything launches.

Example:
    >>> from tq_kernels.ops import tq_decode_attention, tq_store_paged  # doctest: +SKIP
"""

from tq_kernels.ops.decode import DecodePlan, default_num_splits, plan_decode, tq_decode_attention
from tq_kernels.ops.dequant import tq_dequantize, tq_dequantize_paged
from tq_kernels.ops.extend import tq_extend_attention
from tq_kernels.ops.store import tq_store, tq_store_paged

__all__ = [
    "DecodePlan",
    "default_num_splits",
    "plan_decode",
    "tq_decode_attention",
    "tq_dequantize",
    "tq_dequantize_paged",
    "tq_extend_attention",
    "tq_store",
    "tq_store_paged",
]
