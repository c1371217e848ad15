"""GPU check of the prefill paths of tq-vllm's impl: numerics and time, on one layer, no engine.

    PYTHONPATH=/tmp/site python3 experiments/vllm/prefix_flash_check.py > prefix_flash.log

For chunks that continue a cached prefix, the impl either decodes the prefix and runs FlashAttention
over it (``tq_vllm.prefix``, the default) or runs the extend kernel on the compressed cache.  Both
must give the same attention; this compares them on fresh random caches (Llama-8B heads: 32 query,
8 KV, head_dim 128) and times each, plus FlashAttention 2 against 3 for first chunks (vLLM pins
FA2 for turboquant dtypes; the impl asks for the platform's best), and, for the uncompressed
boundary layers, vLLM's FlashAttention (the default) against its Triton kernel on a decode batch.  Output rows are NaN-poisoned
before every call.  Prints one ``RESULT {json}`` line per case.  The cases' setup, call and timing are
in prefix_flash_case.py.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from prefix_flash_case import BLOCK, DEV, HKV, D, H, make_case, ms, rel, run

from tq_vllm.impl import TurboQuantImpl, flash_varlen, prefill_flash_version
from tq_vllm.metadata import TurboQuantMetadata

CASES = {
    # what the anchor's second generate schedules while decodes take budget: a 2-token continuation
    # of an 8190-token chunk beside a first chunk of 8190 (one 16K-token step)
    "anchor-mixed": [(8190, 2), (0, 8190)],
    "chunked-32k": [(24576, 8192)],  # the fourth 8K chunk of a 32K prompt
    "prefix-hits": [(4096, 512)] * 16,  # 16 requests hitting a 4K cached prefix
}


def main() -> None:
    dense_check()
    formats = sys.argv[1:] or ["turboquant_4bit_nc", "turboquant_k3v4_nc"]
    for kv in formats:
        for name, requests in CASES.items():
            case = make_case(kv, requests, seed=len(name))
            impl = case[0]
            assert impl.flash is not None, "vLLM's FlashAttention is not available"
            flash_out = run(*case)
            t_flash = ms(case)
            saved, impl.flash = impl.flash, None
            extend_out = run(*case)
            t_extend = ms(case)
            impl.flash = saved
            row = dict(kv=kv, case=name, requests=requests[:2], num_requests=len(requests),
                       finite=bool(flash_out.isfinite().all()), rel_err_flash_vs_extend=rel(flash_out, extend_out),
                       ms_prefix_flash=round(t_flash, 3), ms_extend=round(t_extend, 3),
                       speedup=round(t_extend / t_flash, 2))  # fmt: skip
            print("RESULT " + json.dumps(row), flush=True)
    # first chunks: FlashAttention 2 (vLLM's pinned choice for turboquant dtypes) against 3
    case = make_case("turboquant_4bit_nc", [(0, 8192), (0, 8192)], seed=7)
    outs, row = {}, dict(case="first-chunks-2x8k")
    for version in ("2", "3"):
        os.environ["TQ_VLLM_FLASH_VERSION"] = version
        case[0].flash = flash_varlen(D, contiguous_kv=True)
        outs[version] = run(*case)
        row[f"ms_fa{version}"] = round(ms(case), 3)
    os.environ.pop("TQ_VLLM_FLASH_VERSION")
    row["rel_err_fa3_vs_fa2"] = rel(outs["3"], outs["2"])
    from vllm.v1.attention.backends.fa_utils import get_flash_attn_version

    row["default_version"] = prefill_flash_version(D, get_flash_attn_version(head_size=D))
    print("RESULT " + json.dumps(row), flush=True)


def dense_check(num_seqs: int = 32, ctx: int = 8192) -> None:
    """Uncompressed (boundary) layers: vLLM's FlashAttention (the default) against its Triton kernel on
    one paged bf16 decode batch, as the impl calls them."""
    impl = TurboQuantImpl(H, D, D**-0.5, HKV, None, None, "auto", None, "decoder", None)
    assert impl.dense is not None and impl.dense.flash is not None, "vLLM's FlashAttention is not available"
    g = torch.Generator(device=DEV).manual_seed(11)
    max_blocks = -(-ctx // BLOCK)
    num_blocks = num_seqs * max_blocks + 1
    kv_cache = torch.randn(num_blocks, HKV, BLOCK, 2 * D, device=DEV, generator=g, dtype=torch.bfloat16)
    table = torch.randperm(num_blocks, device=DEV, generator=g)[: num_seqs * max_blocks]
    qsl = torch.arange(num_seqs + 1, dtype=torch.int32)
    lens = torch.randint(ctx // 2, ctx + 1, (num_seqs,), generator=torch.Generator().manual_seed(3))
    meta = TurboQuantMetadata(
        num_actual_tokens=num_seqs, max_query_len=1, max_seq_len=int(lens.max()), query_start_loc=qsl.to(DEV),
        query_start_loc_cpu=qsl, seq_lens=lens.to(torch.int32).to(DEV),
        block_table=table.view(num_seqs, max_blocks).to(torch.int32),
        slot_mapping=torch.full((num_seqs,), -1, dtype=torch.int64, device=DEV), num_decodes=num_seqs,
        num_decode_tokens=num_seqs, num_prefills=0, num_prefill_tokens=0, decode_len_bound=1,
    )  # fmt: skip
    query = torch.randn(num_seqs, H, D, device=DEV, generator=g, dtype=torch.bfloat16)
    case = (impl, kv_cache, meta, query, query, query)
    flash_out, t_flash = run(*case), ms(case)
    saved, impl.dense.flash = impl.dense.flash, None
    triton_out, t_triton = run(*case), ms(case)
    impl.dense.flash = saved
    row = dict(case=f"dense-decode-B{num_seqs}xL{ctx}", finite=bool(flash_out.isfinite().all()),
               rel_err_flash_vs_triton=rel(flash_out, triton_out), ms_flash=round(t_flash, 3),
               ms_triton=round(t_triton, 3))  # fmt: skip
    print("RESULT " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
