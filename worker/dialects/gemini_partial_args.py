"""Vertex AI's streamed function-call arguments: ``partialArgs`` fragments, each setting one JSON path.

A streamed call opens with a ``functionCall`` that has ``willContinue: true``; later ``functionCall`` parts
bring ``partialArgs`` - ``{"jsonPath": "$.location", "stringValue": "Bos", "willContinue": true}`` - and the
call ends with a part whose own ``willContinue`` is not true, or with an empty ``functionCall``. A fragment
sets the value at its path (numberValue, boolValue, nullValue or stringValue); a string fragment whose
predecessor on the same path said ``willContinue`` is appended to it instead.

A call keeps its fragments and works the object out from them when asked, so a dialect can check what a
chunk would make of a call (the arguments must be writable as JSON) before it appends anything.
"""

from __future__ import annotations

import copy
import re
from functools import lru_cache
from typing import Any

MAX_INDEX = 10_000  # an array index beyond this is refused rather than padded out
MAX_DEPTH = 64
Path = tuple[str | int, ...]

_SEGMENT = re.compile(r"""\.([A-Za-z_$][\w$-]*)|\[(\d+)\]|\['((?:[^'\\]|\\.)*)'\]|\["((?:[^"\\]|\\.)*)"\]""")
_ESCAPE = re.compile(r"\\(.)")
_VALUES = ("stringValue", "numberValue", "boolValue", "nullValue")


@lru_cache(maxsize=1024)  # a streamed call names the same few paths fragment after fragment
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
    value, will = fragment.get("stringValue"), fragment.get("willContinue")
    if type(value) is str and (will is True or will is False or will is None) and len(fragment) == 2 + (
            "willContinue" in fragment):  # the common entry, a piece of a string: nothing else to look at
        return path, value, will is True
    present = [key for key in _VALUES if key in fragment]
    if len(present) > 1:
        return f"a partialArgs entry has several values: {', '.join(present)}"
    value = ""  # proto3 JSON leaves an empty string out
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
    if will is not None and type(will) is not bool:
        return f"willContinue must be a boolean, got {will!r:.40}"
    return path, value, bool(will)


Fragment = tuple[Path, Any, bool]


class PartialArguments:
    """One streamed call's arguments: the object it opened with, and every fragment since, in order.

    Fragments are only ever appended; the object they spell is worked out when it is asked for (``value``),
    so a fragment costs no copying however long the call streams.
    """

    __slots__ = ("args", "fragments")

    def __init__(self, args: dict[str, Any], fragments: list[Fragment] | None = None) -> None:
        self.args = args
        self.fragments: list[Fragment] = [] if fragments is None else fragments

    def value(self, more: list[Fragment] | tuple[()] = ()) -> dict[str, Any]:
        """The arguments the fragments spell, ``more`` fragments after these included; nothing is changed."""
        root: dict[str, Any] = copy.deepcopy(self.args)
        continuing: set[Path] = set()
        # A string streamed in many pieces is joined once, not rebuilt piece by piece: ``run`` holds the
        # pieces of the one at ``run_path`` until a fragment for another path comes.
        run_path: Path | None = None
        run: list[str] = []
        for fragments in (self.fragments, more):
            for path, value, will in fragments:
                text = type(value) is str
                if run_path is not None and path != run_path:
                    _set(root, run_path, "".join(run))
                    run_path = None
                if text and path in continuing:
                    if run_path is None:
                        base = _at(root, path)
                        run_path, run = path, [base if type(base) is str else ""]
                    run.append(value)
                else:
                    run_path = None
                    _set(root, path, value)
                if will and text:
                    continuing.add(path)
                else:
                    continuing.discard(path)
        if run_path is not None:
            _set(root, run_path, "".join(run))
        return root


def _at(root: dict[str, Any], path: Path) -> Any:
    node: Any = root
    for key in path:
        if type(node) is not (list if type(key) is int else dict):
            return None
        node = _get(node, key)
    return node


def _set(root: dict[str, Any], path: Path, value: Any) -> None:
    """Set the value at ``path``, making (or replacing) the containers on the way as the path needs them."""
    node: Any = root
    for key, following in zip(path, path[1:]):
        kind = list if type(following) is int else dict
        child = _get(node, key)
        if type(child) is not kind:
            child = kind()
            _put(node, key, child)
        node = child
    _put(node, path[-1], value)


def _get(node: Any, key: str | int) -> Any:
    if type(node) is list:
        return node[key] if type(key) is int and key < len(node) else None
    return node.get(key)


def _put(node: Any, key: str | int, value: Any) -> None:
    if type(node) is list:
        assert type(key) is int  # the container was made for this key's kind
        node.extend([None] * (key + 1 - len(node)))
    node[key] = value
