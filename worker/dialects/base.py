"""What every dialect is: a small class that knows its own events and folds them into the shared state.

A dialect gets the ``CompletionState`` it folds into, then one event at a time (a decoded JSON object). It
checks each event whole before it changes anything, raising ``ChunkError`` for what it cannot read, so a
rejected event leaves the state exactly as it was. Besides the chat.completion (built from the shared state
by one code path) a native dialect builds its ``native`` object: the final object as its own API returns it
without streaming.

A dialect sets the state up for itself (its usage mapping, whether a final event is awaited) when it applies
its first event, never in its constructor: the Assembler tries a recognised dialect on the stream's first
event, and if that event is rejected, nothing may have changed.
"""

from __future__ import annotations

from typing import Any, ClassVar, NoReturn

from streamfold.contract import Format
from streamfold.errors import ChunkError
from worker.choice import CompletionState
from worker.chunk_checks import fail


class Dialect:
    """One stream dialect. Subclasses set ``name`` and implement ``recognizes``, ``apply`` and ``native``."""

    name: ClassVar[Format]
    # Whether the Assembler's output mode applies: only chat chunks can carry cumulative text.
    follows_mode: ClassVar[bool] = False

    def __init__(self, state: CompletionState) -> None:
        self.state = state

    @staticmethod
    def recognizes(event: dict[str, Any]) -> bool:
        """Whether a stream whose first event is ``event`` is in this dialect."""
        raise NotImplementedError

    def apply(self, event: dict[str, Any], position: int) -> None:
        """Check one event whole, then fold it into the state; ``ChunkError`` (state untouched) if unreadable."""
        raise NotImplementedError

    def native(self, warnings: list[str]) -> dict[str, Any] | None:
        """The final object as the dialect's API returns it without streaming; None where there is none."""
        return None

    @staticmethod
    def native_usage(native: dict[str, Any]) -> dict[str, Any] | None:
        """The provider's own usage object inside a ``native`` object this dialect built."""
        return None


def expect(value: Any, kind: type, position: int, field: str, expected: str) -> Any:
    """``value`` if it is exactly of ``kind``, else a ChunkError naming the field."""
    if type(value) is not kind:
        fail(position, field, expected, value)
    return value


def optional(value: Any, kind: type, position: int, field: str, expected: str) -> Any:
    """Like ``expect``, but None (absent) is fine too."""
    if value is not None and type(value) is not kind:
        fail(position, field, expected, value)
    return value


def reject(position: int, reason: str) -> NoReturn:
    raise ChunkError(reason, position)


def count(value: Any) -> int | None:
    """A token count as sent, or None when it is not an integer (absent, null, a bool, garbage)."""
    return value if type(value) is int else None
