"""How many Triton kernels vLLM's CUDA-graph capture makes tq-vllm compile, counted on the CPU.

Capture runs one uniform decode step (every request one new token) per capture size through every
layer: ``prepare()`` (before capture), then the store and the decode of each compressed layer.  A
Triton kernel compiles once per *specialization*: its constexpr values and launch options, plus for
every other argument its type and Triton's integer and pointer specialization (an int equal to 1,
divisible by 16, a pointer 16-byte aligned).  Here every Triton launch goes through the real
launchers with the H100's launch configurations and SM count, and is recorded, not run, under
``TRITON_INTERPRET``: the key of a launch is computed with Triton's own specialization function.
The number of distinct keys must not grow with the number of capture sizes: the decode kernel may
compile once per power-of-two split count (plus the warm-up's), the store once.

Capture sizes are vLLM 0.32's default for ``max_num_seqs=512`` (``VllmConfig._set_cudagraph_sizes``:
1, 2, 4, then multiples of 8 below 256, then multiples of 16 up to 512).
"""

from __future__ import annotations

import inspect

import pytest

pytest.importorskip("vllm")

import torch
from _steps import Layer, build_layer
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend
from triton.runtime.interpreter import InterpretedFunction
from vllm.v1.attention.backend import CommonAttentionMetadata

import tq_kernels.ops.decode as decode_ops
import tq_kernels.tuning
from tq_kernels.tuning import MAX_SPLITS
from tq_vllm.impl import compressed_cache_view

CAPTURE_SIZES = [1, 2, 4, *range(8, 256, 8), *range(256, 513, 16)]
H100_SMS = 132
# Llama-8B attention: 32 query heads, 8 KV heads, head_dim 128; pages of 16 tokens
SHAPE = dict(h=32, hkv=8, d=128, dtype=torch.bfloat16)
BLOCK, MAX_MODEL_LEN = 16, 8192
FORMATS = ("turboquant_k8v4", "turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_3bit_nc")
# what a power-of-two split heuristic can give, plus the warm-up's single split
DECODE_VARIANTS = MAX_SPLITS.bit_length() + 1


def _key(fn: InterpretedFunction, args: tuple, kwargs: dict) -> tuple:
    """The specialization a compiled launch of ``fn`` would be cached under."""
    params = inspect.signature(fn.fn).parameters
    bound = {name: value for name, value in zip(params, args, strict=False)}
    options = {}
    for name, value in kwargs.items():
        (bound if name in params else options)[name] = value
    no_spec = set(fn.kwargs.get("do_not_specialize") or ())
    key = []
    for name, p in params.items():
        value = bound.get(name, p.default)
        if "constexpr" in str(p.annotation):
            key.append((name, value))
        else:
            key.append((name, native_specialize_impl(BaseBackend, value, False, name not in no_spec, True)))
    return fn.fn.__name__, tuple(key), tuple(sorted(options.items()))


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Every Triton launch as (kernel, specialization key); kernels are recorded, not run.  The
    launchers see an H100 (its launch configurations and SM count)."""
    seen: list[tuple] = []

    def record(self, *args, grid, warmup, **kwargs):
        seen.append(_key(self, args, kwargs))

    monkeypatch.setattr(InterpretedFunction, "run", record)
    monkeypatch.setattr(tq_kernels.tuning, "_arch", lambda device: (9, 0))
    monkeypatch.setattr(decode_ops, "sm_count", lambda device: H100_SMS)
    return seen


def _capture(kv: str, sizes: list[int], launches: list[tuple]) -> dict[str, set]:
    """Distinct specializations per kernel of ``prepare()`` plus one captured decode step per size
    through one compressed layer, with vLLM's persistent input buffers (sliced per size)."""
    name = "model.layers.5.self_attn.attn"
    builder, impl, _, _ = build_layer(dict(SHAPE, kv=kv), name, BLOCK)
    builder.max_model_len = MAX_MODEL_LEN
    impl.prepare(name, torch.device("cpu"), BLOCK, warm=True, dtype=SHAPE["dtype"])
    top = max(sizes)
    max_blocks = MAX_MODEL_LEN // BLOCK
    kv_cache = impl.fmt.allocate_cache(top + 1, BLOCK, SHAPE["hkv"])
    assert compressed_cache_view(kv_cache, impl.fmt.slot_bytes) is kv_cache
    query = torch.zeros(top, SHAPE["h"], SHAPE["d"], dtype=SHAPE["dtype"])
    key = torch.zeros(top, SHAPE["hkv"], SHAPE["d"], dtype=SHAPE["dtype"])
    table = torch.zeros(top, max_blocks, dtype=torch.int32)
    seq_lens = torch.ones(top, dtype=torch.int32)
    qsl = torch.arange(top + 1, dtype=torch.int32)
    slots = torch.arange(top, dtype=torch.int64) * BLOCK
    output = torch.empty(top, SHAPE["h"] * SHAPE["d"], dtype=SHAPE["dtype"])
    layer = Layer(name)
    for b in sizes:
        cam = CommonAttentionMetadata(
            query_start_loc=qsl[: b + 1],
            query_start_loc_cpu=qsl[: b + 1],
            seq_lens=seq_lens[:b],
            num_reqs=b,
            num_actual_tokens=b,
            max_query_len=1,
            max_seq_len=MAX_MODEL_LEN,
            block_table_tensor=table[:b],
            slot_mapping=slots[:b],
            seq_lens_cpu_upper_bound=seq_lens[:b],
        )
        meta = builder.build(0, cam)
        impl.do_kv_cache_update(layer, key[:b], key[:b], kv_cache, slots[:b])
        impl.forward(layer, query[:b], key[:b], key[:b], kv_cache, meta, output=output[:b])
    variants: dict[str, set] = {}
    for kernel, spec, options in launches:
        variants.setdefault(kernel, set()).add((spec, options))
    return variants


@pytest.mark.parametrize("kv", FORMATS)
def test_capture_compiles_a_bounded_number_of_kernels(kv: str, launches: list[tuple]) -> None:
    variants = _capture(kv, CAPTURE_SIZES, launches)
    counts = {k: len(v) for k, v in variants.items()}
    splits = {dict(spec)["NUM_SPLITS"] for spec, _ in variants["_tq_decode_attention_kernel"]}
    # the decode kernel and its reduce: one variant per split count, no more
    assert counts["_tq_decode_attention_kernel"] == len(splits) <= DECODE_VARIANTS, counts
    assert counts["_tq_decode_reduce_kernel"] == len(splits), counts
    assert len(splits) > 2  # the H100's heuristic does vary the splits with the batch
    # the store: prepare()'s decode-sized launch, reused by every size (its row count is not
    # specialized; prepare()'s prefill-sized launch runs on CUDA devices only)
    assert counts["_tq_store_kernel"] == 1, counts
    # no other kernel compiles for a decode step; prepare()'s extend and dequantize once each
    assert counts.get("_tq_extend_attention_kernel", 0) <= 1 and counts.get("_tq_dequant_kernel", 0) <= 2


def test_capture_compiles_the_same_kernels_for_more_capture_sizes(launches: list[tuple]) -> None:
    """Twice the capture sizes (every multiple of 8 up to 512) compile nothing more than the default
    list: a launch's specialization depends on its size class, never on the size itself."""
    default = _capture("turboquant_4bit_nc", CAPTURE_SIZES, launches)
    launches.clear()
    dense = _capture("turboquant_4bit_nc", sorted({*CAPTURE_SIZES, *range(8, 513, 8)}), launches)
    assert dense == default
