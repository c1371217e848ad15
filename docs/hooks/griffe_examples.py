"""Griffe extension: read a Google-style ``Example:`` section as ``Examples:``.

The packages' docstrings title their doctests ``Example:``, which griffe reads as an admonition and
renders as markdown, so ``>>>`` lines become nested quotes and an output such as ``['name']`` becomes a
broken link.  Read as ``Examples:``, they render as code.  This changes the docs build only, not the
sources.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_SINGULAR = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _SINGULAR.sub(r"\1Examples:", obj.docstring.value)
