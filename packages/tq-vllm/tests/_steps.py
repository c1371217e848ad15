"""Builders for backend tests: vLLM-shaped caches and one engine step of mixed requests.

A step is a list of requests ``(cached, new)``: ``cached`` tokens already in the KV cache from earlier
steps and ``new`` tokens computed now, in vLLM's order (decodes, i.e. ``new == 1``, first).  Blocks are
scattered at random, so a wrong block-table or stride path cannot pass by accident, and K/V/Q are
fresh random values per test.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from _vllm_compat import customize_attention_spec
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.kv_cache_interface import FullAttentionSpec, get_kv_quant_mode

from tq_core import attention_ref
from tq_core.attention import mm_prefix_mask
from tq_core.testing import poisoned
from tq_vllm.backend import TurboQuantBackend

# vLLM 0.32 names a KV-cache layout by the physical order of the axes L(ayer) B(lock) H(ead) N (token)
# C(ontent); vLLM 0.26 with tq-vllm's stride order is LBHNC.  Compressed layers need H outside N.
LAYOUTS = ("LBHNC", "BLHNC", "LBNHC")
PAD = 2  # padding tokens appended to every step, as CUDA-graph padding does


class Layer(torch.nn.Module):
    """Stands in for vLLM's ``Attention`` module: the impl reads only ``layer_name``."""

    def __init__(self, layer_name: str) -> None:
        super().__init__()
        self.layer_name = layer_name


def vllm_cache(
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    content: int,
    dtype: torch.dtype,
    layout: str = "LBHNC",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(physical tensor, the logical ``[blocks, heads, tokens, content]`` view vLLM hands the impl).

    The physical tensor holds two layers in ``layout``'s axis order; the view is the second layer's,
    so layouts with the layer axis inside the block axis (BLHNC) give strided blocks, as in vLLM.
    """
    sizes = {"L": 2, "B": num_blocks, "H": num_kv_heads, "N": block_size, "C": content}
    # never-written compressed slots hold POISON_BYTE; an uncompressed slot read before it was written
    # is NaN and poisons the output
    physical = poisoned([sizes[axis] for axis in layout], dtype=dtype)
    logical = physical.permute([layout.index(axis) for axis in "LBHNC"])
    return physical, logical[1]


@dataclass
class Step:
    """Tensors of one engine step and the full K/V history behind it."""

    block_table: torch.Tensor  # int32 [num_reqs, max_blocks]
    cached_lens: torch.Tensor  # int32 [num_reqs]
    query_lens: torch.Tensor  # int32 [num_reqs]
    seq_lens: torch.Tensor  # int32 [num_reqs]
    query_start_loc: torch.Tensor  # int32 [num_reqs + 1]
    keys: list[torch.Tensor]  # per request [seq_len, num_kv_heads, head_size]
    values: list[torch.Tensor]
    history_slots: torch.Tensor  # int64, slots of the cached tokens (all requests)
    new_slots: torch.Tensor  # int64 [num_tokens + PAD], -1 for padding
    query: torch.Tensor  # [num_tokens + PAD, num_heads, head_size]
    new_keys: torch.Tensor  # [num_tokens + PAD, num_kv_heads, head_size]
    new_values: torch.Tensor
    num_blocks: int
    # a prefix-LM model's media ranges per request index (vLLM's mm_req_doc_ranges), or None
    media: dict[int, list[tuple[int, int]]] | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.query_lens.sum())

    def history(self) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.cat([k[: int(c)] for k, c in zip(self.keys, self.cached_lens, strict=True)])
        v = torch.cat([v[: int(c)] for v, c in zip(self.values, self.cached_lens, strict=True)])
        return k, v

    def common_metadata(self) -> CommonAttentionMetadata:
        return CommonAttentionMetadata(
            query_start_loc=self.query_start_loc,
            query_start_loc_cpu=self.query_start_loc.clone(),
            seq_lens=self.seq_lens,
            num_reqs=len(self.keys),
            num_actual_tokens=self.num_tokens,
            max_query_len=int(self.query_lens.max()),
            max_seq_len=int(self.seq_lens.max()),
            block_table_tensor=self.block_table,
            slot_mapping=self.new_slots,
            seq_lens_cpu_upper_bound=self.seq_lens.clone(),
            **({"mm_req_doc_ranges": self.media} if self.media is not None else {}),
        )


def make_step(
    requests: list[tuple[int, int]],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int,
    spare_blocks: int = 3,
    media: dict[int, list[tuple[int, int]]] | None = None,
) -> Step:
    g = torch.Generator().manual_seed(seed)
    seq = [c + n for c, n in requests]
    max_blocks = max(1, max(-(-s // block_size) for s in seq))
    num_blocks = len(requests) * max_blocks + spare_blocks
    table = torch.randperm(num_blocks, generator=g)[: len(requests) * max_blocks].view(len(requests), -1)

    def slots(b: int, positions: torch.Tensor) -> torch.Tensor:
        return table[b][positions // block_size] * block_size + positions % block_size

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    keys = [rand(s, num_kv_heads, head_size, scale=2.0) for s in seq]
    values = [rand(s, num_kv_heads, head_size) for s in seq]
    history = [slots(b, torch.arange(c)) for b, (c, _) in enumerate(requests)]
    new = [slots(b, torch.arange(c, c + n)) for b, (c, n) in enumerate(requests)]
    num_tokens = sum(n for _, n in requests)
    query_lens = torch.tensor([n for _, n in requests], dtype=torch.int32)
    return Step(
        block_table=table.to(torch.int32),
        cached_lens=torch.tensor([c for c, _ in requests], dtype=torch.int32),
        query_lens=query_lens,
        seq_lens=torch.tensor(seq, dtype=torch.int32),
        query_start_loc=torch.cat([torch.zeros(1, dtype=torch.int32), query_lens.cumsum(0).to(torch.int32)]),
        keys=keys,
        values=values,
        history_slots=torch.cat(history).to(torch.int64),
        new_slots=torch.cat([*new, torch.full((PAD,), -1)]).to(torch.int64),
        query=rand(num_tokens + PAD, num_heads, head_size),
        new_keys=torch.cat(
            [*(k[c:] for k, (c, _) in zip(keys, requests, strict=True)), rand(PAD, num_kv_heads, head_size)]
        ),
        new_values=torch.cat(
            [*(v[c:] for v, (c, _) in zip(values, requests, strict=True)), rand(PAD, num_kv_heads, head_size)]
        ),
        num_blocks=num_blocks,
        media=media,
    )


# -- one layer, built the way vLLM builds it ---------------------------------------------------------
def build_layer(case: dict, layer_name: str, block_size: int):
    """(builder, impl, spec, sinks) of one layer described by ``case`` (keys kv, d, h, hkv, dtype and
    optional window, softcap, sinks), constructed inside vLLM's config context as the engine does."""
    kv, d, dtype = case["kv"], case["d"], case["dtype"]
    spec = customize_attention_spec(
        TurboQuantBackend,
        FullAttentionSpec(
            block_size=block_size,
            num_kv_heads=case["hkv"],
            head_size=d,
            dtype=torch.uint8 if kv != "auto" else dtype,
            kv_quant_mode=get_kv_quant_mode(kv),
        ),
        kv,
    )
    g = torch.Generator().manual_seed(1)
    sinks = torch.randn(case["h"], generator=g) if case.get("sinks") else None
    config = VllmConfig()
    with set_current_vllm_config(config):
        builder = TurboQuantBackend.get_builder_cls()(spec, [layer_name], config, torch.device("cpu"))
        impl = TurboQuantBackend.get_impl_cls()(
            case["h"],
            d,
            d**-0.5,
            case["hkv"],
            None,
            case.get("window"),
            kv,
            case.get("softcap"),
            "decoder",
            None,
            sinks=sinks,
        )
    return builder, impl, spec, sinks


def attention_kwargs(case: dict, sinks: torch.Tensor | None) -> dict:
    """tq_core reference-attention options of ``case``."""
    return dict(
        scale=case["d"] ** -0.5, sliding_window=case.get("window"), softcap=case.get("softcap"), sinks=sinks
    )


def run_uncompressed_step(
    case: dict,
    requests: list[tuple[int, int]],
    layer_name: str,
    block_size: int,
    *,
    vllm_kernels: bool | None = None,
    flash=None,
    media: dict[int, list[tuple[int, int]]] | None = None,
):
    """One step through an uncompressed layer: (output `[num_tokens + PAD, h, d]`, exact reference
    `[num_tokens, h, d]`, num_tokens).  ``flash``: a stand-in for vLLM's FlashAttention varlen function,
    installed as the layer's attention (the writes stay on the torch path)."""
    d, h, hkv, dtype = case["d"], case["h"], case["hkv"], case["dtype"]
    step = make_step(
        requests, num_heads=h, num_kv_heads=hkv, head_size=d, block_size=block_size, dtype=dtype, seed=d,
        media=media,
    )  # fmt: skip
    builder, impl, spec, sinks = build_layer(case, layer_name, block_size)
    assert impl.fmt is None and impl.dense is not None
    assert spec.page_size_bytes == block_size * hkv * 2 * d * dtype.itemsize
    impl.dense.use_vllm_kernels = vllm_kernels
    layer = Layer(layer_name)
    _, kv_cache = vllm_cache(step.num_blocks, block_size, hkv, 2 * d, dtype, case.get("layout", "LBHNC"))
    hist_k, hist_v = step.history()
    impl.do_kv_cache_update(layer, hist_k, hist_v, kv_cache, step.history_slots)
    impl.do_kv_cache_update(layer, step.new_keys, step.new_values, kv_cache, step.new_slots)
    meta = builder.build(0, step.common_metadata())
    n = step.num_tokens
    output = poisoned((n + PAD, h, d), dtype=dtype)
    if flash is not None:
        impl.dense.flash, impl.dense.use_vllm_kernels = flash, True
    impl.forward(layer, step.query, step.new_keys, step.new_values, kv_cache, meta, output=output)
    kw = attention_kwargs(case, sinks)
    qsl = step.query_start_loc.tolist()
    refs = []
    for i, (cached, new) in enumerate(requests):
        q = step.query[qsl[i] : qsl[i + 1]]
        if media and media.get(i):  # the prefix-LM mask holds causality and the window
            mask = mm_prefix_mask(media[i], cached, new, sliding_window=kw["sliding_window"])
            refs.append(
                attention_ref(
                    q, step.keys[i], step.values[i], **{**kw, "sliding_window": None}, causal=False, mask=mask
                )
            )
        else:
            refs.append(attention_ref(q, step.keys[i], step.values[i], **kw))
    return output, torch.cat(refs), n
