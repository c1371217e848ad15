"""The decode kernel's plane loop with stages left out (ablated_decode.py), CUDA-graph timings on one GPU.

    python packages/tq-kernels/benchmarks/ablate_decode.py [--format turboquant_4bit_nc] [--shape 32x8192]
        [--results experiments/results]

ABLATE 0 is the production plane loop; 1: no centroid lookup, 2: no code loads, 3: neither (outputs of
1-3 are meaningless, their time is what is left).  Writes <results>/kernels_ablation_<gpu>_<date>.json
(by default the repository's experiments/results).
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch
from ablated_decode import ABLATIONS, ablated_decode_attention

from tq_core import named_format
from tq_core.eval.results import gpu_name, write_result
from tq_kernels.testing import filled_paged_cache, gpu_time_ms
from tq_kernels.tuning import LaunchConfig

RESULTS = Path(__file__).resolve().parents[3] / "experiments" / "results"
H, HKV, D, PAGE = 32, 8, 128, 16  # Llama-3.1-8B attention, as packages/tq-kernels/benchmarks
CONFIGS = (LaunchConfig(64, 4, 2, nibble=False), LaunchConfig(128, 4, 2, nibble=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--format", default="turboquant_4bit_nc")
    ap.add_argument("--shape", default="32x8192", help="BATCHxCONTEXT, the context a multiple of 16")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of the results file")
    args = ap.parse_args()
    batch, ctx = (int(x) for x in args.shape.split("x"))
    if ctx % PAGE or batch < 1:
        raise SystemExit(
            f"--shape {args.shape}: give BATCHxCONTEXT with a context that is a multiple of {PAGE}"
        )
    fmt = named_format(args.format, D)
    table = torch.arange(batch * ctx // PAGE, device="cuda", dtype=torch.int32).view(batch, ctx // PAGE)
    seq_lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    q = torch.randn(batch, H, D, device="cuda", dtype=torch.bfloat16)
    cache = filled_paged_cache(fmt, table.numel(), PAGE, HKV)
    rows = []
    for cfg in CONFIGS:
        for ab in ABLATIONS:
            ms = gpu_time_ms(
                lambda cfg=cfg, ab=ab: ablated_decode_attention(
                    q, cache, table, seq_lens, fmt, ablate=ab, config=cfg, max_seq_len=ctx
                )
            )[0]
            rows.append({"config": str(cfg), "ablate": ab, "ms_graph": ms})
            print(f"ablate {ab} {cfg}: {ms:.3f} ms (CUDA graph)", flush=True)
    slug = gpu_name().lower().replace("nvidia", "").strip().replace(" ", "_")
    name = f"kernels_ablation_{slug}_{datetime.date.today().isoformat()}"
    payload = {"gpu": gpu_name(), "format": args.format, "shape": args.shape, "rows": rows}
    print(f"wrote {write_result(name, payload, results=args.results)}")


if __name__ == "__main__":
    main()
