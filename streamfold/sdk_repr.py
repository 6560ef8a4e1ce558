"""Read chunks an SDK printed: ``print(chunk)`` of an openai-python (or compatible) object writes its repr,
``ChatCompletionChunk(id='...', choices=[Choice(delta=ChoiceDelta(content='Hi', ...), ...)], ...)``, on one
line or, pretty-printed as in provider documentation, over several.

The text is parsed, never evaluated: ``ast.parse(mode="eval")`` builds a syntax tree, and a walker accepts only
what a printed model consists of - calls of a class-like name with keyword arguments only, string, number,
None, True and False literals, negative numbers, lists and dicts with string keys. Each call becomes the dict
of its keyword arguments (the class name says nothing the fields do not), so a printed chunk reads as the JSON
chunk it was built from. Anything else - an attribute, a positional argument, an operator, a lowercase name
such as ``__import__`` - is a ChunkError naming what was found.
"""

from __future__ import annotations

import ast
import re
from typing import Any

from streamfold.errors import ChunkError

MAX_DEPTH = 100  # brackets deep; JSON encoders refuse from 255, and the parser's own limit is 200
_CLASS_NAME = re.compile(r"[A-Z][A-Za-z0-9]*\Z")
_STARTS_A_CALL = re.compile(rb"\s*[A-Za-z_][A-Za-z0-9_]*\s*\(")
_INT_RANGE = (-(2**63), 2**64 - 1)  # what JSON encoders write as integers
_OPEN, _CLOSE = frozenset("([{"), frozenset(")]}")


def looks_printed(line: bytes) -> bool:
    """Whether a capture's first line starts a printed object (``Name(``) rather than JSON or SSE."""
    return _STARTS_A_CALL.match(line) is not None


def parse_printed(text: str) -> dict[str, Any]:
    """One printed object as the dict of its fields; raises ChunkError if it is anything else."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError) as exc:  # ValueError: a NUL byte
        raise ChunkError(f"not a printed chunk: {exc.msg if isinstance(exc, SyntaxError) else exc}") from None
    except (RecursionError, MemoryError):
        raise ChunkError("not a printed chunk: too deeply nested to parse") from None
    if not isinstance(tree.body, ast.Call):
        raise ChunkError(f"not a printed chunk: expected Name(field=...), found {_describe(tree.body)}")
    value = _value(tree.body, 0)
    assert isinstance(value, dict)
    return value


def _value(node: ast.expr, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise ChunkError(f"a printed chunk nested deeper than {MAX_DEPTH} levels")
    if isinstance(node, ast.Constant):
        return _constant(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd) \
            and isinstance(node.operand, ast.Constant) and type(node.operand.value) in (int, float):
        number = _constant(node.operand.value)
        return -number if isinstance(node.op, ast.USub) else number
    if isinstance(node, ast.List):
        return [_value(item, depth + 1) for item in node.elts]
    if isinstance(node, ast.Dict):
        fields: dict[str, Any] = {}
        for key, item in zip(node.keys, node.values):
            if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
                raise ChunkError(f"a dict key must be a string, found {_describe(key)}")
            fields[key.value] = _value(item, depth + 1)
        return fields
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and _CLASS_NAME.match(node.func.id):
        if node.args or any(keyword.arg is None for keyword in node.keywords):
            raise ChunkError(f"{node.func.id}(...) may only have field=value arguments")
        return {keyword.arg: _value(keyword.value, depth + 1) for keyword in node.keywords}
    raise ChunkError(f"{_describe(node)} is not allowed in a printed chunk")


def _constant(value: Any) -> Any:
    kind = type(value)
    if value is None or kind in (str, bool):
        return value
    if kind is int and _INT_RANGE[0] <= value <= _INT_RANGE[1]:
        return value
    if kind is float and value - value == 0:  # finite
        return value
    raise ChunkError(f"the literal {_short(repr(value))} is not allowed in a printed chunk")


def _describe(node: ast.expr | None) -> str:
    if node is None:
        return "**"
    if isinstance(node, ast.Call):
        return f"a call of {_source(node.func)}"
    if isinstance(node, ast.Attribute):
        return f"the attribute access {_source(node)}"
    if isinstance(node, ast.Name):
        return f"the name {node.id}"
    return f"{type(node).__name__} {_source(node)}"


def _source(node: ast.expr) -> str:
    try:
        return _short(ast.unparse(node))
    except RecursionError:  # a chain of attributes or operators thousands long
        return "(too long to show)"


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class PrintedLines:
    """Gathers the lines of printed objects, one object at a time: ``feed`` a line, get the object's whole
    text once its brackets close (None until then). ``flush`` at the end returns an object left open.

    Only where an object ends is decided here, by counting brackets outside string literals; whether the text
    is a printed chunk at all is ``parse_printed``'s to say. A bracket nested deeper than ``MAX_DEPTH`` is a
    ChunkError at once, so that no hostile input reaches the parser's recursion.
    """

    __slots__ = ("_lines", "_depth")

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._depth = 0

    def feed(self, line: str) -> str | None:
        if not self._lines and not line.strip():
            return None
        self._lines.append(line)
        quote = ""
        escaped = False
        for char in line:
            if quote:
                if escaped:
                    escaped = False
                elif char == "\\":
                    escaped = True
                elif char == quote:
                    quote = ""
            elif char in "'\"":
                quote = char
            elif char in _OPEN:
                self._depth += 1
                if self._depth > MAX_DEPTH:
                    raise ChunkError(f"a printed chunk nested deeper than {MAX_DEPTH} levels")
            elif char in _CLOSE:
                self._depth -= 1
        if self._depth > 0:
            return None
        return self.flush()

    def flush(self) -> str | None:
        text = "".join(self._lines)
        self._lines, self._depth = [], 0
        return text if text.strip() else None

    @property
    def open(self) -> bool:
        """Whether an object has begun and not ended."""
        return bool(self._lines)
