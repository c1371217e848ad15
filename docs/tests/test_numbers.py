"""The READMEs and docs/**/*.md quote only numbers that experiments/results/ holds.

Every number followed by a unit (ms, s, x, %, GiB, MiB, GB, B, GB/s, TB/s, tokens/s, tok/s) in the prose
must be one of the numbers of a results file, rounded to the precision the prose quotes (``5.4 ms``
matches 5.446; a ``%`` also matches a stored fraction, 0.026 for ``2.6%``), or one that the docs' results
hook (``docs/hooks/results.py``) computes from those files, such as a ratio it prints in a table.

A paragraph, list item or table may take its numbers from the results files it names (a results
marker names the files its renderer reads) and from those named by the last paragraph, table or marker
before it in its section; text that names none, from any current file. Files under
``experiments/results/superseded/`` count only where named, so a replaced run's number cannot pass for a
current one. Code blocks, inline code, HTML comments, SVG and the format tables (checked against
tq_core by ``test_format_tables.py``) are not prose. A number quoted without naming its file can only
be checked loosely (some current file must hold it): name the file.

The READMEs' sentences with derived numbers (per-call times from a profile, ratios of two runs) are
rendered between ``<!-- results: KEY -->`` and ``<!-- /results -->`` by ``python docs/hooks/results.py``;
a stale one fails here.

Numbers that are not measurements (targets, estimates) are listed in ``ALLOWED`` with the words
around them, so each is allowed in that sentence only.
"""

from __future__ import annotations

import bisect
import importlib.util
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "results"
SUPERSEDED = RESULTS / "superseded"
PAGES = [
    ROOT / "README.md",
    ROOT / "experiments" / "README.md",
    *sorted((ROOT / "packages").glob("*/README.md")),
    *sorted(p for p in (ROOT / "docs").rglob("*.md") if "tests" not in p.parts and "hooks" not in p.parts),
]

_spec = importlib.util.spec_from_file_location("results_hook", ROOT / "docs" / "hooks" / "results.py")
assert _spec is not None and _spec.loader is not None
hook = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hook)

NUMBER = r"[-+]?\d+(?:,\d{3})*(?:\.\d+)?"
UNIT = r"ms|s|x|%|GiB|MiB|GB|B|GB/s|TB/s|tokens/s|tok/s"
# A number with a unit, or a range of two ("1.26-1.28x", "15.2-15.4 ms") sharing one.
QUOTE = re.compile(
    rf"(?<![\w.\-/+])(?P<a>{NUMBER})(?:\s?(?:-|–|to)\s?(?P<b>{NUMBER}))?\s?(?P<unit>{UNIT})(?![\w/])"
)
# The format tables and notes: format arithmetic, checked against tq_core by test_format_tables.py.
FORMATS_BLOCK = r"<!-- (formats-(?:note|table)) -->.*?<!-- /\1 -->"
STORED = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
FILE_NAME = re.compile(
    r"(?P<dir>(?:[\w.\-]+/)*)(?P<name>[\w{},*.\-]*[\w}]\.(?:\{[\w,]+\}|jsonl|json|log|md|png|out))(?!\w)"
)

# (page, words around the number, the quoted number): numbers that are not measurements.
ALLOWED: list[tuple[str, str, str]] = [
    # the project's targets, not measurements
    ("*", "targets: 2.5x, and 70% of the copy bandwidth", "2.5x"),
    ("*", "targets: 2.5x, and 70% of the copy bandwidth", "70%"),
    ("*", "(target 50%)", "50%"),
    ("*", "(target 1.1x, met)", "1.1x"),
    # estimates (sizes over the HBM bandwidth; instructions over the issue rate), not timings
    ("docs/results/benchmarks.md", "whole cache from HBM takes under 10 ms", "10 ms"),
    ("experiments/README.md", "would issue in time for ~75% of bandwidth", "75%"),
]


@dataclass(frozen=True)
class Quote:
    page: str
    line: int
    text: str  # the number as written, with its unit
    value: str  # the number alone
    unit: str
    block: str
    cited: frozenset[str]


# -- what the results files hold ---------------------------------------------------------------------------
def _result_files() -> list[Path]:
    """Every results file but plots and the READMEs that describe them (prose, not results)."""
    return sorted(
        p for p in RESULTS.rglob("*") if p.is_file() and p.suffix != ".png" and p.name != "README.md"
    )


def _numbers(text: str) -> list[float]:
    return [float(m.group()) for m in STORED.finditer(text)]


RENDERER_FILES: dict[str, set[str]] = {}  # the files each results marker's renderer read


def _hook_numbers() -> dict[str, list[float]]:
    """Numbers the results hook renders, keyed by the results files each renderer read."""
    out: dict[str, list[float]] = {}
    loaders = {"_load": hook._load, "_read": hook._read}
    for key, render in hook.RENDERERS.items():
        read: list[str] = []

        def spy(name: str, _real: object, _read: list[str] = read) -> object:
            _read.append(name)
            return _real(name)  # type: ignore[operator]

        for attr, real in loaders.items():
            setattr(hook, attr, lambda name, _real=real: spy(name, _real))
        try:
            text = render("index.md")
        finally:
            for attr, real in loaders.items():
                setattr(hook, attr, real)
        RENDERER_FILES[key] = set(read)
        for name in read or [key]:
            out.setdefault(name, []).extend(_numbers(text))
    return out


def _pools() -> dict[str, list[float]]:
    pools = {str(p.relative_to(RESULTS)): _numbers(p.read_text(errors="replace")) for p in _result_files()}
    for name, values in _hook_numbers().items():
        pools.setdefault(name, []).extend(values)
    return {name: sorted(set(v)) for name, v in pools.items()}


POOLS = _pools()
CURRENT = sorted({v for name, vals in POOLS.items() if not name.startswith("superseded/") for v in vals})


def _matches(values: list[float], quoted: str, unit: str) -> bool:
    q = quoted.replace(",", "")
    decimals = len(q.split(".")[1]) if "." in q else 0
    target = abs(float(q))
    half = 0.5 * 10.0**-decimals + 1e-9
    candidates = [target, target / 100] if unit == "%" else [target]
    for t in candidates:
        h = half if t == target else half / 100
        for sign in (1, -1):
            i = bisect.bisect_left(values, sign * t - h)
            if i < len(values) and values[i] <= sign * t + h:
                return True
    return False


# -- what the pages quote ----------------------------------------------------------------------------------
def _cited(text: str) -> set[str]:
    """Results files a block names (``hf_h200.{json,log}`` and ``quality_{hf,vllm}.jsonl`` expanded).

    A ``.md`` name counts only with its ``experiments/results/`` path: elsewhere it is a docs page.  A
    results marker (``<!-- results: KEY -->``) names the files its renderer reads.
    """
    names: set[str] = set()
    for key in re.findall(r"<!-- results: ([a-z0-9-]+) -->", text):
        names |= RENDERER_FILES.get(key, set())
    for m in FILE_NAME.finditer(text):
        if m.group("name").endswith(".md") and "experiments/results/" not in m.group("dir"):
            continue
        for name in _expand(m.group("name")):
            pattern = re.compile(re.escape(name).replace(r"\*", ".*") + r"$")
            names |= {n for n in POOLS if pattern.match(n) or pattern.match(n.rsplit("/", 1)[-1])}
    return names


def _expand(name: str) -> list[str]:
    m = re.search(r"\{([^}]*)\}", name)
    if not m:
        return [name]
    return [x for part in m.group(1).split(",") for x in _expand(name[: m.start()] + part + name[m.end() :])]


def _prose(text: str) -> str:
    """The text with code, comments and SVG blanked out (newlines kept, so line numbers stay)."""

    def blank(m: re.Match[str]) -> str:
        return re.sub(r"[^\n]", " ", m.group())

    for pattern in (FORMATS_BLOCK, r"^```.*?^```", r"<!--.*?-->", r"<svg.*?</svg>", r"`[^`\n]*`"):
        text = re.sub(pattern, blank, text, flags=re.DOTALL | re.MULTILINE)
    return text


def _blocks(text: str) -> Iterator[tuple[int, str, str, set[str]]]:
    """(first line, raw block, prose block, cited files) for each paragraph, list item or table.

    A block also takes the names of the last paragraph, table or results marker before it in its
    section that named files (text goes on from its source; list items are separate facts and pass
    nothing on). A block left with no names is checked against every current file.
    """
    raw_lines, prose_lines = text.split("\n"), _prose(text).split("\n")
    sections: list[list[int]] = [[]]
    for i, line in enumerate(raw_lines):
        if line.startswith("#"):
            sections.append([])
        sections[-1].append(i)
    for section in sections:
        context: set[str] = set()
        block: list[int] = []
        for i in [*section, None]:
            starts_item = i is not None and re.match(r"^\s{0,3}(?:[-*]|\d+\.)\s", raw_lines[i])
            if i is None or not prose_lines[i].strip() or (starts_item and block):
                if block:
                    raw = "\n".join(raw_lines[j] for j in block)
                    own = _cited(raw)
                    yield block[0] + 1, raw, "\n".join(prose_lines[j] for j in block), own | context
                    if own and not re.match(r"^\s{0,3}(?:[-*]|\d+\.)\s", raw):
                        context = own
                block = []
            if i is not None and prose_lines[i].strip():
                block.append(i)


def _quotes(page: str, text: str) -> list[Quote]:
    out = []
    for first, raw, prose, cited in _blocks(text):
        flat = prose.replace("\n", " ")  # a number and its unit may sit on two lines
        for m in QUOTE.finditer(flat):
            line = first + prose.count("\n", 0, m.start())
            for value in (m.group("a"), m.group("b")):
                if value is not None:
                    text_ = f"{value}{m.group('unit')}"
                    out.append(
                        Quote(
                            page, line, text_, value, m.group("unit"), " ".join(raw.split()), frozenset(cited)
                        )
                    )
    return out


def _allowed(q: Quote) -> bool:
    return any(
        page in ("*", q.page) and words in q.block and q.text.replace(" ", "") == number.replace(" ", "")
        for page, words, number in ALLOWED
    )


def _found(q: Quote) -> bool:
    if q.cited:
        return any(_matches(POOLS[name], q.value, q.unit) for name in q.cited)
    return _matches(CURRENT, q.value, q.unit)


QUOTES = [q for page in PAGES for q in _quotes(str(page.relative_to(ROOT)), page.read_text())]


def _misquoted(quotes: list[Quote]) -> list[Quote]:
    return [q for q in quotes if not _found(q) and not _allowed(q)]


def test_prose_quotes_only_numbers_the_results_hold() -> None:
    missing = _misquoted(QUOTES)
    report = "\n".join(
        f"  {q.page}:{q.line}: {q.text} not in {', '.join(sorted(q.cited)) or 'any current results file'}"
        for q in missing
    )
    assert not missing, (
        f"{len(missing)} number(s) in the prose are not in experiments/results/ (rounded as quoted) nor "
        f"computed from it by docs/hooks/results.py. Correct the sentence from the results file it names, "
        f"have the hook render it, or, for a number that is no measurement, add it to ALLOWED with its "
        f"words:\n{report}"
    )


def test_the_check_finds_quotes_and_rejects_wrong_ones() -> None:
    # The scan must see the README's numbers, and sentences that once stood in the docs must fail:
    # a decode-kernel time no results file holds, and a ratio the cited file does not give.
    assert len([q for q in QUOTES if q.page == "README.md"]) > 30

    def wrong(text: str) -> list[str]:
        return [q.text for q in _misquoted(_quotes("example.md", text))]

    profile = "`vllm_profile_decode_h200_2026-11-28_flash_boundary.log`"
    assert wrong(f"A profile ({profile}) puts our decode kernel at 5.4 ms (28 layers x 0.195 ms).") == [
        "0.195ms"
    ]
    assert wrong("Ours takes 13.74 ms per step (`vllm_anchor_h200.json`).") == ["13.74ms"]
    assert wrong("Ours takes 13.64 ms per step (`vllm_anchor_h200.json`).") == []
    # a replaced run's number passes only where the text names the replaced run's file
    assert wrong("Ours took 31.32 ms per step (`vllm_anchor_h200.json`).") == ["31.32ms"]
    assert wrong("Ours took 31.32 ms (`superseded/vllm_anchor_h200_2026-11-28_plane_loop.json`).") == []


@pytest.mark.parametrize(
    "page", [p for p in PAGES if p.name == "README.md"], ids=lambda p: str(p.relative_to(ROOT))
)
def test_readme_sentences_are_rendered_from_the_results(page: Path) -> None:
    text = page.read_text()
    assert hook._prose.render_generated(text, hook.RENDERERS) == text, (
        f"{page.relative_to(ROOT)}: a generated sentence is stale; run `python docs/hooks/results.py`"
    )


@pytest.mark.parametrize(
    ("text", "cited"),
    [
        ("`hf_h200.{json,log}`", {"hf_h200.json", "hf_h200.log"}),
        ("`quality_{hf,vllm}.jsonl`", {"quality_hf.jsonl", "quality_vllm.jsonl"}),
        ("`experiments/results/vllm_anchor_h200.json`", {"vllm_anchor_h200.json"}),
        ("no file here", set()),
    ],
)
def test_citations_are_read(text: str, cited: set[str]) -> None:
    assert _cited(text) >= cited and (cited or not _cited(text))
