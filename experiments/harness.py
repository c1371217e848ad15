"""Shared pieces of every experiment: device facts, timing, result files and plots.

An experiment is a thin driver: parse arguments, call the packages' public APIs, then hand rows to
:func:`write_result`, which writes ``experiments/results/<name>.json`` (and a copy under ``$OUT`` when
run on the device machine) with the exact command and date.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


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


def run_result_process(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[dict | None, str, str]:
    """Run one engine in its own process; (its ``RESULT {json}`` line parsed or None, stdout, stderr).

    A run past ``timeout`` seconds is killed and reported in stderr; what it printed so far is kept."""
    import subprocess

    def text(x: object) -> str:
        return x.decode(errors="replace") if isinstance(x, bytes) else str(x or "")

    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        out, err = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        out, err = text(exc.stdout), f"timed out after {timeout} s\n{text(exc.stderr)}"
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
    return (json.loads(line.removeprefix("RESULT ")) if line else None), out, err


class StackSampler:
    """Where a thread spends its wall time: samples its Python stack every ``interval`` seconds.

    Cheap enough to leave on around a timed phase (one ``sys._current_frames()`` per sample, no tracing),
    unlike cProfile. ``top(n)`` gives the functions seen on the most samples (inclusive: a function counts
    once per sample in which it is anywhere on the stack), as ``(percent of samples, "file:line func")``.
    """

    def __init__(self, thread_id: int | None = None, interval: float = 0.02) -> None:
        import threading

        self.thread_id = thread_id if thread_id is not None else threading.get_ident()
        self.interval = interval
        self.samples = 0
        self.counts: dict[str, int] = {}
        self.leaves: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            frame = sys._current_frames().get(self.thread_id)
            seen = set()
            if frame is not None:  # the innermost frame: where the time is spent itself
                code = frame.f_code
                leaf = f"{Path(code.co_filename).name}:{code.co_firstlineno} {code.co_name}"
                self.leaves[leaf] = self.leaves.get(leaf, 0) + 1
            while frame is not None:
                code = frame.f_code
                seen.add(f"{Path(code.co_filename).name}:{code.co_firstlineno} {code.co_name}")
                frame = frame.f_back
            self.samples += 1
            for key in seen:
                self.counts[key] = self.counts.get(key, 0) + 1

    def __enter__(self) -> StackSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def top(self, n: int = 40, *, leaves: bool = False) -> list[tuple[float, str]]:
        """The ``n`` functions on the most samples; ``leaves``: counted only where innermost (self time)."""
        ranked = sorted((self.leaves if leaves else self.counts).items(), key=lambda kv: -kv[1])[:n]
        return [(round(100 * c / max(self.samples, 1), 1), k) for k, c in ranked]


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write ``results/<name>.json`` (plus ``$OUT/<name>.json`` on the device machine)."""
    body = {"command": command_line(), "date": _dt.date.today().isoformat(), **payload}
    text = json.dumps(body, indent=2)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(text + "\n")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"{name}.json").write_text(text + "\n")
    return path


def out_path(filename: str) -> Path:
    """Where to write an artifact: ``$OUT`` on the device machine, else results/."""
    base = Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS
    base.mkdir(parents=True, exist_ok=True)
    return base / filename


def line_plot(
    path: Path,
    series: dict[str, tuple[list[float], list[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
    logy: bool = False,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, "o-", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bar_plot(
    path: Path, values: dict[str, float], *, xlabel: str, title: str, notes: dict[str, str] | None = None
) -> None:
    """Horizontal bars, one per label in order; ``notes`` text goes at the end of its bar (e.g. a ratio).
    Labels starting with "ours" are drawn in blue, the baselines in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(values)
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(labels) + 1.5))
    ax.barh(
        labels,
        [values[k] for k in labels],
        color=["#1f77b4" if k.startswith("ours") else "#7f7f7f" for k in labels],
    )
    ax.invert_yaxis()
    for i, k in enumerate(labels):
        if notes and k in notes:
            ax.text(values[k], i, f" {notes[k]}", va="center", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
