"""Paired statistics of the quality reports: greedy agreement, and bootstrap intervals of perplexity changes
over the held-out sequences that every compared row scored (report.py, real_report.py)."""

from __future__ import annotations

import math
import random


def agreement(tokens: list[list[int]], base: list[list[int]]) -> tuple[float | None, float | None]:
    if not tokens or not base:  # a ppl-only run
        return None, None
    prefix, same = [], []
    for a, b in zip(tokens, base, strict=True):
        n = min(len(a), len(b))
        first = next((i for i in range(n) if a[i] != b[i]), n)
        prefix.append(first / n)
        same.append(sum(x == y for x, y in zip(a, b, strict=False)) / n)
    return sum(prefix) / len(prefix), sum(same) / len(same)


def paired_bootstrap(rows: list[dict], b: dict, draws: int, seed: int) -> list[list[float]] | None:
    """Paired bootstrap over the held-out sequences that every row of ``rows`` and ``b`` scored: for each
    draw (sequences resampled with replacement), the perplexity change (%) of each row against ``b``.
    None when a row lacks per-sequence NLLs (results written before they were recorded)."""
    series = [r.get("nll_per_seq") for r in rows]
    z = b.get("nll_per_seq")
    if not z or any(not x or len(x) != len(z) for x in series):
        return None
    rng = random.Random(seed)
    n = len(z)
    tokens = rows[0]["scored_tokens"]  # every sequence scores the same number of targets
    out = []
    for _ in range(draws):
        idx = [rng.randrange(n) for _ in range(n)]
        out.append([100 * (math.exp(sum(x[i] - z[i] for i in idx) / tokens) - 1) for x in series])
    return out


def ppl_delta_ci(r: dict, b: dict, draws: int = 2000, seed: int = 0) -> list[float] | None:
    """95% interval of the perplexity change (%) against ``b``, by a paired bootstrap over the held-out
    sequences (both rows scored the same sequences).  None without per-sequence NLLs."""
    boot = paired_bootstrap([r], b, draws, seed)
    if boot is None:
        return None
    deltas = sorted(d for (d,) in boot)
    return [deltas[int(0.025 * draws)], deltas[int(0.975 * draws) - 1]]


def delta_difference_ci(r: dict, o: dict, b: dict, draws: int = 2000, seed: int = 0) -> list[float] | None:
    """Median and 95% interval of (Δppl% of ``r``) - (Δppl% of ``o``), both against ``b``, by a paired
    bootstrap over the held-out sequences that all three rows scored: whether two configs of the same
    engine are told apart.  None without per-sequence NLLs."""
    boot = paired_bootstrap([r, o], b, draws, seed)
    if boot is None:
        return None
    diffs = sorted(x - y for x, y in boot)
    return [diffs[draws // 2], diffs[int(0.025 * draws)], diffs[int(0.975 * draws) - 1]]


def intervals_overlap(x: list[float] | None, y: list[float] | None) -> bool | None:
    """Whether two 95% intervals overlap (the two deltas are not told apart); None without intervals."""
    if x is None or y is None:
        return None
    return x[0] <= y[1] and y[0] <= x[1]
