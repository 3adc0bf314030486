"""One reader of the installed vLLM's code: its source files as text and as syntax trees.

Detection reads code instead of importing it (importing Gemma 4's model module costs
seconds, and the API server never needs it). Lookups go through the syntax tree, not
through text patterns, so that a comment, a blank line or reformatted code in vLLM does
not change what a patch decides, and a lookup that finds nothing says so (``None``),
which the patches turn into UNRECOGNIZED.
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Iterator
from functools import cache
from pathlib import Path

FunctionNode = ast.FunctionDef | ast.AsyncFunctionDef


@cache
def source(relpath: str) -> str | None:
    """Text of a module file of the installed vLLM (``None`` without vLLM or that file)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root, relpath)
        if path.is_file():
            return path.read_text(encoding="utf-8")
    return None


@cache
def parse(text: str) -> ast.Module | None:
    try:
        return ast.parse(text)
    except SyntaxError:
        return None


def find_class(text: str | None, name: str) -> ast.ClassDef | None:
    """The module-level class ``name`` of ``text``."""
    tree = parse(text) if text else None
    for node in tree.body if tree else ():
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    return None


def find_function(text: str | None, qualname: str) -> FunctionNode | None:
    """A module-level function (``"f"``) or a method (``"Class.f"``) of ``text``: its last
    definition, the one Python keeps (``@overload`` stubs come before it)."""
    owner_name, _, name = qualname.rpartition(".")
    if owner_name:
        owner: ast.AST | None = find_class(text, owner_name)
    else:
        owner = parse(text) if text else None
    found = None
    for node in getattr(owner, "body", ()):
        if isinstance(node, FunctionNode) and node.name == name:
            found = node
    return found


def defines(node: ast.AST, name: str) -> bool:
    """Whether a function ``name`` is defined anywhere inside ``node`` (nested ones too)."""
    return any(isinstance(child, FunctionNode) and child.name == name for child in ast.walk(node))


def call_name(call: ast.Call) -> str:
    """The called name: ``f`` for ``f(...)``, ``empty`` for ``torch.empty(...)``."""
    func = call.func
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else ""


def calls(node: ast.AST, name: str) -> Iterator[ast.Call]:
    """Every call of ``name`` (by its last component) inside ``node``."""
    for child in ast.walk(node):
        if isinstance(child, ast.Call) and call_name(child) == name:
            yield child


def keywords(call: ast.Call) -> set[str]:
    return {kw.arg for kw in call.keywords if kw.arg is not None}


def is_name(node: ast.AST, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name


def assigns_self(node: ast.AST | None, attr: str) -> bool:
    """Whether ``node`` stores ``self.<attr>`` (any assignment form, tuple targets too)."""
    return node is not None and any(
        isinstance(child, ast.Attribute)
        and child.attr == attr
        and is_name(child.value, "self")
        and isinstance(child.ctx, ast.Store)
        for child in ast.walk(node)
    )


@cache
def _snippet(code: str) -> tuple[type, str]:
    node: ast.AST = ast.parse(code).body[0]
    if isinstance(node, ast.Expr):
        node = node.value
    return type(node), ast.dump(node)


def has_code(node: ast.AST | None, code: str) -> bool:
    """Whether ``node`` contains the statement or expression ``code``, compared as syntax
    trees: formatting, comments and quote style do not matter, names and values do."""
    return node is not None and any(is_code(child, code) for child in ast.walk(node))


def is_code(node: ast.AST | None, code: str) -> bool:
    """Whether ``node`` is the statement or expression ``code`` (as syntax trees)."""
    kind, dumped = _snippet(code)
    return isinstance(node, kind) and ast.dump(node) == dumped


def strings(node: ast.AST | None) -> Iterator[str]:
    """Every string constant inside ``node`` (implicitly concatenated literals are one)."""
    for child in ast.walk(node) if node is not None else ():
        if isinstance(child, ast.Constant) and isinstance(child.value, str):
            yield child.value


def has_string(node: ast.AST | None, text: str) -> bool:
    """Whether a string constant inside ``node`` contains ``text``."""
    return any(text in value for value in strings(node))


def fstring_templates(node: ast.AST | None) -> Iterator[str]:
    """Every f-string inside ``node``, with its replacement fields unparsed:
    ``f"experts.{expert_id}.{proj_name}."`` -> ``experts.{expert_id}.{proj_name}.``."""
    for child in ast.walk(node) if node is not None else ():
        if isinstance(child, ast.JoinedStr):
            parts = []
            for value in child.values:
                if isinstance(value, ast.FormattedValue):
                    parts.append("{" + ast.unparse(value.value) + "}")
                elif isinstance(value, ast.Constant):
                    parts.append(str(value.value))
            yield "".join(parts)
