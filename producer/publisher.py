"""Push a request's raw upstream chunks onto Redis Streams, framed as the wire contract's envelopes.

A request is handed to workers iff its start exists: ``start`` writes the start envelope and the control
stream entry in one script on the request's shard slot (producer/lua/start.lua), so a worker never claims
a request without a start, and a start is never left without a claimable control entry. The same script
claims the request id for the producer's token: a request id already in use by another producer is
refused. Chunks, end and error markers are buffered in a pipeline and sent in batches; the chunk stream
keeps them in the order they were pushed.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from types import TracebackType
from typing import Any, cast

import orjson
import redis
from redis.typing import EncodableT, FieldT

from streamfold import contract
from streamfold.connection import redis_errors
from streamfold.contract import Format, Mode, validate_request_id
from streamfold.errors import ContractError
from streamfold.keys import Keys
from streamfold.settings import STREAM_MAX_AGE

DEFAULT_BATCH_SIZE = 500
START_SCRIPT = resources.files("producer").joinpath("lua", "start.lua").read_text()
_IN_USE = 0  # start.lua's answer when another producer owns the request id


def new_request_id() -> str:
    """A fresh request id: a uuid4 in hex, safe in key names and unique without coordination."""
    return uuid.uuid4().hex


def raw_payload(chunk: object) -> bytes:
    """The bytes a chunk is stored as: bytes as they are, str as UTF-8, a dict or a pydantic model as JSON.

    OpenAI SDK chunks are dumped with ``exclude_unset``, which gives back the object the upstream sent,
    extra provider fields included, rather than one padded with ``null`` for every field it lacked.
    """
    if isinstance(chunk, bytes):
        return chunk
    if isinstance(chunk, (bytearray, memoryview)):
        return bytes(chunk)
    if isinstance(chunk, str):
        return chunk.encode()
    try:
        if isinstance(chunk, dict):
            return orjson.dumps(chunk)
        dump_json = getattr(chunk, "model_dump_json", None)
        if callable(dump_json):
            text = dump_json(exclude_unset=True, by_alias=True)
            return text.encode() if isinstance(text, str) else bytes(text)
        dump = getattr(chunk, "model_dump", None)
        if callable(dump):
            return orjson.dumps(dump(mode="json", exclude_unset=True, by_alias=True))
    except (TypeError, ValueError) as exc:
        raise ContractError(f"cannot serialise a {type(chunk).__name__} chunk: {exc}") from exc
    raise ContractError(f"cannot push a {type(chunk).__name__} as a chunk; "
                        "expected bytes, str, dict or a model with model_dump_json()")


def start_arguments(keys: Keys, request_id: str, meta: Mapping[str, Any] | None, mode: Mode, *, token: str,
                    max_age: int, format: Format | None = None, provider: str | None = None,
                    request_model: str | None = None) -> tuple[list[str], list[EncodableT]]:
    """The KEYS and ARGV of producer/lua/start.lua for opening ``request_id``: one definition for every
    publisher, blocking or asynchronous. ContractError for an invalid id, meta, mode or format."""
    validate_request_id(request_id)
    if meta is not None and not isinstance(meta, Mapping):
        raise ContractError(f"request meta must be a mapping, got {type(meta).__name__}")
    start = contract.encode_start(dict(meta or {}), mode, attempt=0, ts_ms=now_ms(), token=token, format=format,
                                  provider=provider, request_model=request_model)
    fields = [part for pair in start.items() for part in pair]
    control = [part for pair in contract.encode_control(request_id, ts=start["ts"]).items() for part in pair]
    script_keys = [keys.owner(request_id), keys.chunks(request_id), keys.requests(keys.shard(request_id))]
    return script_keys, [token, max_age, len(fields), *fields, *control]


def check_started(request_id: str, outcome: object) -> None:
    """Raise ContractError when start.lua answered that another producer owns the request id."""
    if outcome == _IN_USE:
        raise ContractError(f"request id {request_id} is already in use by another producer; "
                            "choose a new one (producer.new_request_id())")


def _counter(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ContractError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def _entry(fields: dict[str, bytes]) -> dict[FieldT, EncodableT]:
    # redis-py types stream fields as an invariant dict of unions; the envelope's dict is one of those.
    return cast("dict[FieldT, EncodableT]", fields)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class _Progress:
    """What this publisher knows of one open request: its chunk stream, its start's producer token, current
    attempt and next seq per attempt."""

    key: str
    token: str | None = None
    attempt: int = 0
    next_seq: dict[int, int] = field(default_factory=dict)


class Publisher:
    """Writes requests onto Redis Streams: ``start``, then ``push`` each raw chunk, then ``end`` or ``fail``.

    Entries are buffered in a pipeline and sent when ``batch_size`` of them are waiting, on ``end``/``fail``/
    ``flush`` and on ``close`` (or leaving a ``with`` block); ``batch_size=1`` sends every push at once, which
    is what a producer streaming live from an upstream wants. Not thread-safe: use one per thread.

    If a send fails with RedisUnavailable, the entries it carried may or may not have been written. Retry
    the request as a new attempt (``new_attempt``): workers assemble only the latest attempt.

    The client must return bytes (``decode_responses=False``, as ``streamfold.connection.connect`` builds it).
    ``max_age`` (``STREAMFOLD_STREAM_MAX_AGE``) bounds how long a chunk stream lives if no worker ever
    finishes its request; the finish cuts it to ``chunk_ttl``.
    """

    def __init__(self, client: redis.Redis, keys: Keys, *, batch_size: int = DEFAULT_BATCH_SIZE,
                 max_age: int = STREAM_MAX_AGE) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self._max_age = max_age
        self._client = client
        self._keys = keys
        self._batch_size = batch_size
        self._pipe = client.pipeline(transaction=False)
        self._start = client.register_script(START_SCRIPT)
        self._buffered = 0
        self._requests: dict[str, _Progress] = {}

    @property
    def buffered(self) -> int:
        """Entries waiting to be sent."""
        return self._buffered

    def start(self, request_id: str, meta: Mapping[str, Any] | None = None, mode: Mode = "auto",
              format: Format | None = None, *, token: str | None = None, provider: str | None = None,
              request_model: str | None = None) -> None:
        """Open a request: claim its id, write its start envelope and its control entry, in one step.

        ``format`` names the chunks' dialect (``chat``, ``anthropic``, ``responses``, ``gemini``); None lets
        the worker recognise it from the first chunk. ``provider`` (a ``gen_ai.provider.name`` such as
        ``openai``, ``anthropic``, ``gcp.gemini``) and ``request_model`` (the model asked for) name the call
        in its usage event and price it.

        ``token`` names the producer that owns the request id (default: one made up for this publisher's
        start). Starting again with the same token is harmless - a retry after a lost reply, a re-run of the
        same job, which passes its job's token - and starting an id that another token owns raises
        ContractError, writing nothing: the id stays claimed for ``max_age`` seconds.
        """
        known = self._requests.get(request_id)
        token = token or (known.token if known is not None and known.token else secrets.token_hex(16))
        script_keys, args = start_arguments(self._keys, request_id, meta, mode, token=token, max_age=self._max_age,
                                            format=format, provider=provider, request_model=request_model)
        with redis_errors(f"starting request {request_id}"):
            check_started(request_id, self._start(keys=script_keys, args=args))
        progress = self._requests.setdefault(request_id, _Progress(self._keys.chunks(request_id)))
        progress.token = token

    def push(self, request_id: str, chunk: object, *, attempt: int | None = None, seq: int | None = None) -> int:
        """Append one raw chunk and return its seq; ``attempt`` defaults to the request's current attempt.

        ``seq`` counts from 0 within each attempt when not given. Pushing a (attempt, seq) again is harmless:
        workers drop the duplicate.
        """
        raw = raw_payload(chunk)
        progress = self._progress(request_id)
        attempt = _counter("attempt", progress.attempt if attempt is None else attempt)
        progress.attempt = max(progress.attempt, attempt)
        next_seq = progress.next_seq.get(attempt, 0)
        seq = _counter("seq", next_seq if seq is None else seq)
        progress.next_seq[attempt] = max(next_seq, seq + 1)
        self._buffer(progress, contract.encode_chunk(raw, seq=seq, attempt=attempt, ts_ms=now_ms()))
        if self._buffered >= self._batch_size:
            self.flush()
        return seq

    def end(self, request_id: str, *, attempt: int | None = None) -> None:
        """Close a request that the upstream finished; sends everything buffered."""
        progress = self._progress(request_id)
        attempt = _counter("attempt", progress.attempt if attempt is None else attempt)
        # The attempt's chunk count, when this publisher pushed them: a worker can then tell lost last chunks.
        self._close(request_id, progress, contract.encode_end(attempt=attempt, ts_ms=now_ms(),
                                                              chunks=progress.next_seq.get(attempt)))

    def fail(self, request_id: str, error: str | Mapping[str, Any] | BaseException, *,
             attempt: int | None = None) -> None:
        """Close a request with an upstream error (message, error body or exception); sends everything buffered."""
        info = contract.error_info(error)
        progress = self._progress(request_id)
        attempt = _counter("attempt", progress.attempt if attempt is None else attempt)
        self._close(request_id, progress, contract.encode_error(info, attempt=attempt, ts_ms=now_ms()))

    def new_attempt(self, request_id: str) -> int:
        """Start over after chunks were pushed (an upstream retry) and return the new attempt number.

        The number follows both what this publisher wrote and what the chunk stream already holds, so a
        retry in another process (a re-run job) still supersedes every earlier attempt.
        """
        progress = self._progress(request_id)
        with redis_errors(f"reading request {request_id}"):
            last = self._client.xrevrange(progress.key, count=1)
        fields = last[0][1] if last else None
        in_stream = int(fields.get(b"att", b"0")) if fields else 0
        progress.attempt = max(progress.attempt, in_stream) + 1
        return progress.attempt

    def pushed(self, request_id: str, attempt: int) -> bool:
        """Whether this publisher pushed any chunk of ``attempt`` of an open request."""
        progress = self._requests.get(request_id)
        return progress is not None and progress.next_seq.get(attempt, 0) > 0

    def flush(self) -> None:
        """Send every buffered entry, in order."""
        if not self._buffered:
            return
        count, self._buffered = self._buffered, 0
        with redis_errors(f"sending {count} buffered entries"):
            try:
                self._pipe.execute()
            finally:
                self._pipe.reset()

    def close(self) -> None:
        """Send what is buffered. The Redis client belongs to the caller and stays open."""
        self.flush()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _progress(self, request_id: str) -> _Progress:
        progress = self._requests.get(request_id)
        if progress is None:
            # Started elsewhere (another process or publisher): continue it from attempt 0, seq 0.
            progress = self._requests[request_id] = _Progress(self._keys.chunks(validate_request_id(request_id)))
        return progress

    def _close(self, request_id: str, progress: _Progress, fields: dict[str, bytes]) -> None:
        """Buffer the end or error envelope, send everything, and forget the request."""
        self._buffer(progress, fields)
        # NX: a finish that already cut the stream's life to chunk_ttl keeps it; a stream recreated by pushes
        # after it expired, or one never started here, gets the safety net.
        self._pipe.expire(progress.key, self._max_age, nx=True)
        self.flush()
        # Forgotten only once sent: a caller that retries after a failed send keeps its attempt.
        del self._requests[request_id]

    def _buffer(self, progress: _Progress, fields: dict[str, bytes]) -> None:
        self._pipe.xadd(progress.key, _entry(fields))
        self._buffered += 1
