"""The wire contract between producers, workers, backends and analytics, defined once.

A request's chunk stream holds *envelopes*, flat Redis stream entries::

    k=start  att=<n> ts=<ms> d=<json {"meta": {...}, "mode": "auto|incremental|cumulative", "format": ...}>
    k=chunk  att=<n> ts=<ms> seq=<n> d=<the raw chunk payload, byte for byte as received>
    k=end    att=<n> ts=<ms>
    k=error  att=<n> ts=<ms> d=<json {"message": ..., "type": ..., "status": ..., "code": ...}>

``format`` (optional; absent means "recognise it from the stream") names the dialect of the chunks:
``chat`` (OpenAI-compatible chat.completion.chunk), ``anthropic`` (Messages events), ``responses`` (OpenAI
Responses events) or ``gemini`` (GenerateContentResponse chunks). ``att`` is the upstream attempt: a retry after chunks were pushed starts attempt n+1, and a worker assembles
only the latest attempt. ``seq`` numbers chunks within an attempt from 0; a repeated (att, seq) is a
duplicate from a producer retry and is dropped.

The control stream gets one entry per request, ``rid=<request id> ts=<ms>``, written in the same
transaction as the start envelope. Workers publish result records and usage events as ``d=<json>``
entries (with ``rid``), shaped by ``ResultRecord`` and ``UsageEvent`` below.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypedDict, cast, get_args

import orjson

from streamfold.errors import ContractError

Kind = Literal["start", "chunk", "end", "error"]
Mode = Literal["auto", "incremental", "cumulative"]
Status = Literal["completed", "incomplete", "failed"]
# The stream dialects a worker assembles; worker/dialects/ has one module per name.
Format = Literal["chat", "anthropic", "responses", "gemini"]
MODES: tuple[str, ...] = get_args(Mode)
FORMATS: tuple[str, ...] = get_args(Format)
KINDS: tuple[str, ...] = get_args(Kind)

Fields = dict[bytes, bytes]


@dataclass(frozen=True, slots=True)
class Envelope:
    """One decoded entry of a request's chunk stream."""

    kind: Kind
    attempt: int
    ts_ms: int
    seq: int = -1
    payload: bytes = b""


@dataclass(frozen=True, slots=True)
class Start:
    """What a start envelope carries: request metadata, the output mode and the dialect of the upstream.

    ``format`` None: the worker recognises the dialect from the stream's first chunk.
    """

    meta: dict[str, Any]
    mode: Mode
    format: Format | None = None


class ErrorInfo(TypedDict, total=False):
    message: str
    type: str
    status: int | None
    code: str | None


class ResultRecord(TypedDict):
    """One per request. ``completion`` is exactly what the non-streaming call would have returned.

    ``completion`` is a chat.completion whatever the dialect; ``native`` is the final object as the
    dialect's own API returns it without streaming (Anthropic ``Message``, Responses ``Response``, Gemini
    ``GenerateContentResponse``), or None for chat chunks, whose native object is ``completion`` itself.
    """

    request_id: str
    status: Status
    format: Format
    completion: dict[str, Any]
    native: dict[str, Any] | None
    error: ErrorInfo | None
    warnings: list[str]
    metrics: dict[str, Any]
    meta: dict[str, Any]


class UsageEvent(TypedDict):
    """One per request, for analytics. Token counts are the upstream's own, never summed.

    The counts are in the chat shape for every dialect, so analytics needs no per-provider code:
    ``prompt_tokens`` includes cached input (Anthropic's cache reads and writes, which it reports apart from
    ``input_tokens``, are added in), with the split in ``prompt_tokens_details``; ``completion_tokens``
    includes reasoning, with ``completion_tokens_details.reasoning_tokens``. ``usage`` is the provider's own
    usage object, verbatim (a chat usage, Anthropic ``usage``, Responses ``usage``, Gemini ``usageMetadata``).

    Times come from the producer's envelope timestamps: ``latency_ms`` from the start envelope to the end or
    error envelope, ``ttft_ms`` from the start to the first chunk of the attempt assembled; None when the
    stream never got that far.
    """

    request_id: str
    status: Status
    format: Format
    model: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    prompt_tokens_details: dict[str, Any] | None
    completion_tokens_details: dict[str, Any] | None
    usage: dict[str, Any] | None
    latency_ms: float | None
    ttft_ms: float | None
    chunks: int
    error_type: str | None
    meta: dict[str, Any]
    finished_at_ms: int


# --- envelopes ------------------------------------------------------------------------------------------

def encode_start(meta: dict[str, Any], mode: Mode, *, attempt: int, ts_ms: int,
                 format: Format | None = None) -> dict[str, bytes]:
    if mode not in MODES:
        raise ContractError(f"unknown output mode {mode!r}; expected one of {', '.join(MODES)}")
    body: dict[str, Any] = {"meta": meta, "mode": mode}
    if format is not None:
        if format not in FORMATS:
            raise ContractError(f"unknown stream format {format!r}; expected one of {', '.join(FORMATS)}")
        body["format"] = format
    return {"k": b"start", "att": b"%d" % attempt, "ts": b"%d" % ts_ms, "d": orjson.dumps(body)}


def encode_chunk(raw: bytes, *, seq: int, attempt: int, ts_ms: int) -> dict[str, bytes]:
    return {"k": b"chunk", "att": b"%d" % attempt, "ts": b"%d" % ts_ms, "seq": b"%d" % seq, "d": raw}


def encode_end(*, attempt: int, ts_ms: int) -> dict[str, bytes]:
    return {"k": b"end", "att": b"%d" % attempt, "ts": b"%d" % ts_ms}


def encode_error(error: ErrorInfo, *, attempt: int, ts_ms: int) -> dict[str, bytes]:
    return {"k": b"error", "att": b"%d" % attempt, "ts": b"%d" % ts_ms, "d": orjson.dumps(error)}


def encode_control(request_id: str, *, ts: bytes) -> dict[str, bytes]:
    """The control-stream entry that hands a request to the worker group; ``ts`` is its start envelope's."""
    return {"rid": request_id.encode(), "ts": ts}


def decode_envelope(fields: Fields) -> Envelope:
    """Decode one chunk-stream entry; raises ContractError for anything that is not an envelope."""
    try:
        kind = fields[b"k"].decode()
        attempt = int(fields[b"att"])
        ts_ms = int(fields[b"ts"])
        seq = int(fields[b"seq"]) if kind == "chunk" else -1
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        raise ContractError(f"not an envelope: {fields!r:.200}") from exc
    if kind not in KINDS:
        raise ContractError(f"unknown envelope kind {kind!r}")
    return Envelope(cast(Kind, kind), attempt, ts_ms, seq, fields.get(b"d", b""))


def decode_start(envelope: Envelope) -> Start:
    body = _load_object(envelope.payload, "start envelope")
    meta, mode, format = body.get("meta") or {}, body.get("mode", "auto"), body.get("format")
    if not isinstance(meta, dict) or mode not in MODES or (format is not None and format not in FORMATS):
        raise ContractError(f"bad start envelope: {body!r:.200}")
    return Start(meta, cast(Mode, mode), cast("Format | None", format))


def decode_error(envelope: Envelope) -> ErrorInfo:
    body = _load_object(envelope.payload, "error envelope")
    return ErrorInfo(message=str(body.get("message", "upstream error")), type=str(body.get("type", "upstream_error")),
                     status=body.get("status"), code=body.get("code"))


def error_info(error: str | Mapping[str, Any] | BaseException) -> ErrorInfo:
    """Normalise an upstream failure, however a producer holds it, into an error envelope's body.

    A str is the message. A mapping is the body itself or an OpenAI-style ``{"error": {...}}`` wrapper. An
    exception gives its message and, when it has them, ``type``, ``status``/``status_code`` and ``code``
    attributes (OpenAI SDK errors, ``UpstreamError``); its class name is the type otherwise.
    """
    if isinstance(error, str):
        body: Mapping[str, Any] = {"message": error}
    elif isinstance(error, BaseException):
        body = {"message": str(error) or type(error).__name__,
                "type": getattr(error, "type", None) or type(error).__name__,
                "status": getattr(error, "status", None) or getattr(error, "status_code", None),
                "code": getattr(error, "code", None)}
    elif isinstance(error, Mapping):
        inner = error.get("error")
        if isinstance(inner, Mapping):
            body = inner
        elif isinstance(inner, str):
            body = {**error, "message": error.get("message") or inner}
        else:
            body = error
    else:
        raise ContractError(f"cannot read an upstream error from {type(error).__name__}")
    status, code = body.get("status", body.get("status_code")), body.get("code")
    return ErrorInfo(message=str(body.get("message") or "upstream error"),
                     type=str(body.get("type") or "upstream_error"),
                     status=status if isinstance(status, int) and not isinstance(status, bool) else None,
                     code=None if code is None else str(code))


# --- records --------------------------------------------------------------------------------------------

def encode_record(record: ResultRecord | UsageEvent | dict[str, Any]) -> bytes:
    return orjson.dumps(record)


def decode_record(raw: bytes | str) -> dict[str, Any]:
    return _load_object(raw, "record")


def _load_object(raw: bytes | str, what: str) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ContractError(f"{what} is not JSON: {raw!r:.200}") from exc
    if not isinstance(body, dict):
        raise ContractError(f"{what} is not a JSON object: {raw!r:.200}")
    return body


# --- output stream entries -------------------------------------------------------------------------------
# results stream:  rid=<request id> d=<ResultRecord json>
# usage stream:    rid=<request id> d=<UsageEvent json>
# dead letters:    rid=<request id> entry=<chunk-stream entry id> reason=<text> d=<the rejected raw payload>
# notify channel:  the message is the record's status, published once when the result becomes readable.
RID = b"rid"
DATA = b"d"
