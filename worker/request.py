"""One in-flight request on a worker: its chunk-stream envelopes in, one result record and usage event out.

Pure like the Assembler it wraps: no Redis, no clock (the caller passes the time in), no logging. It decides
what each envelope means - which attempt to assemble, which chunks are duplicates, when the request has
ended - and, at the end, builds what the finish step publishes.

Attempts: ``att`` numbers upstream retries. Only the latest attempt is assembled, never a mix: an envelope
of a higher attempt starts the assembly over, one of a lower attempt is dropped. Within an attempt a chunk
whose ``seq`` was already seen is a producer-side duplicate and is dropped; a ``seq`` that skips ahead is
applied with a warning, since the missing chunks will not come back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from streamfold.contract import (ErrorInfo, Fields, Format, Mode, ResultRecord, Start, UsageEvent,
                                 decode_envelope, decode_error, decode_start)
from streamfold.errors import ChunkError, ContractError
from worker.assembler import Assembler
from worker.dialects import native_usage


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A chunk-stream entry the worker could not use, kept with the reason for someone to look at."""

    entry_id: str
    reason: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Outcome:
    """What finishing a request publishes."""

    record: ResultRecord
    usage: UsageEvent
    dead_letter: DeadLetter | None


class RequestState:
    """A request this worker has claimed: where its chunk stream was read up to, and its assembly so far.

    ``entries`` are the control-stream entries that handed it out (normally one; a producer that retried
    its start transaction may have written two), all acknowledged by the finish. ``ended`` turns true on an
    end or error envelope, on an entry that cannot be used, or when the request stalls; then it is ready to
    be finished and later entries are ignored.
    """

    def __init__(self, request_id: str, entry_id: str, now: float) -> None:
        self.request_id = request_id
        self.entries = [entry_id]
        self.cursor = "0-0"
        self.claimed_at = now
        self.last_activity = now
        self.ended = False
        self._meta: dict[str, Any] = {}
        self._mode: Mode = "auto"
        self._format: Format | None = None
        self._assembler: Assembler | None = None
        self._attempt = -1
        self._attempts: set[int] = set()
        self._last_seq = -1
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
            if envelope.kind == "start":
                self._start(decode_start(envelope), envelope.ts_ms)
            elif not self._enter_attempt(envelope.attempt):
                self._duplicates += 1
            elif envelope.kind == "chunk":
                self._chunk(entry_id, envelope.seq, envelope.payload, envelope.ts_ms)
            elif envelope.kind == "error":
                self._assembly().fail(dict(decode_error(envelope)))
                self._end(envelope.ts_ms)
            else:
                self._end(envelope.ts_ms)
        except ContractError as exc:
            self._reject(entry_id, "invalid_envelope", str(exc), fields.get(b"d", b""))
        return self.ended

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
        """The result record, usage event and dead letter this request finishes with."""
        try:
            record = self._assembly().result(self.request_id, self._meta)
        except Exception as exc:  # noqa: BLE001  (as in _chunk: one request's fault stays its own)
            self._assembler = Assembler(self._mode, self._format)
            self._assembler.fail(dict(ErrorInfo(message=f"could not build the result: {type(exc).__name__}: {exc}",
                                                type="assembler_error", status=None, code=None)))
            record = self._assembler.result(self.request_id, self._meta)
        if self._stalled and record["status"] != "failed":
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
        return Outcome(record, usage_event(record, finished_at_ms), self._dead)

    # --- envelopes -------------------------------------------------------------------------------------

    def _start(self, start: Start, ts_ms: int) -> None:
        if self._start_ts is not None:
            return  # a start written twice by a producer that retried its start transaction
        self._meta, self._mode, self._format, self._start_ts = start.meta, start.mode, start.format, ts_ms
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
            self._attempt, self._last_seq = attempt, -1
            self._assembler, self._first_chunk_ts = None, None
        return True

    def _chunk(self, entry_id: str, seq: int, payload: bytes, ts_ms: int) -> None:
        if seq <= self._last_seq:
            self._duplicates += 1
            return
        if seq > self._last_seq + 1:
            self._warnings.append(f"attempt {self._attempt}: chunks {self._last_seq + 1}..{seq - 1} missing")
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

    def _end(self, ts_ms: int) -> None:
        self.ended = True
        self._end_ts = ts_ms

    def _reject(self, entry_id: str, error_type: str, reason: str, payload: bytes) -> None:
        """A poison entry: dead-letter it and fail the request, keeping the output assembled so far."""
        self._dead = DeadLetter(entry_id, reason, payload)
        error = ErrorInfo(message=f"entry {entry_id} rejected: {reason}", type=error_type, status=None, code=None)
        self._assembly().fail(dict(error))
        self.ended = True

    def _assembly(self) -> Assembler:
        if self._assembler is None:
            self._assembler = Assembler(self._mode, self._format)
        return self._assembler


def usage_event(record: ResultRecord, finished_at_ms: int) -> UsageEvent:
    """The analytics view of a finished request: the same normalized counts for every dialect.

    The counts come from the completion's chat-shaped usage (see ``UsageEvent``); ``usage`` is the provider's
    own usage object, verbatim: the chat usage itself for chat chunks, else the native object's.
    """
    completion, metrics, error = record["completion"], record["metrics"], record["error"]
    usage = completion.get("usage")
    tokens = usage if isinstance(usage, dict) else {}
    format = record["format"]
    provider_usage = usage if format == "chat" else native_usage(format, record["native"])
    return UsageEvent(
        request_id=record["request_id"], status=record["status"], format=format,
        model=completion.get("model") or None, prompt_tokens=_count(tokens.get("prompt_tokens")),
        completion_tokens=_count(tokens.get("completion_tokens")), total_tokens=_count(tokens.get("total_tokens")),
        prompt_tokens_details=_details(tokens.get("prompt_tokens_details")),
        completion_tokens_details=_details(tokens.get("completion_tokens_details")),
        usage=provider_usage if isinstance(provider_usage, dict) else None,
        latency_ms=metrics.get("duration_ms"), ttft_ms=metrics.get("ttft_ms"), chunks=metrics["chunks"],
        error_type=error.get("type") if error else None, meta=record["meta"], finished_at_ms=finished_at_ms,
    )


def _details(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _elapsed(since: int | None, until: int | None) -> int | None:
    return None if since is None or until is None else until - since
