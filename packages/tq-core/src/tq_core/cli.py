"""The ``turboquant`` command.

turboquant eval [--json] [--plot PATH] [--max-tokens N] [--seed S] [--sweep] [--no-progress]
turboquant formats [--head-dim D]

``eval`` writes no file unless ``--plot PATH`` is given; every argument (the plot's directory exists
and is writable, its extension is an image format, the ``eval`` extra is installed, ``--max-tokens``
is in range) is checked before the minute of work, and a bad one exits at once with status 2 and a
one-line error.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import textwrap
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["main"]


def _progress(enabled: bool):  # type: ignore[no-untyped-def]
    def wrap(it: Iterable[Any], desc: str, total: int) -> Iterable[Any]:
        if not enabled or importlib.util.find_spec("tqdm") is None:  # tqdm comes with the eval extra
            return it
        from tqdm.auto import tqdm

        return tqdm(it, desc=desc, total=total, file=sys.stderr, leave=False)

    return wrap


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = lambda r: "  ".join(str(x).rjust(w) for x, w in zip(r, widths, strict=True))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _render(result: dict[str, Any]) -> str:
    out = ["TurboQuant distortion per unit vector (d = 128)", ""]
    out.append(
        _table(
            [
                [
                    r["bits"],
                    f"{r['mse']:.5f}",
                    f"{r['mse_measured']:.5f}",
                    f"{r['mse_gaussian_limit']:.5f}",
                    "-" if r["paper"] is None else f"{r['paper']:.4f}",
                    "-" if r["paper"] is None else f"{100 * (r['mse'] / r['paper'] - 1):+.1f}%",
                    f"{r['lower_bound']:.5f}",
                ]
                for r in result["distortion"]
            ],
            ["bits", "exact", "measured", "d->inf", "paper", "vs paper", "4^-b bound"],
        )
    )
    out += ["", "Attention-output relative error at equal bytes per token-head (lower is better)", ""]
    out.append(
        _table(
            [
                [
                    r["name"],
                    r["data"],
                    r["head_dim"],
                    r["bytes_per_token_head"],
                    f"{r['attn_rel_err']:.4f}",
                    f"{r['baseline_rel_err']:.4f}",
                    f"{r['baseline_rel_err'] / max(r['attn_rel_err'], 1e-12):.2f}x",
                    r["layout"].split(": ", 1)[-1],
                    r["baseline"],
                ]
                for r in result["formats"]
            ],
            ["budget", "data", "d", "bytes", "turboquant", "uniform", "gain", "our layout", "uniform layout"],
        )
    )
    return "\n".join(out)


def _plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    dist = result["distortion"]
    bits = [r["bits"] for r in dist]
    a.semilogy(bits, [r["mse"] for r in dist], "o-", label="TurboQuant (exact, d=128)")
    a.semilogy(bits, [r["mse_measured"] for r in dist], "x", label="measured")
    pb = [r["bits"] for r in dist if r["paper"] is not None]
    a.semilogy(pb, [r["paper"] for r in dist if r["paper"] is not None], "s", mfc="none", label="paper")
    a.semilogy(bits, [r["lower_bound"] for r in dist], "--", label="lower bound 4^-b")
    a.set_xlabel("bits per coordinate")
    a.set_ylabel("D_mse per unit vector")
    a.set_title("Distortion")
    a.legend()
    rows = result["formats"]
    labels = [f"{r['name'].removeprefix('turboquant_')}\n{r['data']}" for r in rows]
    x = range(len(rows))
    b.bar([i - 0.2 for i in x], [r["attn_rel_err"] for r in rows], 0.4, label="TurboQuant (ours)")
    b.bar([i + 0.2 for i in x], [r["baseline_rel_err"] for r in rows], 0.4, label="uniform RTN (KIVI-style)")
    b.set_xticks(list(x), labels, fontsize=7)
    b.set_yscale("log")
    b.set_ylabel("attention output relative error")
    b.set_title("Equal bytes per token-head")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_error(path: str) -> str | None:
    """Why ``--plot path`` cannot be written, or None; checks the file system only."""
    target = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(target):
        return f"--plot {path!r} is a directory; give a file name, e.g. {os.path.join(path, 'turboquant_eval.png')}"
    if not os.path.splitext(target)[1]:
        return f"--plot {path!r} has no extension; end it with .png (or .svg, .pdf)"
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        return f"--plot {path!r}: directory {parent} does not exist; create it or choose another path"
    if not os.access(parent, os.W_OK | os.X_OK) or (
        os.path.exists(target) and not os.access(target, os.W_OK)
    ):
        return f"--plot {path!r}: cannot write to {target} (permission denied); choose another path"
    return None


def _plot_format_error(path: str) -> str | None:
    """Why matplotlib cannot write ``path``'s format, or None (imports matplotlib)."""
    if importlib.util.find_spec("matplotlib") is None:
        return 'the plot needs matplotlib: pip install "tq-core[eval]" (or matplotlib), or drop --plot'
    from matplotlib.backend_bases import FigureCanvasBase

    ext = os.path.splitext(path)[1].lower().removeprefix(".")
    formats = FigureCanvasBase.get_supported_filetypes()
    if ext not in formats:
        return f"--plot {path!r}: matplotlib cannot write .{ext} files; use one of .{', .'.join(sorted(formats))}"
    return None


def _check_eval_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every check that can fail, before any work; a failure exits with status 2 and one line."""
    if args.plot is not None and args.no_plot:
        parser.error("--plot and --no-plot contradict each other; pass one (no plot is the default)")
    if args.max_tokens < 2:
        parser.error(f"--max-tokens must be at least 2 (it counts [CLS] and [SEP]), got {args.max_tokens}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if args.plot is not None:
        why = _plot_error(args.plot) or _plot_format_error(args.plot)
        if why:
            parser.error(why)
    from tq_core.eval.runner import check_eval_inputs

    try:
        check_eval_inputs(args.max_tokens, args.seed)
    except (ValueError, ModuleNotFoundError) as e:
        parser.error(str(e))


def _cmd_eval(args: argparse.Namespace) -> int:
    from tq_core.eval.runner import run_eval

    result = run_eval(
        max_tokens=args.max_tokens, seed=args.seed, sweep=args.sweep, progress=_progress(not args.no_progress)
    )
    if args.plot is not None:
        _plot(result, args.plot)
        result["plot"] = args.plot
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(_render(result))
        if result.get("plot"):
            print(f"\nplot written to {result['plot']}")
    return 0


def _cmd_formats(args: argparse.Namespace) -> int:
    from tq_core.formats import PRESET_NAMES_NOTE, format_names, named_format, vllm_layout

    print(textwrap.fill(PRESET_NAMES_NOTE, 100), end="\n\n")
    for name in format_names():
        fmt = named_format(name, args.head_dim)
        print(fmt.describe())
        print(f"    vLLM's layout under this name, in the same {fmt.slot_bytes} B: {vllm_layout(name)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``turboquant`` console script."""
    parser = argparse.ArgumentParser(prog="turboquant", description="TurboQuant KV-cache compression tools")
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("eval", help="distortion vs the paper and attention error vs uniform at equal bytes")
    ev.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    ev.add_argument(
        "--plot",
        metavar="PATH",
        help="also draw the results into PATH (.png, .svg, .pdf, ...; needs matplotlib, in the eval extra); "
        "without it no file is written",
    )
    ev.add_argument("--no-plot", action="store_true", help="write no plot (the default; kept for scripts)")
    ev.add_argument("--max-tokens", type=int, default=256, help="MiniLM tokens (2..512, default 256)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--sweep", action="store_true", help="also score every candidate layout per budget")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    ev.set_defaults(func=_cmd_eval)
    fm = sub.add_parser(
        "formats", help="list the named KV formats (vLLM's dtype names) with vLLM's layout under each name"
    )
    fm.add_argument("--head-dim", type=int, default=128)
    fm.set_defaults(func=_cmd_formats)
    args = parser.parse_args(argv)
    if args.command == "eval":
        _check_eval_args(ev, args)
    try:
        return int(args.func(args))
    except (ValueError, ModuleNotFoundError) as e:
        print(f"turboquant: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
