"""Follow a request while it streams: its events as they happen, resumable, from Python (sync or asyncio).

``follow(request_id)`` yields the request's events (``worker.live``): text deltas, tool calls, choices
finishing, usage, an attempt starting over, and last the ``Final`` event carrying the result record. It
reads the request's chunk stream from its start, so it works the same while the request streams, after it
finished (chunks are kept ``STREAMFOLD_CHUNK_TTL`` seconds) and, after that, from the result record alone.
``after=token`` (any event's ``token``) continues a dropped follow with nothing lost and nothing repeated.

It never hangs on a request that started: a producer that died leaves a stream a worker ends
``incomplete`` after ``STREAMFOLD_STALL_TIMEOUT``, and the worker's ``final`` entry wakes the follower.
``wait`` bounds the time to wait for a request that has not started yet (an rq job still queued).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import redis
import redis.asyncio

from streamfold import contract
from streamfold.connection import connect_async, connected, redis_errors
from streamfold.contract import validate_request_id
from streamfold.errors import ResultTimeout
from streamfold.keys import Keys
from streamfold.settings import Settings, load_settings
from worker.limits import Limits
from worker.live import (ChoiceFinished, Final, LiveEvent, LiveFold, TextDelta, ToolCallArguments, ToolCallDone,
                         ToolCallStarted, UsageReported, parse_token, parsed_arguments)

# Events made from a result record alone carry tokens before any real entry's.
_RECORD_ENTRY = "0-0"


class FollowSession:
    """The state of one follow, shared by the sync and asyncio readers: where the chunk stream was read up
    to, and what each answer from Redis means. A reader loops: XREAD the stream from ``cursor``, ``read`` the
    answer; when ``needs_record``, GET the result key and hand it to ``record``; until ``done``."""

    def __init__(self, request_id: str, keys: Keys, *, after: str | None, wait: float | None, limits: Limits,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.request_id = validate_request_id(request_id)
        self.key = keys.chunks(request_id)
        self.result_key = keys.result(request_id)
        self.cursor = "0-0"
        self.done = False
        self._fold = LiveFold(request_id, limits)
        self._after = None if after is None else parse_token(after)
        self._clock = clock
        self._deadline = None if wait is None else clock() + wait
        self._record_head: dict[str, Any] | None = None

    def read(self, reply: Any) -> list[LiveEvent]:
        """The events of one XREAD answer that the follower has not seen."""
        events: list[LiveEvent] = []
        for _, entries in reply or ():
            for entry_id, fields in entries:
                self.cursor = entry_id.decode()
                events += (event for event in self._fold.feed(self.cursor, fields) if self._wanted(event.token))
                if self._fold.closed:
                    return events
        return events

    @property
    def closed(self) -> bool:
        """The stream's final entry was read: the record is there to be fetched."""
        return self._fold.closed

    def head(self) -> dict[str, Any]:
        """The completion's id, created and model as the upstream named them so far (from the record when
        the events came from it)."""
        return self._fold.head() if self._record_head is None else self._record_head

    def needs_record(self, reply: Any) -> bool:
        """Whether the result record is needed now: the stream's final entry was read, or there is no stream
        (not started yet, or its chunks expired)."""
        return self._fold.closed or (not reply and self.cursor == "0-0")

    def record(self, raw: bytes | None) -> list[LiveEvent]:
        """The last events, given the stored result record (None when there is none)."""
        if raw is None:
            if self._fold.closed:  # the final entry and the record are written in one step; only a TTL parts them
                raise ResultTimeout(f"the result of {self.request_id} expired before it could be read")
            if self._deadline is not None and self._clock() >= self._deadline:
                raise ResultTimeout(f"request {self.request_id} has not started")
            return []
        self.done = True
        record = contract.decode_record(raw)
        if self._fold.closed:
            final = self._fold.final(record)
            return [final] if self._wanted(final.token) else []
        # The chunks are gone: one piece of each text and call, then Final. A follower that resumes from a
        # token of the live stream cannot be told what it missed, so it gets the Final event only.
        completion = record.get("completion") or {}
        self._record_head = {"id": completion.get("id") or "", "created": completion.get("created") or 0,
                             "model": completion.get("model") or ""}
        events = record_events(record)
        if self._after is not None and self._after[:2] != (0, 0):
            return events[-1:]
        return [event for event in events if self._wanted(event.token)] or events[-1:]

    def _wanted(self, token: str) -> bool:
        return self._after is None or parse_token(token) > self._after


def follow(request_id: str, *, after: str | None = None, wait: float | None = None,
           client: redis.Redis | None = None, settings: Settings | None = None) -> Iterator[LiveEvent]:
    """Yield a request's events as they happen, ending with ``Final``; see the module docstring.

    Raises ResultTimeout when a request that has not started is waited for longer than ``wait`` seconds,
    ValueError for a token that is not one, RedisUnavailable / RedisRefused when Redis fails.
    """
    with connected(client, settings) as (client, settings):
        session = FollowSession(request_id, settings.keys, after=after, wait=wait, limits=Limits.from_settings(settings))
        r: Any = client
        while not session.done:
            with redis_errors(f"following request {request_id}"):
                reply = r.xread({session.key: session.cursor}, count=settings.read_count, block=settings.block_ms)
                events = session.read(reply)
                if session.needs_record(reply):
                    events += session.record(r.get(session.result_key))
            yield from events


async def afollow(request_id: str, *, after: str | None = None, wait: float | None = None,
                  client: redis.asyncio.Redis | None = None,
                  settings: Settings | None = None) -> AsyncIterator[LiveEvent]:
    """The asyncio twin of ``follow``: the same events, from a ``redis.asyncio`` client (made from the
    settings, and closed afterwards, when none is given)."""
    settings = load_settings() if settings is None else settings
    r: Any = connect_async(settings) if client is None else client
    try:
        session = FollowSession(request_id, settings.keys, after=after, wait=wait, limits=Limits.from_settings(settings))
        while not session.done:
            with redis_errors(f"following request {request_id}"):
                reply = await r.xread({session.key: session.cursor}, count=settings.read_count,
                                      block=settings.block_ms)
                events = session.read(reply)
                if session.needs_record(reply):
                    events += session.record(await r.get(session.result_key))
            for event in events:
                yield event
    finally:
        if client is None:
            await r.aclose()


def record_events(record: dict[str, Any]) -> list[LiveEvent]:
    """The events a follower would have seen of a finished request, made from its record alone: each text
    and each call's arguments in one piece. The last one is Final."""
    events: list[LiveEvent] = []

    def token() -> str:
        return f"{_RECORD_ENTRY}.{len(events)}"

    for choice in record.get("completion", {}).get("choices") or []:
        index, message = choice.get("index", 0), choice.get("message") or {}
        for name in ("reasoning_content", "reasoning", "content", "refusal"):
            if isinstance(message.get(name), str):
                events.append(TextDelta(token(), index, name, message[name]))
        for position, call in enumerate(message.get("tool_calls") or []):
            function = call.get("function") or {}
            name, arguments = function.get("name") or "", function.get("arguments") or ""
            events.append(ToolCallStarted(token(), index, position, call.get("id"), name))
            if arguments:
                events.append(ToolCallArguments(token(), index, position, arguments))
            events.append(ToolCallDone(token(), index, position, call.get("id"), name, arguments,
                                       parsed_arguments(arguments)))
        if choice.get("finish_reason"):
            events.append(ChoiceFinished(token(), index, choice["finish_reason"]))
    usage = record.get("completion", {}).get("usage")
    if usage:
        events.append(UsageReported(token(), usage))
    events.append(Final(token(), record))
    return events


__all__ = ["FollowSession", "afollow", "follow", "record_events"]
