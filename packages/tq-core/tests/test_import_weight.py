"""tq-core stays light: importing it (its CLI module, and the experiments' result, plot and profiling
modules of tq_core.eval) loads torch, not the eval extra's packages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import tomllib

import tq_core

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
EXTRA_ONLY = ("tqdm", "matplotlib", "safetensors", "tokenizers")


def test_import_loads_no_eval_extra():
    # torch itself imports tqdm when it is installed (torch.hub): count only what tq_core adds
    code = (
        "import sys, torch; before = set(sys.modules); import tq_core, tq_core.cli, tq_core.eval; "
        "import tq_core.eval.results, tq_core.eval.plots, tq_core.eval.profiling; "
        f"print(sorted({{m.split('.')[0] for m in set(sys.modules) - before}} & set({EXTRA_ONLY!r})))"
    )
    src = str(Path(tq_core.__file__).resolve().parents[1])  # where this process finds tq_core
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_runtime_dependencies_are_torch_only():
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    names = [r.split(">")[0].split("=")[0].split("<")[0].strip() for r in project["dependencies"]]
    assert names == ["torch"]
    eval_extra = " ".join(project["optional-dependencies"]["eval"])
    assert all(name in eval_extra for name in ("tqdm", "matplotlib"))
