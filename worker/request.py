"""One in-flight request on a worker: its chunk-stream envelopes in, one result record and usage event out.

Pure like the Assembler it wraps: no Redis, no clock (the caller passes the time in), no logging. It decides
what each envelope means - which attempt to assemble, which chunks are duplicates, when the request has
ended - and, at the end, builds what the finish step publishes.

Attempts: ``att`` numbers upstream retries. Only the latest attempt is assembled, never a mix: an envelope
of a higher attempt starts the assembly over, one of a lower attempt is dropped. Within an attempt a chunk
whose ``seq`` was already seen is a producer-side duplicate and is dropped; a ``seq`` that skips ahead is
applied, since the missing chunks will not come back, but the request can then end ``incomplete`` at best.

Fault isolation: nothing a producer writes can make ``feed`` or ``outcome`` raise. A bad entry, a limit
crossed (``worker.limits``) or a fault inside the assembler fails this request alone, and ``outcome``
always returns a record that encodes - the finish step batches requests, so one that could not be encoded
would take every request finishing beside it down with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from streamfold.contract import (ErrorInfo, Fields, Format, Mode, ResultRecord, Start, UsageEvent,
                                 decode_envelope, decode_error, decode_start, encode_record)
from streamfold.errors import ChunkError, ContractError
from streamfold.genai import usage_attributes
from worker.assembler import Assembler
from worker.dialects import native_usage
from worker.limits import Limits
from worker.pricing import PriceBook

# A dead letter keeps this much of a rejected payload: enough to see what it was, never a copy of a huge one.
DEAD_LETTER_PAYLOAD_BYTES = 65_536


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A chunk-stream entry the worker could not use, kept with the reason for someone to look at."""

    entry_id: str
    reason: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Outcome:
    """What finishing a request publishes: the record and usage event, and both as encoded."""

    record: ResultRecord
    usage: UsageEvent
    dead_letter: DeadLetter | None
    encoded_record: bytes
    encoded_usage: bytes
    token: str | None = None


class RequestState:
    """A request this worker has claimed: where its chunk stream was read up to, and its assembly so far.

    ``entries`` are the control-stream entries that handed it out (normally one; a producer that retried
    its start transaction may have written two), all acknowledged by the finish. ``ended`` turns true on an
    end or error envelope, on an entry that cannot be used, or when the request stalls; then it is ready to
    be finished and later entries are ignored.
    """

    def __init__(self, request_id: str, entry_id: str, now: float, limits: Limits = Limits(),
                 prices: PriceBook | None = None) -> None:
        self.request_id = request_id
        self.entries = [entry_id]
        self.cursor = "0-0"
        self.claimed_at = now
        self.last_activity = now
        self.ended = False
        self._limits = limits
        self._prices = prices or PriceBook()
        self._call: dict[str, str | None] = {"provider": None, "request_model": None}
        self._meta: dict[str, Any] = {}
        self._mode: Mode = "auto"
        self._format: Format | None = None
        self._token: str | None = None
        self._assembler: Assembler | None = None
        self._attempt = -1
        self._attempts: set[int] = set()
        self._last_seq = -1
        self._gaps = False
        self._attempt_bytes = 0
        self._duplicates = 0
        self._stalled = False
        self._warnings: list[str] = []
        self._dead: DeadLetter | None = None
        self._start_ts: int | None = None
        self._first_chunk_ts: int | None = None
        self._end_ts: int | None = None

    def feed(self, entry_id: str, fields: Fields, now: float) -> bool:
        """Apply one chunk-stream entry read at ``now``; returns ``ended``. Never raises on bad input."""
        self.cursor = entry_id
        self.last_activity = now
        if self.ended:
            return True
        try:
            envelope = decode_envelope(fields)
            if envelope.payload and (problem := self._limits.payload_problem(envelope.payload)) is not None:
                self._reject(entry_id, "limit_exceeded", problem, envelope.payload)
            elif envelope.kind == "start":
                self._start(entry_id, decode_start(envelope), envelope.ts_ms)
            elif envelope.kind == "final":
                self.ended = True  # another worker published this request's result: this finish changes nothing
            elif not self._enter_attempt(envelope.attempt):
                self._duplicates += 1
            elif envelope.kind == "chunk":
                self._chunk(entry_id, envelope.seq, envelope.payload, envelope.ts_ms)
            elif envelope.kind == "error":
                self._assembly().fail(dict(decode_error(envelope)))
                self._end(envelope.ts_ms)
            else:
                self._end(envelope.ts_ms, chunks=envelope.chunks)
        except ContractError as exc:
            self._reject(entry_id, "invalid_envelope", str(exc), fields.get(b"d", b""))
        except Exception as exc:  # noqa: BLE001  (one request's fault stays its own; see the module docstring)
            self._reject(entry_id, "worker_error", f"{type(exc).__name__}: {exc}", fields.get(b"d", b""))
        return self.ended

    @property
    def assembler(self) -> Assembler | None:
        """The assembly of the attempt being followed; a new object whenever a newer attempt starts over."""
        return self._assembler

    @property
    def attempt(self) -> int:
        """The upstream attempt being assembled (-1 before any)."""
        return self._attempt

    @property
    def mode(self) -> Mode:
        return self._mode

    def refuse(self, problem: str) -> None:
        """End the request failed because Redis will not serve its chunk stream (a key of another type)."""
        if not self.ended:
            self._reject(self.cursor, "invalid_stream", problem, b"")

    def stall_deadline(self, stall_timeout: float) -> float:
        return self.last_activity + stall_timeout

    def check_stall(self, now: float, stall_timeout: float) -> bool:
        """End the request if nothing arrived for ``stall_timeout`` seconds; True if it stalled just now."""
        if self.ended or now < self.stall_deadline(stall_timeout):
            return False
        self._stalled = True
        self.ended = True
        self._warnings.append(f"stalled: no new entry for {stall_timeout:g} s; finished without an end marker")
        return True

    def outcome(self, finished_at_ms: int) -> Outcome:
        """The result record, usage event and dead letter this request finishes with, encoded. Never raises:
        a record that cannot be built or encoded is replaced by a failed one that says why."""
        try:
            return self._encoded(self._record(finished_at_ms), finished_at_ms)
        except Exception as exc:  # noqa: BLE001  (one request's fault stays its own)
            error = ErrorInfo(message=f"could not build the result record: {type(exc).__name__}: {exc}",
                              type="worker_error", status=None, code=None)
            return self._encoded(self._failed_record(error, finished_at_ms), finished_at_ms)

    def _record(self, finished_at_ms: int) -> ResultRecord:
        record = self._assembly().result(self.request_id, self._meta)
        if (self._stalled or self._gaps) and record["status"] == "completed":
            record["status"] = "incomplete"
        record["warnings"] = self._warnings + record["warnings"]
        start, end = self._start_ts, self._end_ts
        record["metrics"].update(
            duplicates=self._duplicates,
            attempts=len(self._attempts),
            ttft_ms=_elapsed(start, self._first_chunk_ts),
            duration_ms=_elapsed(start, end),
            finish_lag_ms=_elapsed(end, finished_at_ms),
        )
        return record

    def _failed_record(self, error: ErrorInfo, finished_at_ms: int) -> ResultRecord:
        """A record built from nothing the producer sent but the request id and, if it encodes, the meta."""
        assembler = Assembler(self._mode, self._format)
        assembler.fail(dict(error))
        try:
            encode_record(self._meta)
            meta = self._meta
        except TypeError:
            meta = {}
        record = assembler.result(self.request_id, meta)
        record["metrics"].update(duplicates=self._duplicates, attempts=len(self._attempts), ttft_ms=None,
                                 duration_ms=None, finish_lag_ms=_elapsed(self._end_ts, finished_at_ms))
        return record

    def _encoded(self, record: ResultRecord, finished_at_ms: int) -> Outcome:
        usage = usage_event(record, finished_at_ms, prices=self._prices, **self._call)
        return Outcome(record, usage, self._dead, encode_record(record), encode_record(usage), self._token)

    # --- envelopes -------------------------------------------------------------------------------------

    def _start(self, entry_id: str, start: Start, ts_ms: int) -> None:
        if self._start_ts is not None:
            if start.token is not None and self._token is not None and start.token != self._token:
                self._reject(entry_id, "request_id_reused", "a second producer started this request id while the "
                             "first one's stream was open; their chunks cannot be told apart", b"")
            return  # the same producer again: a retried start, or a re-run of the same request
        self._meta, self._mode, self._token, self._start_ts = start.meta, start.mode, start.token, ts_ms
        self._format = start.format
        self._call = {"provider": start.provider, "request_model": start.request_model}
        if self._assembler is not None:
            self._warnings.append("chunks arrived before the start envelope")

    def _enter_attempt(self, attempt: int) -> bool:
        """Follow ``attempt`` if it is the current or a newer one; False for an envelope of an older attempt."""
        if attempt < self._attempt:
            return False
        self._attempts.add(attempt)
        if attempt > self._attempt:
            if self._assembler is not None and self._assembler.chunks:
                self._warnings.append(f"attempt {attempt} replaced attempt {self._attempt} "
                                      f"after {self._assembler.chunks} chunks")
            self._attempt, self._last_seq, self._gaps, self._attempt_bytes = attempt, -1, False, 0
            self._assembler, self._first_chunk_ts = None, None
        return True

    def _chunk(self, entry_id: str, seq: int, payload: bytes, ts_ms: int) -> None:
        if seq <= self._last_seq:
            self._duplicates += 1
            return
        if seq >= self._limits.chunks:
            self._reject(entry_id, "limit_exceeded", f"chunk seq {seq} reaches STREAMFOLD_MAX_CHUNKS="
                         f"{self._limits.chunks}", payload)
            return
        self._attempt_bytes += len(payload)
        if self._attempt_bytes > self._limits.request_bytes:
            self._reject(entry_id, "limit_exceeded", f"attempt {self._attempt} holds more than "
                         f"STREAMFOLD_MAX_REQUEST_BYTES={self._limits.request_bytes} bytes of chunks", payload)
            return
        if seq > self._last_seq + 1:
            self._missing(seq)
        self._last_seq = seq
        try:
            self._assembly().feed(payload)
        except ChunkError as exc:
            self._reject(entry_id, "invalid_chunk", f"seq {seq}: {exc.reason}", payload)
            return
        except Exception as exc:  # noqa: BLE001
            # A chunk that trips a fault in the assembler must not take the worker down: recovered by
            # peer after peer, it would stop the whole pool one worker at a time.
            self._reject(entry_id, "assembler_error", f"seq {seq}: {type(exc).__name__}: {exc}", payload)
            return
        if self._first_chunk_ts is None:
            self._first_chunk_ts = ts_ms

    def _end(self, ts_ms: int, *, chunks: int | None = None) -> None:
        if chunks is not None and chunks > self._last_seq + 1:
            self._missing(chunks)  # the attempt's last chunks never came: a gap, only at the end
        self.ended = True
        self._end_ts = ts_ms

    def _missing(self, upto: int) -> None:
        """The attempt's chunks after the last one seen and before ``upto`` are lost: the output cannot be whole."""
        self._gaps = True
        self._warnings.append(f"attempt {self._attempt}: chunks {self._last_seq + 1}..{upto - 1} missing; "
                              "the output cannot be complete")

    def _reject(self, entry_id: str, error_type: str, reason: str, payload: bytes) -> None:
        """A poison entry: dead-letter it and fail the request, keeping the output assembled so far."""
        self._dead = DeadLetter(entry_id, reason, payload[:DEAD_LETTER_PAYLOAD_BYTES])
        error = ErrorInfo(message=f"entry {entry_id} rejected: {reason}", type=error_type, status=None, code=None)
        self._assembly().fail(dict(error))
        self.ended = True

    def _assembly(self) -> Assembler:
        if self._assembler is None:
            self._assembler = Assembler(self._mode, self._format)
        return self._assembler


def usage_event(record: ResultRecord, finished_at_ms: int, *, provider: str | None = None,
                request_model: str | None = None, prices: PriceBook | None = None) -> UsageEvent:
    """The analytics view of a finished request: the same normalized counts for every dialect, its cost, and
    the OpenTelemetry GenAI attributes.

    The counts come from the completion's chat-shaped usage (see ``UsageEvent``); ``usage`` is the provider's
    own usage object, verbatim: the chat usage itself for chat chunks, else the native object's.
    """
    completion, metrics, error = record["completion"], record["metrics"], record["error"]
    usage = completion.get("usage")
    tokens = usage if isinstance(usage, dict) else {}
    format = record["format"]
    provider_usage = usage if format == "chat" else native_usage(format, record["native"])
    model = completion.get("model") or None
    cost, cost_reason = (prices or PriceBook()).cost(provider, model, tokens or None)
    error_type = error.get("type") if error else None
    ttft_ms = metrics.get("ttft_ms")
    event = UsageEvent(
        request_id=record["request_id"], status=record["status"], format=format, provider=provider,
        request_model=request_model, model=model, prompt_tokens=_count(tokens.get("prompt_tokens")),
        completion_tokens=_count(tokens.get("completion_tokens")), total_tokens=_count(tokens.get("total_tokens")),
        prompt_tokens_details=_details(tokens.get("prompt_tokens_details")),
        completion_tokens_details=_details(tokens.get("completion_tokens_details")),
        usage=provider_usage if isinstance(provider_usage, dict) else None, cost=dict(cost) if cost else None,
        cost_reason=cost_reason, latency_ms=metrics.get("duration_ms"), ttft_ms=ttft_ms, chunks=metrics["chunks"],
        error_type=error_type, meta=record["meta"], finished_at_ms=finished_at_ms,
    )
    event.update(usage_attributes(  # type: ignore[typeddict-item]
        provider=provider, request_model=request_model, completion=completion,
        ttft_s=None if ttft_ms is None else ttft_ms / 1000, error_type=error_type))
    return event


def _details(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _elapsed(since: int | None, until: int | None) -> int | None:
    return None if since is None or until is None else until - since
