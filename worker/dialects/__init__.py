"""The stream dialects, and the one place that picks one: by name, or by recognising a stream's first event.

Each dialect is a module of its own that knows its events (``Dialect`` in ``base.py``), with what it builds
beside it where that grew large (``responses_output``, ``gemini_response``, ``gemini_partial_args``); all of
them fold into the one shared state of ``worker/choice.py``. Adding a dialect takes its module and a line in
``DIALECTS`` (and its name in ``streamfold.contract.Format``, the wire's list of names, which a test keeps
equal to this table).
"""

from __future__ import annotations

from typing import Any

from streamfold.contract import Format
from worker.dialects.anthropic import AnthropicDialect
from worker.dialects.base import Dialect
from worker.dialects.chat import ChatDialect
from worker.dialects.gemini import GeminiDialect
from worker.dialects.responses import ResponsesDialect

# Tried in this order on a stream's first event; chat, which claims everything, comes last.
DIALECTS: dict[str, type[Dialect]] = {
    "anthropic": AnthropicDialect,
    "responses": ResponsesDialect,
    "gemini": GeminiDialect,
    "chat": ChatDialect,
}


def dialect_named(name: Format | str) -> type[Dialect]:
    """The dialect of that name; ValueError for a name no dialect has."""
    try:
        return DIALECTS[name]
    except KeyError:
        raise ValueError(f"unknown stream format {name!r}; expected one of {', '.join(DIALECTS)}") from None


def recognize(event: dict[str, Any]) -> type[Dialect]:
    """The dialect a stream is in, told by its first event."""
    for dialect in DIALECTS.values():
        if dialect.recognizes(event):
            return dialect
    return ChatDialect


def native_usage(format: Format | str, native: dict[str, Any] | None) -> dict[str, Any] | None:
    """The provider's own usage object inside a record's ``native`` object (None for chat or none sent)."""
    dialect = DIALECTS.get(format)
    return None if dialect is None or native is None else dialect.native_usage(native)


__all__ = ["DIALECTS", "Dialect", "dialect_named", "native_usage", "recognize"]
