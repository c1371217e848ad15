"""Result files of an experiment: the exact command, the date, the machine, and where the files go.

An experiment is a thin driver: it parses arguments, calls the packages' public APIs, then hands its rows
to :func:`write_result`, which writes ``<results>/<name>.json`` (and a copy under ``$OUT`` when it runs on
a device machine, which sends back what is written there) with the command line and the date.  The
repository's experiments pass their own ``experiments/results`` folder; nothing here knows the tree.

Example:
    >>> import json, tempfile
    >>> from pathlib import Path
    >>> results = Path(tempfile.mkdtemp())
    >>> path = write_result("demo", {"rows": [1, 2]}, results=results)
    >>> sorted(json.loads(path.read_text()))
    ['command', 'date', 'rows']

Every function here needs only the standard library (and torch for :func:`gpu_name`), so importing the
module loads none of the ``eval`` extra's packages.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shlex
import subprocess
import sys
from os import PathLike
from pathlib import Path
from typing import Any

__all__ = ["command_line", "gpu_name", "out_path", "run_result_process", "write_result"]


def command_line() -> str:
    """The command that runs this process (``python script.py --args``), shell-quoted, for result files.

    Example:
        >>> command_line().startswith("python")
        True
    """
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def gpu_name() -> str:
    """The CUDA device's name (``torch.cuda.get_device_name()``), or ``"cpu"`` without one.

    Example:
        >>> isinstance(gpu_name(), str)
        True
    """
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def gpu_tag(name: str | None = None) -> str:
    """The short device name used in result file names: ``"h100"`` for ``"NVIDIA H100 80GB HBM3"``.

    The first word made of letters then digits (the product code), lower case; failing that the whole
    name with spaces as underscores.  ``name`` defaults to :func:`gpu_name`.

    Example:
        >>> gpu_tag("NVIDIA H200"), gpu_tag("NVIDIA H100 80GB HBM3"), gpu_tag("cpu")
        ('h200', 'h100', 'cpu')
    """
    name = gpu_name() if name is None else name
    code = re.search(r"\b[A-Za-z]+\d+[A-Za-z]*\b", name)
    return (code.group(0) if code else name.replace(" ", "_")).lower()


def _check_folder(results: object) -> Path:
    if not isinstance(results, (str, PathLike)):
        raise TypeError(
            f"results must be the folder to write into (a str or Path), got {type(results).__name__}; "
            "the repository's experiments pass Path(__file__).resolve().parents[1] / 'results'"
        )
    return Path(results)


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"{what} must be a plain file name without a folder, got {name!r}")
    return name


def write_result(name: str, payload: dict[str, Any], *, results: str | PathLike[str]) -> Path:
    """Write ``<results>/<name>.json`` (plus ``$OUT/<name>.json`` where ``$OUT`` is set).

    The file holds ``{"command": ..., "date": ..., **payload}``, indented JSON.

    Args:
        name: file name without ``.json`` (no folder).
        payload: JSON-serializable fields; ``command`` and ``date`` are added first.
        results: the folder to write into; created if missing.

    Returns:
        The path written under ``results``.

    Raises:
        ValueError: ``name`` is empty or names a folder, or ``payload`` is not a dict.
        TypeError: ``results`` is not a path.

    Example:
        >>> import tempfile
        >>> path = write_result("demo", {"x": 1}, results=tempfile.mkdtemp())
        >>> json.loads(path.read_text())["x"]
        1
    """
    _check_name(name, "name")
    if not isinstance(payload, dict):
        raise ValueError(f"payload must be a dict of JSON fields, got {type(payload).__name__}")
    folder = _check_folder(results)
    body = {"command": command_line(), "date": _dt.date.today().isoformat(), **payload}
    text = json.dumps(body, indent=2)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(text + "\n")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"{name}.json").write_text(text + "\n")
    return path


def out_path(filename: str, *, results: str | PathLike[str]) -> Path:
    """Where to write an artifact (a plot, a log): ``$OUT/<filename>`` on a device machine, else
    ``<results>/<filename>``; the folder is created.

    Example:
        >>> import tempfile
        >>> out_path("plot.png", results=tempfile.mkdtemp()).name
        'plot.png'
    """
    _check_name(filename, "filename")
    base = Path(os.environ["OUT"]) if os.environ.get("OUT") else _check_folder(results)
    base.mkdir(parents=True, exist_ok=True)
    return base / filename


def run_result_process(
    cmd: list[str], env: dict[str, str], timeout: float
) -> tuple[dict[str, Any] | None, str, str]:
    """Run one engine in its own process; returns (its ``RESULT {json}`` line parsed or None, stdout, stderr).

    A run past ``timeout`` seconds is killed and reported in stderr; what it printed so far is kept.

    Example:
        >>> code = "import json; print('RESULT', json.dumps({'ok': 1}))"
        >>> run_result_process([sys.executable, "-c", code], dict(os.environ), 60)[0]
        {'ok': 1}
    """
    if not isinstance(cmd, list) or not cmd or not all(isinstance(c, str) for c in cmd):
        raise ValueError(f"cmd must be a non-empty list of strings (argv), got {cmd!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")

    def text(x: object) -> str:
        return x.decode(errors="replace") if isinstance(x, bytes) else str(x or "")

    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        out, err = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        out, err = text(exc.stdout), f"timed out after {timeout} s\n{text(exc.stderr)}"
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
    return (json.loads(line.removeprefix("RESULT ")) if line else None), out, err
