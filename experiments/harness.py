"""GPU timing of the kernel benchmarks (Triton's ``do_bench``, CUDA graphs, copy bandwidth).

Result files, device facts, plots and the stack sampler moved to the ``eval`` extra of tq-core
(:mod:`tq_core.eval.results`, :mod:`tq_core.eval.plots`, :mod:`tq_core.eval.profiling`), which every
experiment imports without touching ``sys.path``.  This module keeps the Triton-based timing (tq-core never
imports Triton) and ``write_result``/``out_path`` bound to ``experiments/results`` for the two scripts that
still import it by path, ``kernels/bench_kernels.py`` and ``kernels/decode_sweep.py``; it goes once the
kernel benchmarks are pytest-benchmark cases in ``packages/tq-kernels/benchmarks``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tq_core.eval import results as _results
from tq_core.eval.plots import bar_plot, line_plot
from tq_core.eval.results import command_line, gpu_name

__all__ = [
    "RESULTS",
    "bar_plot",
    "bench_ms",
    "command_line",
    "copy_bandwidth_gbps",
    "gpu_name",
    "graph_ms",
    "line_plot",
    "out_path",
    "write_result",
]

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """:func:`tq_core.eval.results.write_result` into ``experiments/results``."""
    return _results.write_result(name, payload, results=RESULTS)


def out_path(filename: str) -> Path:
    """:func:`tq_core.eval.results.out_path` with ``experiments/results`` as the folder."""
    return _results.out_path(filename, results=RESULTS)


def bench_ms(fn, *, warmup: int = 25, rep: int = 100) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of ``fn`` on the GPU, timed with CUDA events (do_bench)."""
    import triton.testing

    med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return float(med), float(p20), float(p80)


def graph_ms(fn, *, warmup: int = 3) -> float:
    """Median milliseconds of one replay of ``fn`` captured in a CUDA graph: the GPU time of the
    launches without the host's launch overhead, which is how vLLM runs decode (full CUDA graphs)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compile, caches) off the capturing stream
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench_ms(graph.replay)[0]


def copy_bandwidth_gbps(nbytes: int = 4 << 30) -> float:
    """Measured device-to-device copy bandwidth (bytes read + written per second), GB/s."""
    import torch

    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    med, _, _ = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / (med * 1e-3) / 1e9
