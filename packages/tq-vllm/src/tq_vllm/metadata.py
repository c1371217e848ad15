"""Per-step attention metadata of the CUSTOM backend and the builder vLLM calls every step.

vLLM builds one :class:`TurboQuantMetadataBuilder` per attention group (compressed layers and
uncompressed boundary layers are separate groups), reorders each batch so requests with one new token
(decodes) come first (``reorder_batch_threshold = 1``, as vLLM's own TurboQuant backend), and calls
:meth:`TurboQuantMetadataBuilder.build` once per step.  The metadata only holds views of vLLM's
persistent tensors plus host integers: anything derived from tensors is computed inside ``forward``,
so a full CUDA graph captured for a decode batch reads the replayed step's values.

Decodes run the split-context kernel planned (:func:`tq_kernels.ops.decode.plan_decode`) by each layer
for the batch size and ``decode_len_bound``, the model's maximum length, never for the step's sequence
lengths: a captured graph keeps its grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch
from vllm.v1.attention.backend import (
    AttentionCGSupport,
    AttentionMetadata,
    AttentionMetadataBuilder,
    CommonAttentionMetadata,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills

if TYPE_CHECKING:
    from tq_vllm.prefix import PrefixGather

__all__ = ["TurboQuantMetadata", "TurboQuantMetadataBuilder"]


@dataclass
class TurboQuantMetadata(AttentionMetadata):
    """What ``TurboQuantImpl.forward`` needs for one step; decodes first, then prefill chunks.

    Attributes:
        num_actual_tokens: tokens of real requests (rows of ``query`` beyond it are padding).
        max_query_len: longest new chunk of the batch (host int; sizes the extend grid).
        max_seq_len: longest context, new tokens included (host int, may be an upper bound).
        query_start_loc: int32 `[num_reqs + 1]` on the device, cumulative new-token counts.
        query_start_loc_cpu: the same on the host.
        seq_lens: int32 `[num_reqs]` on the device, context length including the new tokens.
        block_table: int32 `[num_reqs, max_blocks]`, the kernel block ids of each request.
        slot_mapping: int64 `[num_tokens]`, cache slot of each new token (-1 for padding).
        num_decodes, num_decode_tokens: requests (first in the batch) with at most one new token.
        num_prefills, num_prefill_tokens: the remaining requests (chunked prefill, prefix-cache hits).
        decode_len_bound: the sequence length the decode launches are planned for (host int, the
            model's maximum: the same every step, so the plan depends on the batch size only).
        prefill_prefix_tokens: cached tokens before the prefill chunks, summed over the prefill
            requests (host int); None when the host does not know them exactly (or there is no
            prefill).
        prefill_max_seq_len: the longest prefill request's context, chunk included (host int).
        mm_ranges: a prefix-LM (vision-language) model's bidirectional media ranges per request index
            (vLLM's ``mm_req_doc_ranges``: inclusive absolute positions), or None.
        mm_range_tensor: the same as vLLM's Triton attention takes them, int32 `[num_reqs, max_ranges, 2]`
            on the device (zero-padded), or None when no request has a range.
        prefill_key_end: int32 `[num_prefill_tokens]` on the device: each prefill query's exclusive end
            of visible chunk keys (:func:`tq_core.attention.mm_prefix_key_end`), or None when no media
            range reaches past a query of this step (then attention is plain causal).
    """

    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor
    query_start_loc_cpu: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    num_decodes: int
    num_decode_tokens: int
    num_prefills: int
    num_prefill_tokens: int
    decode_len_bound: int
    prefill_prefix_tokens: int | None = None
    prefill_max_seq_len: int = 0
    mm_ranges: dict[int, list[tuple[int, int]]] | None = None
    mm_range_tensor: torch.Tensor | None = None
    prefill_key_end: torch.Tensor | None = None
    # the dense prefix layout of this step's prefill requests, planned by the first layer that
    # needs it and shared by the rest (keyed by the cache's block size)
    _prefix_plans: dict[int, PrefixGather] = field(default_factory=dict, repr=False, compare=False)

    @property
    def prefill_has_prefix(self) -> bool:
        """Whether any prefill request attends to tokens cached before its chunk (a continued chunked
        prefill or a prefix-cache hit).  False only when the host knows every chunk is the whole
        context so far (first chunks), which lets the impl run them with FlashAttention on the exact
        K/V."""
        return self.prefill_prefix_tokens is None or self.prefill_prefix_tokens > 0

    def prefix_plan(self, block_size: int) -> PrefixGather:
        """This step's :class:`~tq_vllm.prefix.PrefixGather` for a cache of ``block_size``-token blocks."""
        plan = self._prefix_plans.get(block_size)
        if plan is None:
            from tq_vllm.prefix import plan_prefix_gather

            if self.prefill_prefix_tokens is None:
                raise ValueError("the prefill requests' prefix lengths are not known on the host")
            first = self.num_decodes
            plan = plan_prefix_gather(
                self.seq_lens[first:],
                self.query_start_loc[first:] - self.num_decode_tokens,
                self.block_table[first:],
                block_size,
                total_prefix=self.prefill_prefix_tokens,
                num_chunk_tokens=self.num_prefill_tokens,
                max_seqlen_k=self.prefill_max_seq_len,
            )
            self._prefix_plans[block_size] = plan
        return plan


@runtime_checkable
class PreparedImpl(Protocol):
    """An attention impl the builder prepares before graph capture (``TurboQuantImpl``; named by its
    method so the builder does not import the impl)."""

    def prepare(
        self, layer_name: str, device: torch.device, block_size: int, *, dtype: torch.dtype
    ) -> None: ...


def _reorder_single_token_decodes(builder: AttentionMetadataBuilder[Any]) -> None:
    """Decodes are requests with one new token (``reorder_batch_threshold = 1``), speculative
    verification is not a decode.

    vLLM's private ``_init_reorder_batch_threshold`` does this (and keeps 1 under decode context
    parallelism); a vLLM without it, or with another signature, gets the documented attribute set
    directly (the same value: 1 is what that method leaves for ``supports_spec_as_decode=False``).
    """
    init = getattr(builder, "_init_reorder_batch_threshold", None)
    if callable(init):
        try:
            init(1, supports_spec_as_decode=False)
        except TypeError:
            pass
        else:
            return
    builder.reorder_batch_threshold = 1


class TurboQuantMetadataBuilder(AttentionMetadataBuilder[TurboQuantMetadata]):
    """Builds :class:`TurboQuantMetadata` from vLLM's ``CommonAttentionMetadata``.

    Full CUDA graphs are supported for batches of single-token decodes
    (``UNIFORM_SINGLE_TOKEN_DECODE``); mixed and prefill batches, speculative verification included,
    run with piecewise graphs, attention eager between them.  Not ``UNIFORM_BATCH``: that would let
    vLLM capture speculative-verification batches (every request 1 + k tokens), which run the prefill
    path, whose choices (FlashAttention or the extend kernel, the dense prefix layout) are made on the
    host from the step's lengths and would be frozen into the graph at capture.
    """

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    reorder_batch_threshold: int | None = 1

    def __init__(
        self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device: torch.device
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # Speculative decoding's multi-token verification runs as prefill (extend), exactly.
        _reorder_single_token_decodes(self)
        model_config = getattr(vllm_config, "model_config", None)
        self.max_model_len: int = int(getattr(model_config, "max_model_len", 0) or 0)
        self._prepare_layers(layer_names, device)

    def _prepare_layers(self, layer_names: list[str], device: torch.device) -> None:
        """Let each layer's impl learn its name and warm its device tables before graph capture."""
        compilation = getattr(self.vllm_config, "compilation_config", None)
        context = getattr(compilation, "static_forward_context", None) or {}
        for name in layer_names:
            impl = getattr(context.get(name), "impl", None)
            if isinstance(impl, PreparedImpl):
                impl.prepare(name, device, self.kv_cache_spec.block_size, dtype=self._model_dtype())

    def _model_dtype(self) -> torch.dtype:
        """The model's activation dtype (the K/V the store and extend kernels receive)."""
        dtype = getattr(getattr(self.vllm_config, "model_config", None), "dtype", None)
        return dtype if isinstance(dtype, torch.dtype) else torch.bfloat16

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> TurboQuantMetadata:
        cam = common_attn_metadata
        if not (isinstance(cam.causal, bool) and cam.causal):
            raise NotImplementedError("tq-vllm serves causal attention only")
        assert self.reorder_batch_threshold is not None
        num_decodes, num_prefills, num_decode_tokens, num_prefill_tokens = split_decodes_and_prefills(
            cam, decode_threshold=self.reorder_batch_threshold
        )
        bound = self.max_model_len or cam.block_table_tensor.shape[1] * self.kv_cache_spec.block_size
        prefix_tokens, prefill_max_seq_len = _prefill_prefix_tokens(cam, num_decodes, num_prefills)
        mm_ranges, mm_tensor, key_end = _media_ranges(cam, num_decodes, num_prefills)
        return TurboQuantMetadata(
            mm_ranges=mm_ranges,
            mm_range_tensor=mm_tensor,
            prefill_key_end=key_end,
            prefill_prefix_tokens=prefix_tokens,
            prefill_max_seq_len=prefill_max_seq_len,
            num_actual_tokens=cam.num_actual_tokens,
            max_query_len=cam.max_query_len,
            max_seq_len=cam.max_seq_len,
            query_start_loc=cam.query_start_loc,
            query_start_loc_cpu=cam.query_start_loc_cpu,
            seq_lens=cam.seq_lens,
            block_table=cam.block_table_tensor,
            slot_mapping=cam.slot_mapping,
            num_decodes=num_decodes,
            num_decode_tokens=num_decode_tokens,
            num_prefills=num_prefills,
            num_prefill_tokens=num_prefill_tokens,
            decode_len_bound=bound,
        )


def _prefill_prefix_tokens(
    cam: CommonAttentionMetadata, num_decodes: int, num_prefills: int
) -> tuple[int | None, int]:
    """(cached tokens before the prefill chunks summed over the prefill requests, longest prefill
    context), decided on the host; (None, 0) when unknown or when there is no prefill.

    ``seq_lens_cpu_upper_bound`` is exact for prefill rows (vLLM's contract).  Reads host tensors only:
    no device synchronization.
    """
    upper = getattr(cam, "seq_lens_cpu_upper_bound", None)
    if num_prefills == 0 or upper is None:
        return None, 0
    lo, hi = num_decodes, num_decodes + num_prefills
    qsl = cam.query_start_loc_cpu
    seq = upper[lo:hi]
    return int((seq - (qsl[lo + 1 : hi + 1] - qsl[lo:hi])).sum()), int(seq.max())


def _media_ranges(
    cam: CommonAttentionMetadata, num_decodes: int, num_prefills: int
) -> tuple[dict[int, list[tuple[int, int]]] | None, torch.Tensor | None, torch.Tensor | None]:
    """A prefix-LM step's media ranges: (vLLM's dict, the padded device tensor vLLM's Triton attention
    reads for the uncompressed layers, the prefill queries' ``key_end`` for the compressed layers).

    vLLM fills ``mm_req_doc_ranges`` only for models whose decoder attends bidirectionally inside each
    image or video range (Gemma 3, PaliGemma, Molmo 2...), and only when the backend declares
    ``supports_mm_prefix``.  Host work from host tensors (a device sync only on a vLLM without
    ``seq_lens_cpu_upper_bound``, for steps that carry ranges).
    """
    ranges = getattr(cam, "mm_req_doc_ranges", None)
    # a decode sits after its prompt's ranges: they change nothing for it, and a decode-only batch
    # stays the one captured in a full CUDA graph (captured without ranges)
    if not num_prefills or not ranges or not any(ranges.values()):
        return None, None, None
    num_reqs = cam.query_start_loc_cpu.shape[0] - 1
    rows = [list(ranges.get(r, [])) or [(0, 0)] for r in range(num_reqs)]
    width = max(len(r) for r in rows)
    padded = [r + [(0, 0)] * (width - len(r)) for r in rows]
    device = cam.query_start_loc.device
    tensor = torch.tensor(padded, dtype=torch.int32).to(device, non_blocking=True)
    key_end = None
    if num_prefills:
        from tq_core.attention import mm_prefix_key_end

        lo, hi = num_decodes, num_decodes + num_prefills
        qsl = cam.query_start_loc_cpu[lo : hi + 1]
        seq = getattr(cam, "seq_lens_cpu_upper_bound", None)
        seq = (seq if seq is not None else cam.seq_lens.cpu())[lo:hi]
        prefix = (seq - (qsl[1:] - qsl[:-1])).tolist()
        ends = mm_prefix_key_end([ranges.get(r, []) for r in range(lo, hi)], (qsl - qsl[0]).tolist(), prefix)
        if ends is not None:
            key_end = torch.tensor(ends, dtype=torch.int32).to(device, non_blocking=True)
    return dict(ranges), tensor, key_end
