"""Vertex AI's streamed function-call arguments: ``partialArgs`` fragments, each setting one JSON path.

A streamed call opens with a ``functionCall`` that has ``willContinue: true``; later ``functionCall`` parts
bring ``partialArgs`` - ``{"jsonPath": "$.location", "stringValue": "Bos", "willContinue": true}`` - and the
call ends with a part whose own ``willContinue`` is not true, or with an empty ``functionCall``. A fragment
sets the value at its path (numberValue, boolValue, nullValue or stringValue); a string fragment whose
predecessor on the same path said ``willContinue`` is appended to it instead.

Updates are functional (containers along the path are copied, never changed in place), so a dialect can
work out a chunk's effect whole, check it, and only then make it the state.
"""

from __future__ import annotations

import re
from typing import Any

MAX_INDEX = 10_000  # an array index beyond this is refused rather than padded out
MAX_DEPTH = 64
Path = tuple[str | int, ...]

_SEGMENT = re.compile(r"""\.([A-Za-z_$][\w$-]*)|\[(\d+)\]|\['((?:[^'\\]|\\.)*)'\]|\["((?:[^"\\]|\\.)*)"\]""")
_ESCAPE = re.compile(r"\\(.)")
_VALUES = ("stringValue", "numberValue", "boolValue", "nullValue")


def parse_path(path: str) -> Path | None:
    """``$.a.b[0]['c d']`` as ``("a", "b", 0, "c d")``; None for what this reader does not support."""
    if not path.startswith("$"):
        return None
    segments: list[str | int] = []
    position = 1
    while position < len(path):
        match = _SEGMENT.match(path, position)
        if match is None:
            return None
        name, number, single, double = match.groups()
        if number is not None:
            if int(number) > MAX_INDEX:
                return None
            segments.append(int(number))
        else:
            segments.append(name if name is not None else _ESCAPE.sub(r"\1", single if single is not None else double))
        position = match.end()
    if not segments or type(segments[0]) is int or len(segments) > MAX_DEPTH:
        return None  # the arguments are an object: a path must name one of its keys first
    return tuple(segments)


def read_fragment(fragment: Any) -> tuple[Path, Any, bool] | str:
    """(path, value, will continue) of one ``partialArgs`` entry, or the reason it cannot be read."""
    if type(fragment) is not dict:
        return f"a partialArgs entry must be an object, got {fragment!r:.60}"
    json_path = fragment.get("jsonPath")
    path = parse_path(json_path) if type(json_path) is str else None
    if path is None:
        return f"unsupported jsonPath {json_path!r:.60}"
    present = [key for key in _VALUES if key in fragment]
    if len(present) > 1:
        return f"a partialArgs entry has several values: {', '.join(present)}"
    value: Any = ""  # proto3 JSON leaves an empty string out
    if present:
        value = fragment[present[0]]
        if present[0] == "nullValue":
            value = None
        elif present[0] == "stringValue" and type(value) is not str:
            return f"stringValue must be a string, got {value!r:.40}"
        elif present[0] == "boolValue" and type(value) is not bool:
            return f"boolValue must be a boolean, got {value!r:.40}"
        elif present[0] == "numberValue" and type(value) not in (int, float):
            return f"numberValue must be a number, got {value!r:.40}"
    will = fragment.get("willContinue")
    if will is not None and type(will) is not bool:
        return f"willContinue must be a boolean, got {will!r:.40}"
    return path, value, bool(will)


class PartialArguments:
    """One streamed call's arguments so far, and the paths whose string goes on in the next fragment."""

    __slots__ = ("args", "continuing")

    def __init__(self, args: dict[str, Any], continuing: frozenset[Path] = frozenset()) -> None:
        self.args = args
        self.continuing = continuing

    def with_fragments(self, fragments: list[tuple[Path, Any, bool]]) -> PartialArguments:
        """These arguments with the fragments applied, as a new object; this one is left as it was."""
        args: Any = self.args
        continuing = set(self.continuing)
        for path, value, will in fragments:
            append = path in continuing and type(value) is str
            args = _updated(args, path, value, append)
            if will and type(value) is str:
                continuing.add(path)
            else:
                continuing.discard(path)
        return PartialArguments(args, frozenset(continuing))


def _updated(node: Any, path: Path, value: Any, append: bool) -> Any:
    key, rest = path[0], path[1:]
    container: Any
    if type(key) is int:
        container = list(node) if type(node) is list else []
        container.extend([None] * (key + 1 - len(container)))
        old = container[key]
    else:
        container = dict(node) if type(node) is dict else {}
        old = container.get(key)
    if rest:
        container[key] = _updated(old, rest, value, append)
    elif append and type(old) is str:
        container[key] = old + value
    else:
        container[key] = value
    return container
