"""The two plots most experiments draw: lines over a swept size, and labelled horizontal bars.

matplotlib (the ``eval`` extra) is imported when a plot is drawn, not when this module is imported.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> png = Path(tempfile.mkdtemp()) / "decode.png"
    >>> line_plot(png, {"ours": ([1, 2], [0.2, 0.3])}, xlabel="batch", ylabel="ms", title="decode")
    >>> png.exists()
    True
"""

from __future__ import annotations

from os import PathLike
from typing import Any

__all__ = ["bar_plot", "line_plot"]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            'plots need matplotlib: pip install "tq-core[eval]" (or pip install matplotlib)'
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def line_plot(
    path: str | PathLike[str],
    series: dict[str, tuple[list[float], list[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
    logy: bool = False,
) -> None:
    """One line with markers per ``series`` entry (``label: (xs, ys)``), saved as a PNG at ``path``.

    Args:
        path: the image file to write.
        series: label to ``(xs, ys)`` of equal length.
        xlabel, ylabel, title: axis labels and title.
        logx: base-2 logarithmic x axis (sizes that double).
        logy: logarithmic y axis.

    Raises:
        ValueError: a series whose xs and ys differ in length.
    """
    for label, (xs, ys) in series.items():
        if len(xs) != len(ys):
            raise ValueError(
                f"series {label!r} has {len(xs)} x values and {len(ys)} y values; give as many of each"
            )
    plt = _pyplot()
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
    path: str | PathLike[str],
    values: dict[str, float],
    *,
    xlabel: str,
    title: str,
    notes: dict[str, str] | None = None,
) -> None:
    """Horizontal bars, one per label in order, saved as a PNG at ``path``.

    Labels starting with ``"ours"`` are drawn in blue, the baselines in grey; ``notes`` text goes at the
    end of its label's bar (e.g. a ratio); notes of labels without a bar are not drawn.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> png = Path(tempfile.mkdtemp()) / "tok_s.png"
        >>> bar_plot(png, {"bf16": 4.0, "ours": 5.0}, xlabel="tok/s", title="t", notes={"ours": "1.25x"})
    """
    plt = _pyplot()
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
