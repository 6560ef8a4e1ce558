"""Replay captured streams through a Publisher, exactly as a live producer would have pushed them.

A capture (JSON Lines or SSE text, read by ``streamfold.capture``) becomes one request: start, every chunk
byte for byte, then the capture's own ending - ``[DONE]`` ends it, an ``event: error`` fails it - or an end
when the capture just stops. Used for load tests, demos and reproducing a provider's stream on demand.
"""

from __future__ import annotations

import logging
import secrets
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path


from producer.publisher import Publisher, new_request_id
from streamfold.capture import CapturedItem, read_capture
from streamfold.contract import Mode
from streamfold.errors import RedisUnavailable
from streamfold.logs import EventLog

log = logging.getLogger("streamfold.replay")

STDIN = "-"


def replay(publisher: Publisher, files: Sequence[str | Path], *, copies: int = 1, rate: float | None = None,
           mode: Mode = "auto", patience: float = 0.0, open_at_once: int = 1) -> list[str]:
    """Push ``copies`` requests per capture file and return their ids, in input order.

    ``-`` reads a capture from stdin. Every file is read before anything is pushed, so a missing file
    pushes nothing. ``rate`` paces pushes at that many chunks per second overall; buffered entries are sent
    before each pause, so workers see the stream arrive as a live one would. ``open_at_once`` requests stream
    at the same time, their items interleaved one by one, as concurrent upstream calls would arrive (one at a
    time by default: each request ends before the next starts).

    With ``patience``, a request whose writes meet a Redis that cannot serve for now (a failover under way) is
    pushed again whole, as a new attempt, once Redis serves again; RedisUnavailable only after ``patience``
    seconds of it. Without, at once. Requests streamed at once are not pushed again: RedisUnavailable at once.
    """
    if copies < 1:
        raise ValueError(f"copies must be at least 1, got {copies}")
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if open_at_once < 1:
        raise ValueError(f"open must be at least 1, got {open_at_once}")
    captures = [(_source_name(file), _read(file)) for file in files]
    pacer = _Pacer(publisher, rate)
    request_ids: list[str] = []
    if open_at_once == 1:
        for source, items in captures:
            for _ in range(copies):
                request_id = new_request_id()
                _push_patiently(publisher, request_id, source, items, mode, pacer, patience)
                request_ids.append(request_id)
        publisher.flush()
        return request_ids
    waiting = deque((source, items) for source, items in captures for _ in range(copies))
    streaming: deque[tuple[str, Iterator[CapturedItem]]] = deque()
    while waiting or streaming:
        while waiting and len(streaming) < open_at_once:
            source, items = waiting.popleft()
            request_id = new_request_id()
            publisher.start(request_id, {"source": source}, mode)
            request_ids.append(request_id)
            streaming.append((request_id, iter(items)))
        request_id, rest = streaming.popleft()
        if _push_next(publisher, request_id, rest, pacer):
            streaming.append((request_id, rest))
    publisher.flush()
    return request_ids


def _push_next(publisher: Publisher, request_id: str, items: Iterator[CapturedItem], pacer: _Pacer) -> bool:
    """Push a request's next item; False once it has ended (its own ending, or an end where the capture stops)."""
    item = next(items, None)
    if item is None:
        publisher.end(request_id)
    elif item.kind == "chunk":
        pacer.wait()
        publisher.push(request_id, item.data)
        return True
    elif item.kind == "error":
        publisher.fail(request_id, item.error_body())
    else:
        publisher.end(request_id)
    return False


def _push_patiently(publisher: Publisher, request_id: str, source: str, items: Sequence[CapturedItem], mode: Mode,
                    pacer: _Pacer, patience: float) -> None:
    # Entries of a failed send may or may not have been written (or survived the failover): a new attempt
    # supersedes whatever did, and starting again with the request's own token is the same start.
    deadline, failures, token = time.monotonic() + patience, 0, secrets.token_hex(16)
    while True:
        try:
            publisher.start(request_id, {"source": source}, mode, token=token)
            if failures:
                publisher.new_attempt(request_id)
            _push_capture(publisher, request_id, items, pacer)
            return
        except RedisUnavailable as exc:
            failures += 1
            if time.monotonic() >= deadline:
                raise
            delay = min(2.0, 0.1 * 2 ** min(failures, 5))
            EventLog(log).warning("redis_unavailable", request_id=request_id, error=str(exc), retry_in_s=delay)
            time.sleep(delay)


def _push_capture(publisher: Publisher, request_id: str, items: Sequence[CapturedItem], pacer: _Pacer) -> None:
    for item in items:
        if item.kind == "chunk":
            pacer.wait()
            publisher.push(request_id, item.data)
        elif item.kind == "error":
            publisher.fail(request_id, item.error_body())
            return
        else:
            publisher.end(request_id)
            return
    publisher.end(request_id)


def _source_name(file: str | Path) -> str:
    return "<stdin>" if str(file) == STDIN else Path(file).name


def _read(file: str | Path) -> list[CapturedItem]:
    if str(file) == STDIN:
        return list(read_capture(sys.stdin.buffer))
    with open(file, "rb") as stream:
        return list(read_capture(stream))


class _Pacer:
    """Holds pushes back to ``rate`` chunks per second overall, measured from the first chunk."""

    def __init__(self, publisher: Publisher, rate: float | None) -> None:
        self._publisher = publisher
        self._interval = 1.0 / rate if rate else 0.0
        self._started: float | None = None
        self._count = 0

    def wait(self) -> None:
        if not self._interval:
            return
        now = time.monotonic()
        if self._started is None:
            self._started = now
        due = self._started + self._count * self._interval
        self._count += 1
        if due > now:
            self._publisher.flush()
            time.sleep(max(due - time.monotonic(), 0.0))
