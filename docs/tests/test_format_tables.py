"""The format tables and name notes of the READMEs and docs are what tq_core says.

The named formats carry vLLM's kv_cache_dtype names, which describe vLLM's own layouts
(``tq_core.vllm_layout``), not tq's: ``turboquant_k8v4`` stores 6-bit keys and values here.  Wherever a
page lists the formats it says so, between markers that this test fills in and checks::

    <!-- formats-note -->                      tq_core.PRESET_NAMES_NOTE
    <!-- /formats-note -->
    <!-- formats-table -->                     the table below, from named_format and vllm_layout
    <!-- /formats-table -->

``python docs/tests/test_format_tables.py`` rewrites them; a stale copy fails here.
"""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import pytest

from tq_core import PRESET_NAMES_NOTE, ComponentFormat, format_names, named_format, vllm_layout

ROOT = Path(__file__).resolve().parents[2]
HEAD_DIM = 128
BLOCK = re.compile(
    r"^<!-- (?P<key>formats-(?:note|table)) -->\n(?P<body>.*?)^<!-- /(?P=key) -->$", re.M | re.S
)
NORMS = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def _component(name: str, c: ComponentFormat) -> str:
    extra = f" ({c.hi_bits_coords} coordinates at {c.bits + 1} bit)" if c.hi_bits_coords else ""
    return f"{name} {c.bits} bit{extra}"


def format_table() -> str:
    bf16 = 2 * HEAD_DIM * 2
    rows = [
        "| name (vLLM's `kv_cache_dtype`) | bytes per token-head, head_dim 128 | vs bf16 (512 B) "
        "| what vLLM stores under this name | what tq stores in the same bytes | used + padding |",
        "|---|---|---|---|---|---|",
    ]
    for name in format_names():
        f = named_format(name, HEAD_DIM)
        norms = {NORMS[f.key.norm_dtype], NORMS[f.value.norm_dtype]}
        ours = f"{_component('K', f.key)}, {_component('V', f.value)}, {'/'.join(sorted(norms))} norms"
        rows.append(
            f"| `{name}` | {f.slot_bytes} | {bf16 / f.slot_bytes:.1f}x | {vllm_layout(name)} | {ours} "
            f"| {f.used_bytes} + {f.slot_bytes - f.used_bytes} |"
        )
    return "\n".join(rows)


RENDER = {"formats-note": lambda: textwrap.fill(PRESET_NAMES_NOTE, 104), "formats-table": format_table}
PAGES = [
    ROOT / "README.md",
    ROOT / "packages" / "tq-vllm" / "README.md",
    ROOT / "docs" / "index.md",
    ROOT / "docs" / "concepts" / "formats.md",
    ROOT / "docs" / "quickstart" / "vllm.md",
]


def rendered(text: str) -> str:
    return BLOCK.sub(lambda m: f"<!-- {m['key']} -->\n{RENDER[m['key']]()}\n<!-- /{m['key']} -->", text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_says_the_names_are_vllms(page: Path) -> None:
    text = page.read_text()
    assert BLOCK.search(text), f"{page.relative_to(ROOT)} lists the formats without the names note"
    assert rendered(text) == text, (
        f"{page.relative_to(ROOT)}: a formats note or table is stale; run `python docs/tests/test_format_tables.py`"
    )


def test_table_shows_what_the_names_hide() -> None:
    table = format_table()
    assert (
        "| `turboquant_k8v4` | 196 | 2.6x | K fp8, V 4 bit uniform | K 6 bit, V 6 bit, fp16 norms |" in table
    )
    assert all(f"`{name}`" in table for name in format_names())


if __name__ == "__main__":
    for path in [Path(p) for p in sys.argv[1:]] or PAGES:
        text = path.read_text()
        if rendered(text) != text:
            path.write_text(rendered(text))
            print(f"rewrote {path}")
