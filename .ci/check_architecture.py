"""The layering rules of packages/*/src, checked from the source (stdlib only; run by `nox -s lint`).

1. Packages import only downwards: tq_core <- tq_kernels <- {tq_hf, tq_vllm}; tq_hf and tq_vllm never
   import each other.
2. No import cycle between modules.  Imports under `if TYPE_CHECKING:` are left out (they never run);
   `from pkg import submodule` counts as an import of the submodule, not of the package's __init__.
3. No source file over MAX_LINES lines.

Exits 1 with one line per violation.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RANK = {"tq_core": 0, "tq_kernels": 1, "tq_hf": 2, "tq_vllm": 2}
MAX_LINES = 600


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node, except the bodies of `if TYPE_CHECKING:` blocks."""
    out: list[ast.AST] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        out.append(node)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
    return out


def modules() -> dict[str, Path]:
    found = {}
    for src in sorted(ROOT.glob("packages/*/src")):
        for f in sorted(src.rglob("*.py")):
            parts = f.relative_to(src).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            if name.split(".")[0] in RANK:
                found[name] = f
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    is_pkg = path.name == "__init__.py"
    deps: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            deps.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            deps.update(subs if len(subs) == len(node.names) else [base, *subs])
    resolved = set()
    for dep in deps:
        while dep and dep not in known:
            dep = dep.rpartition(".")[0]
        if dep and dep != name:
            resolved.add(dep)
    return resolved


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    comp.append(member)
                    if member == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def violations(known: dict[str, Path]) -> list[str]:
    graph = {name: imports(name, path, known) for name, path in known.items()}
    bad = []
    for name, deps in sorted(graph.items()):
        top = name.split(".")[0]
        for dep in sorted(deps):
            other = dep.split(".")[0]
            if other != top and RANK[other] >= RANK[top]:
                bad.append(f"layering: {name} imports {dep} ({other} is not below {top})")
    bad += [f"import cycle: {' <-> '.join(comp)}" for comp in cycles(graph)]
    for path in sorted(known.values()):
        n = len(path.read_text().splitlines())
        if n > MAX_LINES:
            bad.append(f"size: {path.relative_to(ROOT)} has {n} lines (> {MAX_LINES}): split it")
    return bad


def main() -> int:
    known = modules()
    bad = violations(known)
    for line in bad:
        print(line)
    print(f"check_architecture: {len(known)} modules, {len(bad)} violation(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
