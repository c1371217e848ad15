"""The anchor workload (vllm_anchor.py, unchanged) with tensor parallelism: ``TP`` GPUs (default 2).

    PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0 TP=2 python3 experiments/vllm/anchor_tp.py KV [BACKEND]

vllm_anchor.py is a verbatim copy of the shared anchor and builds ``vllm.LLM(**kw)`` itself; this driver
hands it an ``LLM`` that also passes ``tensor_parallel_size``, then runs the file as ``__main__``.
"""

from __future__ import annotations

import functools
import os
import runpy
import sys
from pathlib import Path

import vllm

tp = int(os.environ.get("TP", "2"))
vllm.LLM = functools.partial(vllm.LLM, tensor_parallel_size=tp)
sys.argv = [str(Path(__file__).with_name("vllm_anchor.py")), *sys.argv[1:]]
print(f"tensor_parallel_size={tp}", flush=True)
runpy.run_path(sys.argv[0], run_name="__main__")
