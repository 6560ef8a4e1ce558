"""The wire contract between producers, workers, backends and analytics, defined once.

A request's chunk stream holds *envelopes*, flat Redis stream entries::

    k=start  att=<n> ts=<ms> d=<json {"meta": {...}, "mode": "auto|incremental|cumulative", "format": ...,
                                      "token": ...}>
    k=chunk  att=<n> ts=<ms> seq=<n> d=<the raw chunk payload, byte for byte as received>
    k=end    att=<n> ts=<ms>
    k=error  att=<n> ts=<ms> d=<json {"message": ..., "type": ..., "status": ..., "code": ...}>
    k=final  att=0   ts=<ms> d=<status>      written by the worker that published the result, never a producer

``format`` (optional; absent means "recognise it from the stream") names the dialect of the chunks:
``chat`` (OpenAI-compatible chat.completion.chunk), ``anthropic`` (Messages events), ``responses`` (OpenAI
Responses events) or ``gemini`` (GenerateContentResponse chunks). ``att`` is the upstream attempt: a retry
after chunks were pushed starts attempt n+1, and a worker assembles only the latest attempt. ``seq`` numbers chunks within an attempt from 0; a repeated (att, seq) is a
duplicate from a producer retry and is dropped. The ``final`` entry closes the stream for followers: it
follows the result's publication in the same atomic step, so whoever reads it finds the result record.
``att``, ``seq`` and ``ts`` are non-negative integers below 2**63, so every record that carries them can be
encoded. The start's ``token`` names the producer that
owns the request id: a start written again with the same token is a retry or a re-run of the same request,
one with another token is a second request reusing the id, which fails.

A request id is 1 to ``MAX_REQUEST_ID_LENGTH`` characters of valid UTF-8 with no whitespace and no control
characters (``validate_request_id``). It is part of the contract, not a setting: producers, workers and
readers must agree on it without sharing configuration.

The control stream gets one entry per request, ``rid=<request id> ts=<ms>``, written in the same
transaction as the start envelope. Workers publish result records and usage events as ``d=<json>``
entries (with ``rid``), shaped by ``ResultRecord`` and ``UsageEvent`` below.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NotRequired, TypedDict, cast, get_args

import orjson

from streamfold.errors import ContractError

Kind = Literal["start", "chunk", "end", "error", "final"]
Mode = Literal["auto", "incremental", "cumulative"]
Status = Literal["completed", "incomplete", "failed"]
# The stream dialects a worker assembles; worker/dialects/ has one module per name.
Format = Literal["chat", "anthropic", "responses", "gemini"]
MODES: tuple[str, ...] = get_args(Mode)
FORMATS: tuple[str, ...] = get_args(Format)
KINDS: tuple[str, ...] = get_args(Kind)

Fields = dict[bytes, bytes]

MAX_REQUEST_ID_LENGTH = 200
# Whitespace, and control, format, surrogate and unassigned code points: nothing a key name or a log line
# should carry.
_NOT_IN_REQUEST_ID = re.compile(r"[\s\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ud800-\udfff]")
# Envelope integers (attempt, seq, producer timestamp) and error statuses must fit a signed 64-bit integer,
# the widest a record encoder writes.
_MAX_INT = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Envelope:
    """One decoded entry of a request's chunk stream."""

    kind: Kind
    attempt: int
    ts_ms: int
    seq: int = -1
    payload: bytes = b""
    chunks: int | None = None  # an end's count of its attempt's chunks, when the producer sent it


@dataclass(frozen=True, slots=True)
class Start:
    """What a start envelope carries: request metadata, the output mode and the dialect of the upstream, and
    the token of the producer that owns the request id.

    ``format`` None: the worker recognises the dialect from the stream's first chunk. ``token`` None: a
    producer that sends none. ``provider`` (its ``gen_ai.provider.name``) and ``request_model`` (the model
    asked for) name the call for analytics and pricing, when the producer knows them.
    """

    meta: dict[str, Any]
    mode: Mode
    format: Format | None = None
    token: str | None = None
    provider: str | None = None
    request_model: str | None = None


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


# One per request, for analytics. Token counts are the upstream's own, never summed.
#
# The counts are in the chat shape for every dialect, so analytics needs no per-provider code: ``prompt_tokens``
# includes cached input (Anthropic's cache reads and writes, which it reports apart from ``input_tokens``, are
# added in), with the split in ``prompt_tokens_details``; ``completion_tokens`` includes reasoning, with
# ``completion_tokens_details.reasoning_tokens``. ``usage`` is the provider's own usage object, verbatim (a chat
# usage, Anthropic ``usage``, Responses ``usage``, Gemini ``usageMetadata``).
#
# Times come from the producer's envelope timestamps: ``latency_ms`` from the start envelope to the end or
# error envelope, ``ttft_ms`` from the start to the first chunk of the attempt assembled; None when the stream
# never got that far. ``cost`` is what the request cost at the provider's prices (``worker/pricing.py``), None
# with ``cost_reason`` saying why when there is no price. Beside these, the OpenTelemetry GenAI attributes
# (``streamfold/genai.py``), each present only when known.
UsageEvent = TypedDict("UsageEvent", {
    "request_id": str,
    "status": Status,
    "format": Format,
    "provider": "str | None",
    "request_model": "str | None",
    "model": "str | None",
    "prompt_tokens": "int | None",
    "completion_tokens": "int | None",
    "total_tokens": "int | None",
    "prompt_tokens_details": "dict[str, Any] | None",
    "completion_tokens_details": "dict[str, Any] | None",
    "usage": "dict[str, Any] | None",
    "cost": "dict[str, Any] | None",
    "cost_reason": "str | None",
    "latency_ms": "float | None",
    "ttft_ms": "float | None",
    "chunks": int,
    "error_type": "str | None",
    "meta": "dict[str, Any]",
    "finished_at_ms": int,
    "gen_ai.operation.name": NotRequired[str],
    "gen_ai.provider.name": NotRequired[str],
    "gen_ai.request.model": NotRequired[str],
    "gen_ai.response.model": NotRequired[str],
    "gen_ai.response.id": NotRequired[str],
    "gen_ai.response.finish_reasons": NotRequired["list[str]"],
    "gen_ai.usage.input_tokens": NotRequired[int],
    "gen_ai.usage.output_tokens": NotRequired[int],
    "gen_ai.usage.cache_read.input_tokens": NotRequired[int],
    "gen_ai.usage.cache_creation.input_tokens": NotRequired[int],
    "gen_ai.usage.reasoning.output_tokens": NotRequired[int],
    "gen_ai.response.time_to_first_chunk": NotRequired[float],
    "error.type": NotRequired[str],
})


# --- request ids ----------------------------------------------------------------------------------------

def validate_request_id(request_id: str) -> str:
    """Return ``request_id`` if it can name a request; raise ContractError saying why not otherwise."""
    if not isinstance(request_id, str) or not request_id:
        raise ContractError(f"request id must be a non-empty string, got {request_id!r:.80}")
    if len(request_id) > MAX_REQUEST_ID_LENGTH:
        raise ContractError(f"request id is {len(request_id)} characters long; at most {MAX_REQUEST_ID_LENGTH} allowed")
    bad = _NOT_IN_REQUEST_ID.search(request_id)
    if bad is not None:
        raise ContractError(f"request id must not contain whitespace or control characters "
                            f"({bad.group()!r} at {bad.start()}): {request_id!r:.80}")
    return request_id


def decode_request_id(raw: bytes) -> str:
    """A request id as read from Redis; ContractError when it is not UTF-8 or not a valid id."""
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise ContractError(f"request id is not valid UTF-8: {raw!r:.80}") from None
    return validate_request_id(text)


# --- envelopes ------------------------------------------------------------------------------------------

def encode_start(meta: dict[str, Any], mode: Mode, *, attempt: int, ts_ms: int, format: Format | None = None,
                 token: str | None = None, provider: str | None = None,
                 request_model: str | None = None) -> dict[str, bytes]:
    """The start envelope; ContractError for an unknown mode or format, or meta that is not JSON."""
    if mode not in MODES:
        raise ContractError(f"unknown output mode {mode!r}; expected one of {', '.join(MODES)}")
    body: dict[str, Any] = {"meta": meta, "mode": mode}
    if format is not None:
        if format not in FORMATS:
            raise ContractError(f"unknown stream format {format!r}; expected one of {', '.join(FORMATS)}")
        body["format"] = format
    for name, value in (("token", token), ("provider", provider), ("request_model", request_model)):
        if value is not None:
            body[name] = value
    try:
        data = orjson.dumps(body)
    except TypeError as exc:
        raise ContractError(f"request meta is not JSON-serialisable: {exc}") from exc
    return {"k": b"start", "att": b"%d" % attempt, "ts": b"%d" % ts_ms, "d": data}


def encode_chunk(raw: bytes, *, seq: int, attempt: int, ts_ms: int) -> dict[str, bytes]:
    return {"k": b"chunk", "att": b"%d" % attempt, "ts": b"%d" % ts_ms, "seq": b"%d" % seq, "d": raw}


def encode_end(*, attempt: int, ts_ms: int, chunks: int | None = None) -> dict[str, bytes]:
    """An end envelope; ``chunks``, the attempt's count of chunks, lets a worker tell an end that came after
    all of them from one whose last chunks were lost (a failover losing acknowledged writes)."""
    fields = {"k": b"end", "att": b"%d" % attempt, "ts": b"%d" % ts_ms}
    if chunks is not None:
        fields["n"] = b"%d" % chunks
    return fields


def encode_error(error: ErrorInfo, *, attempt: int, ts_ms: int) -> dict[str, bytes]:
    return {"k": b"error", "att": b"%d" % attempt, "ts": b"%d" % ts_ms, "d": orjson.dumps(error)}


def encode_control(request_id: str, *, ts: bytes) -> dict[str, bytes]:
    """The control-stream entry that hands a request to the worker group; ``ts`` is its start envelope's."""
    return {"rid": request_id.encode(), "ts": ts}


def decode_envelope(fields: Fields) -> Envelope:
    """Decode one chunk-stream entry; raises ContractError for anything that is not an envelope."""
    try:
        kind = fields[b"k"].decode()
        attempt = _counter(fields[b"att"])
        ts_ms = _counter(fields[b"ts"])
        seq = _counter(fields[b"seq"]) if kind == "chunk" else -1
        chunks = _counter(fields[b"n"]) if kind == "end" and b"n" in fields else None
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        raise ContractError(f"not an envelope: {fields!r:.200}") from exc
    if kind not in KINDS:
        raise ContractError(f"unknown envelope kind {kind!r:.40}")
    return Envelope(cast(Kind, kind), attempt, ts_ms, seq, fields.get(b"d", b""), chunks)


def _counter(raw: bytes) -> int:
    # int() alone would take " 7", "+7", "1_000" and integers of any size.
    if not raw.isdigit() or len(raw) > 19 or int(raw) > _MAX_INT:
        raise ValueError(f"not a non-negative 64-bit integer: {raw!r:.40}")
    return int(raw)


def decode_start(envelope: Envelope) -> Start:
    body = _load_object(envelope.payload, "start envelope")
    meta, mode, format = body.get("meta") or {}, body.get("mode", "auto"), body.get("format")
    token, provider, request_model = body.get("token"), body.get("provider"), body.get("request_model")
    if (not isinstance(meta, dict) or mode not in MODES or (format is not None and format not in FORMATS)
            or not all(isinstance(text, (str, type(None))) for text in (token, provider, request_model))):
        raise ContractError(f"bad start envelope: {envelope.payload!r:.200}")
    return Start(meta, cast(Mode, mode), cast("Format | None", format), token, provider, request_model)


def decode_error(envelope: Envelope) -> ErrorInfo:
    body = _load_object(envelope.payload, "error envelope")
    return error_info(body)


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
    return ErrorInfo(message=_text(body.get("message") or "upstream error"),
                     type=_text(body.get("type") or "upstream_error"),
                     status=status if isinstance(status, int) and not isinstance(status, bool)
                     and abs(status) <= _MAX_INT else None,
                     code=None if code is None else _text(code))


def _text(value: Any) -> str:
    """A value shown as text in an error. A container (which may be nested too deep to encode again) is
    shown as a bounded preview."""
    if isinstance(value, (dict, list)):
        return repr(value)[:200]
    return str(value)


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
