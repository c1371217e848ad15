"""Where a thread spends its wall time, by sampling its Python stack (no tracing, cheap enough to leave on).

Example:
    >>> import time
    >>> with StackSampler(interval=0.001) as sampler:
    ...     time.sleep(0.05)
    >>> sampler.samples > 0
    True
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

__all__ = ["StackSampler"]


class StackSampler:
    """Samples one thread's Python stack every ``interval`` seconds while inside ``with``.

    Cheap enough to leave on around a timed phase (one ``sys._current_frames()`` per sample, no tracing),
    unlike cProfile. ``top(n)`` gives the functions seen on the most samples (inclusive: a function counts
    once per sample in which it is anywhere on the stack), as ``(percent of samples, "file:line func")``.

    Args:
        thread_id: the thread to sample (``threading.get_ident()`` of it); default the calling thread.
        interval: seconds between samples, > 0.

    Raises:
        ValueError: ``interval`` is not a positive number.
    """

    def __init__(self, thread_id: int | None = None, interval: float = 0.02) -> None:
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or interval <= 0:
            raise ValueError(f"interval must be a positive number of seconds, got {interval!r}")
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
