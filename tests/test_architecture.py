"""docs/architecture.md's layer table is true: every import inside the package (lazy ones
included, type-checking ones excepted) goes to a module of the importer's row or a row below."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "edge_genarm"


def layers() -> dict[str, int]:
    """Module name -> its row (0 = top) in the docs' table."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("## Layers", 1)[1].split("\n\n")[2]
    rows = [m.group(1).split(", ") for m in
            re.finditer(r"^    ([a-z_.]+(?:, [a-z_.]+)*)(?:\s{2,}|$)", block, re.M)]
    return {name: i for i, row in enumerate(rows) for name in row}


def row_of(parts: list[str], rank: dict[str, int]) -> int | None:
    """A module's row: by its package and module (serve.app) or by its top name (engine)."""
    for name in (".".join(parts[:2]), parts[0]):
        if name in rank:
            return rank[name]
    return None


def type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    return skip


def imports(path: Path) -> list[tuple[int, list[str]]]:
    """(line, the imported module's path inside the package) for each relative import."""
    here = list(path.relative_to(PACKAGE).with_suffix("").parts)
    tree = ast.parse(path.read_text())
    skip = type_checking_nodes(tree)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or not node.level or id(node) in skip:
            continue
        base = here[:len(here) - node.level]
        if node.module:
            out.append((node.lineno, base + node.module.split(".")))
        else:  # from . import a, b
            out += [(node.lineno, base + [a.name]) for a in node.names]
    return out


def test_every_module_has_a_row_and_imports_only_its_row_or_below():
    rank = layers()
    assert len(rank) > 20
    unplaced, upward = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] in ("__init__", "__main__"):  # a package's own door, not a layer
            continue
        mine = row_of(parts, rank)
        if mine is None:
            unplaced.append("/".join(parts))
            continue
        for line, target in imports(path):
            theirs = row_of(target, rank) if target and target[0] != "__init__" else None
            if theirs is not None and theirs < mine:
                upward.append(f"{'/'.join(parts)}:{line} imports {'.'.join(target)}")
    assert unplaced == [] and upward == []
