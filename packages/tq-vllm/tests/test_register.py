"""``register()``: found through the entry point by vLLM's own loader, idempotent, and harmless when it
cannot work (unsupported vLLM, missing dependency, an internal error): it warns and vLLM starts.  Without
vLLM installed it says so in one line; real failures keep their traceback."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import tq_vllm
from tq_vllm._compat import SUPPORTED_RANGE, release, unsupported_reason


@pytest.fixture(autouse=True)
def _plugin_log_reaches_caplog(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once a test has built a vLLM config in this process, vLLM's logging setup stops its `vllm` logger
    (the plugin's parent) from propagating to the root logger, where caplog listens; let it through."""
    monkeypatch.setattr(logging.getLogger("vllm"), "propagate", True)


def _run(code: str, extra_path: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*(extra_path or []), *sys.path])
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300
    )


def test_import_is_light() -> None:
    """A general plugin is imported by every vLLM process: it must not pull in vLLM or torch."""
    result = _run("import sys, tq_vllm; print(sorted({'vllm', 'torch', 'triton'} & set(sys.modules)))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("version", "ok"),
    [
        ("0.26.0", True),
        ("0.32.0+cpu", True),
        ("0.29.1rc2.dev3+g0a1b", True),
        ("0.34.0", True),
        ("0.25.9", False),
        ("0.35.0.dev5", False),
        ("1.0.0", False),
        ("unknown", False),
    ],
)
def test_supported_range(version: str, ok: bool) -> None:
    assert (unsupported_reason(version) is None) == ok


def test_declared_vllm_range_matches_the_runtime_check() -> None:
    """The `vllm` extra in pyproject.toml and the range register() enforces are the same."""
    tomllib = pytest.importorskip("tomllib")
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    extra = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]["vllm"]
    assert extra == [f"vllm{SUPPORTED_RANGE}"]


def test_release_parsing() -> None:
    assert release("0.32.0+cpu") == (0, 32, 0)
    assert release("v0.26.1rc1") == (0, 26, 1)


# -- without vLLM --------------------------------------------------------------------------------------


def _plugin_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "vllm.tq_vllm"]


def test_without_vllm_one_line_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """vLLM simply not installed is no failure of tq-vllm: one warning line, no traceback."""
    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` sees without vLLM
    with caplog.at_level(logging.WARNING, logger="vllm.tq_vllm"):
        tq_vllm.register()
    [record] = _plugin_records(caplog)
    message = record.getMessage()
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert "vLLM is not installed" in message and "pip install 'tq-vllm[vllm]'" in message
    assert SUPPORTED_RANGE in message and "\n" not in message
    assert "Traceback" not in caplog.text and "failed to register" not in caplog.text


def test_without_vllm_a_fresh_process_prints_one_line() -> None:
    """What a user sees calling register() where vLLM cannot be imported, with logging unconfigured."""
    result = _run("import sys; sys.modules['vllm'] = None; import tq_vllm; tq_vllm.register()")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "vLLM is not installed" in lines[0] and "tq-vllm[vllm]" in lines[0]


def test_broken_vllm_keeps_the_traceback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An installed vLLM that fails to import is a real failure: logged as an error with its traceback."""
    from tq_vllm import _compat

    def broken() -> str:
        raise ModuleNotFoundError("No module named 'vllm._C'", name="vllm._C")

    monkeypatch.setattr(tq_vllm, "find_spec", lambda name: object())  # vLLM (and the rest) present
    monkeypatch.setattr(_compat, "installed_vllm_version", broken)
    with caplog.at_level(logging.WARNING, logger="vllm.tq_vllm"):
        tq_vllm.register()
    [record] = _plugin_records(caplog)
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert "failed to register" in record.getMessage()
    assert "Traceback" in caplog.text and "vllm._C" in caplog.text


# -- with vLLM ---------------------------------------------------------------------------------------


@pytest.fixture
def vllm_registry():
    pytest.importorskip("vllm")
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    custom = AttentionBackendEnum.CUSTOM
    before = custom.get_path() if custom.is_overridden() else None
    custom.clear_override()
    yield custom
    custom.clear_override()
    if before is not None:
        from vllm.v1.attention.backends.registry import register_backend

        register_backend(custom, before)


def test_register_is_idempotent(vllm_registry) -> None:
    assert tq_vllm.register() is None
    tq_vllm.register()
    assert vllm_registry.get_path() == tq_vllm.BACKEND_PATH


@pytest.mark.parametrize("version", ["0.25.0", "0.35.0", "0.40.1+cu130"])
def test_unsupported_vllm_warns_and_registers_nothing(
    vllm_registry, version: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import vllm

    monkeypatch.setattr(vllm, "__version__", version)
    with caplog.at_level(logging.WARNING, logger="vllm.tq_vllm"):
        tq_vllm.register()
    assert not vllm_registry.is_overridden()
    text = caplog.text
    assert "NOT active" in text and version in text and SUPPORTED_RANGE in text


def test_missing_dependency_warns_and_registers_nothing(
    vllm_registry, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = tq_vllm.find_spec
    monkeypatch.setattr(tq_vllm, "find_spec", lambda name: None if name == "tq_kernels" else real(name))
    with caplog.at_level(logging.WARNING, logger="vllm.tq_vllm"):
        tq_vllm.register()
    assert not vllm_registry.is_overridden()
    assert "missing tq_kernels" in caplog.text


def test_internal_error_is_logged_not_raised(
    vllm_registry, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def boom() -> None:
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(tq_vllm, "_register", boom)
    with caplog.at_level(logging.ERROR, logger="vllm.tq_vllm"):
        tq_vllm.register()
    assert "simulated failure" in caplog.text and "vLLM continues without it" in caplog.text


def _entry_point_path(tmp_path: Path) -> list[str]:
    """A path that publishes the entry point: none when tq-vllm is installed, else a minimal dist-info
    (vLLM's loader reads entry points from distribution metadata, never from a source tree)."""
    if any(ep.name == "tq_vllm" for ep in entry_points(group="vllm.general_plugins")):
        return []
    info = tmp_path / "tq_vllm-0.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tq-vllm\nVersion: 0.0.0\n")
    (info / "entry_points.txt").write_text("[vllm.general_plugins]\ntq_vllm = tq_vllm:register\n")
    return [str(tmp_path)]


def test_vllm_plugin_loader_registers_the_backend(tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    result = _run(
        """
        from vllm.plugins import load_general_plugins
        from vllm.v1.attention.backends.registry import AttentionBackendEnum
        load_general_plugins()
        print("CUSTOM=" + AttentionBackendEnum.CUSTOM.get_path())
        """,
        _entry_point_path(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert f"CUSTOM={tq_vllm.BACKEND_PATH}" in result.stdout


def test_unsupported_vllm_still_starts(tmp_path: Path) -> None:
    """An engine configuration builds (plugins load inside EngineArgs) although tq-vllm declines."""
    pytest.importorskip("vllm")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(
        '{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, '
        '"intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4, '
        '"num_key_value_heads": 2, "vocab_size": 1000, "max_position_embeddings": 512}'
    )
    result = _run(
        f"""
        from _platform import pin_cuda_platform_without_gpu
        pin_cuda_platform_without_gpu()  # where vLLM has no platform (its CUDA wheel without a GPU)
        import vllm
        vllm.__version__ = "0.99.0"
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.attention.backends.registry import AttentionBackendEnum
        EngineArgs(model={str(model)!r}, load_format="dummy", skip_tokenizer_init=True).create_engine_config()
        print("overridden=" + str(AttentionBackendEnum.CUSTOM.is_overridden()))
        """,
        _entry_point_path(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert "overridden=False" in result.stdout
    log = result.stdout + result.stderr  # vLLM 0.26 logs to stdout, 0.32 to stderr
    assert "NOT active" in log and "0.99.0" in log
