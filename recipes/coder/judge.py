"""The coder ARM's objective, judged by a program: documented, typed Python.

Contract: `code_blocks(answer)` returns the fenced code blocks of a Markdown answer (``` or
```python; an answer without fences is taken whole if it parses as Python). `score(answer)` is
the mean over every function and method defined in those blocks of (has a docstring + has every
parameter and the return annotated) / 2, so 1.0 is fully documented and typed code and 0.0 none
of it; it is None when the answer defines no function (nothing to judge). `self` and `cls` need no
annotation. A block that does not parse is read up to its last whole line at which it does: an
answer cut off by its token limit is judged on the code it finished. `definitions(block)` is
the block's imports, definitions and assignments, for a test harness to run.
"""

from __future__ import annotations

import ast
import re

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON = {"", "python", "py", "python3"}


def code_blocks(answer: str) -> list[str]:
    blocks = [body for lang, body in _FENCE.findall(answer) if lang.lower() in _PYTHON]
    if not blocks and "```" not in answer and _parses(answer):
        blocks = [answer]
    return blocks


def _parses(source: str) -> bool:
    try:
        ast.parse(source)
        return True
    except (SyntaxError, ValueError):
        return False


def functions(answer: str) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    out = []
    for block in code_blocks(answer):
        tree = _longest_parse(block)
        out += [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef,
                                                             ast.AsyncFunctionDef))]
    return out


def _longest_parse(block: str) -> ast.Module:
    """The syntax tree of the block's longest prefix of whole lines that parses (the empty
    module at worst)."""
    lines = block.splitlines(keepends=True)
    for end in range(len(lines), 0, -1):
        try:
            return ast.parse("".join(lines[:end]))
        except (SyntaxError, ValueError):
            continue
    return ast.Module(body=[], type_ignores=[])


def definitions(block: str) -> str:
    """The block's imports, functions, classes and top-level assignments as code (read as
    `functions` reads it): what a test harness needs from an answer, without the calls, prints
    and self-tests an answer adds after its code, which may fail or be cut off."""
    keep = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
            ast.Assign, ast.AnnAssign)
    body = [node for node in _longest_parse(block).body if isinstance(node, keep)]
    return ast.unparse(ast.Module(body=body, type_ignores=[]))


def is_typed(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    args = fn.args
    params = args.posonlyargs + args.args + args.kwonlyargs
    params += [a for a in (args.vararg, args.kwarg) if a is not None]
    needed = [p for i, p in enumerate(params) if not (i == 0 and p.arg in ("self", "cls"))]
    return fn.returns is not None and all(p.annotation is not None for p in needed)


def score(answer: str) -> float | None:
    fns = functions(answer)
    if not fns:
        return None
    return sum((ast.get_docstring(f) is not None) + is_typed(f) for f in fns) / (2 * len(fns))
