"""The engine steps the tests replay that differ between the vLLM releases tq-vllm supports.

Page sizing of a layer's ``AttentionSpec``:

* 0.32: ``vllm.v1.worker.utils.customize_attention_spec``, the backend's ``customize_spec`` hook plus a
  block-stride alignment from the backend's kernel block sizes;
* 0.28-0.31: the model runner's ``get_kv_cache_spec`` calls ``customize_spec`` itself;
* 0.26-0.27: there is no hook; the attention layer sizes a full-attention turboquant layer from the
  dtype, as a ``TQFullAttentionSpec`` of vLLM's ``slot_size_aligned`` bytes per token-head, and
  leaves sliding-window layers at their own (larger) page.

0.27 and 0.28 also record, before that, whether the backend indexes pages by block stride.  The tests
size pages with vLLM's own function where it exists and repeat the engine's steps where it does not,
so they check what the installed engine would allocate.

``KV_CACHE_LAYOUTS``: 0.31 and 0.32 let the backend choose the physical cache order through
``supported_kv_cache_layouts``; older releases take ``get_kv_cache_stride_order`` instead.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

from vllm.config import VllmConfig, set_current_vllm_config
from vllm.v1.attention.backend import AttentionBackend
from vllm.v1.kv_cache_interface import FullAttentionSpec

try:  # vLLM 0.32
    from vllm.v1.worker.utils import customize_attention_spec as _engine_customize
except ImportError:  # vLLM 0.26-0.31
    _engine_customize = None

__all__ = ["KV_CACHE_LAYOUTS", "SPEC_HOOK", "customize_attention_spec"]

KV_CACHE_LAYOUTS = importlib.util.find_spec("vllm.v1.kv_cache_layout") is not None
# Whether the engine asks the backend for the page size (0.28 and later).
SPEC_HOOK = hasattr(AttentionBackend, "customize_spec")


def customize_attention_spec(backend: type, spec: Any, kv_cache_dtype: str) -> Any:
    """``spec`` of a layer with ``kv_cache_dtype`` as the installed vLLM's engine passes it on to
    ``backend`` (0.26-0.27 do not let the backend change it)."""
    if _engine_customize is not None:
        return _engine_customize(backend, spec)
    fields = {f.name for f in dataclasses.fields(spec)}
    if "indexes_kv_by_block_stride" in fields and hasattr(backend, "indexes_kv_by_block_stride"):
        # 0.27-0.28 (gpu_model_runner.get_kv_cache_spec): the stride order is read inside the config
        with set_current_vllm_config(VllmConfig()):
            indexes = backend.indexes_kv_by_block_stride()
        spec = dataclasses.replace(spec, indexes_kv_by_block_stride=indexes)
    if SPEC_HOOK:
        return backend.customize_spec(spec)
    if type(spec) is not FullAttentionSpec or not kv_cache_dtype.startswith("turboquant_"):
        return spec
    # 0.26-0.27 (Attention.get_kv_cache_spec): the page comes from vLLM's TurboQuant config
    from vllm.model_executor.layers.quantization.turboquant.config import TurboQuantConfig
    from vllm.v1.kv_cache_interface import TQFullAttentionSpec

    slot = TurboQuantConfig.from_cache_dtype(kv_cache_dtype, spec.head_size).slot_size_aligned
    values = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.init}
    return TQFullAttentionSpec(**values, tq_slot_size=slot)
