"""Run the code blocks of the documentation, so that a quickstart cannot go stale.

Every fenced ``python`` or ``bash`` block whose title says where it runs is collected:

* ``title="CPU"``: run here, each block in a fresh interpreter (``python -``) or ``bash -euo pipefail``,
  from the repository root;
* ``title="GPU"``: collected with the ``gpu`` marker and skipped without CUDA; on a GPU machine run
  ``python -m pytest docs/tests/test_quickstarts.py -m gpu`` (with ``MODEL`` set to a model that machine
  can load, for the vLLM blocks);
* ``title="install"``: ``pip install`` lines, resolved with ``pip install --dry-run`` so that the session's
  editable installs stay in place.

Pages under ``docs/quickstart/`` must title every block (an untitled block there fails the test), so
no quickstart block escapes.  List what is collected with ``pytest docs/tests/test_quickstarts.py
--collect-only -q``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```(?P<lang>[a-z]+)(?P<attrs>[^\n]*)\n(?P<body>.*?)^```\s*$", re.DOTALL | re.MULTILINE)
TITLE = re.compile(r'title="([^"]*)"')
KINDS = ("CPU", "GPU", "install")
RUNNABLE = ("python", "bash")
TIMEOUT_S = 900


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    lang: str
    kind: str | None
    body: str

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}-{self.lang}-{self.kind}"


def _blocks() -> list[Block]:
    out = []
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text()
        for m in FENCE.finditer(text):
            title = TITLE.search(m.group("attrs"))
            out.append(
                Block(
                    page=str(page.relative_to(DOCS)),
                    line=text.count("\n", 0, m.start()) + 1,
                    lang=m.group("lang"),
                    kind=title.group(1) if title else None,
                    body=m.group("body"),
                )
            )
    return out


BLOCKS = _blocks()
RUN = [b for b in BLOCKS if b.kind in KINDS]


def _param(block: Block) -> object:
    marks = [pytest.mark.gpu] if block.kind == "GPU" else []
    return pytest.param(block, id=block.id, marks=marks)


def test_quickstart_blocks_all_say_where_they_run() -> None:
    untitled = [
        b.id
        for b in BLOCKS
        if b.page.startswith("quickstart/") and (b.kind not in KINDS or b.lang not in RUNNABLE)
    ]
    assert not untitled, f"quickstart blocks must be python/bash titled one of {KINDS}: {untitled}"
    assert any(b.kind == "CPU" for b in RUN), "no CPU blocks found: is the extractor broken?"


def _run(cmd: list[str], stdin: str | None = None) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("MPLBACKEND", "Agg")
    proc = subprocess.run(
        cmd, input=stdin, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    print(proc.stdout)
    assert proc.returncode == 0, (
        f"exit code {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    )


def _run_block(block: Block) -> None:
    if block.lang == "python":
        _run([sys.executable, "-"], block.body)
    elif block.lang == "bash":
        # the session's interpreter and console scripts first, as in an activated virtualenv
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        _run(["env", f"PATH={path}", "bash", "-euo", "pipefail", "-c", block.body])
    else:
        pytest.fail(f"{block.id}: cannot run a {block.lang} block")


def _install_lines(body: str) -> list[list[str]]:
    lines = []
    for line in body.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            args = shlex.split(line)
            assert args[:2] == ["pip", "install"], f"install blocks hold pip install lines only: {line!r}"
            lines.append(args[2:])
    return lines


@pytest.mark.parametrize("block", [_param(b) for b in RUN if b.kind == "CPU"])
def test_cpu_block(block: Block) -> None:
    _run_block(block)


@pytest.mark.parametrize("block", [_param(b) for b in RUN if b.kind == "GPU"])
def test_gpu_block(block: Block) -> None:
    _run_block(block)


@pytest.mark.parametrize("block", [_param(b) for b in RUN if b.kind == "install"])
def test_install_block_resolves(block: Block) -> None:
    for args in _install_lines(block.body):
        _run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", *args])
