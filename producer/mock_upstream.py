"""A mock OpenAI-compatible upstream that replays captured streams, with faults on request.

``POST /v1/chat/completions`` with ``"stream": true`` answers as OpenAI does: one ``data: <chunk>`` event per
line of the fixture named by the request's ``model`` (a ``*.jsonl`` file stem), byte for byte, then
``data: [DONE]``. ``GET /v1/models`` lists the fixtures. Request headers or query parameters inject the
failures a real upstream shows (see ``FAULT_HELP``), so the upstream path can be tested without any LLM.

It is built on the standard library's ``ThreadingHTTPServer``: it is a test tool, so one thread per request
is plenty and it adds no dependency. Every response closes its connection; streams are sent with chunked
transfer encoding, so a client tells a complete stream from a dropped one.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import signal
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

_log = logging.getLogger(__name__)

_REPO_FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
DEFAULT_FIXTURE_DIRS = (_REPO_FIXTURES / "seeds", _REPO_FIXTURES / "recorded")
CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
MODELS_PATHS = frozenset({"/v1/models", "/models"})

FAULT_HELP = """\
fault injection (request header X-Mock-<Name>, or query parameter mock_<name>; the query wins):
  X-Mock-Latency-Ms        mock_latency_ms        sleep this many ms before each event
  X-Mock-Disconnect-After  mock_disconnect_after  send N chunks, then drop the connection (no [DONE])
  X-Mock-Malformed-After   mock_malformed_after   after N chunks send one `data: {not json` event, go on
  X-Mock-Error-After       mock_error_after       after N chunks send `event: error` with an error body, end
  X-Mock-Status            mock_status            answer with this status (429, 500, ...) and an error body
  X-Mock-Retry-After       mock_retry_after       with a status: send Retry-After: <seconds>
  X-Mock-Fail-Times        mock_fail_times        apply the failure faults only to the first K requests
  X-Mock-Key               mock_key               that carry this key (a counter per key; default "")

example:
  curl -N http://127.0.0.1:8400/v1/chat/completions -H 'X-Mock-Latency-Ms: 50' \\
    -d '{"model": "openai_refusal", "messages": [], "stream": true}'
"""

_DONE = b"data: [DONE]\n\n"
_MALFORMED = b"data: {not json\n\n"


class FaultError(ValueError):
    """A fault header or query parameter that cannot be read; answered with 400."""


@dataclass(frozen=True, slots=True)
class Faults:
    """The faults one request asked for; the defaults describe a healthy upstream."""

    latency_ms: int = 0
    disconnect_after: int | None = None
    malformed_after: int | None = None
    error_after: int | None = None
    status: int | None = None
    retry_after: int | None = None
    fail_times: int | None = None
    key: str = ""

    def without_failures(self) -> Faults:
        """Only the latency: what a request past its ``fail_times`` gets."""
        return Faults(latency_ms=self.latency_ms)

    def describe(self) -> str:
        """The faults that differ from a healthy upstream, as ``name=value`` words, for the request log."""
        healthy = Faults()
        active = [f"{f.name}={getattr(self, f.name)}" for f in fields(self)
                  if getattr(self, f.name) != getattr(healthy, f.name)]
        return " ".join(active) or "-"


def header_name(fault: str) -> str:
    """``disconnect_after`` -> ``X-Mock-Disconnect-After``."""
    return "X-Mock-" + "-".join(part.capitalize() for part in fault.split("_"))


def read_faults(query: Mapping[str, list[str]], headers: Message[str, str]) -> Faults:
    """The faults asked for by query parameters ``mock_<name>`` or headers ``X-Mock-<Name>``."""

    def raw(name: str) -> str | None:
        values = query.get(f"mock_{name}")
        return values[-1] if values else headers.get(header_name(name))

    def number(name: str) -> int | None:
        text = raw(name)
        if text is None:
            return None
        try:
            value = int(text)
        except ValueError:
            value = -1
        if value < 0:
            raise FaultError(f"{header_name(name)} / mock_{name} must be a non-negative integer, got {text!r}")
        return value

    status = number("status")
    if status is not None and not 400 <= status <= 599:
        raise FaultError(f"{header_name('status')} / mock_status must be an error status (400-599), got {status}")
    return Faults(
        latency_ms=number("latency_ms") or 0,
        disconnect_after=number("disconnect_after"),
        malformed_after=number("malformed_after"),
        error_after=number("error_after"),
        status=status,
        retry_after=number("retry_after"),
        fail_times=number("fail_times"),
        key=raw("key") or "",
    )


def sse_frames(chunks: Sequence[bytes], faults: Faults) -> Iterator[bytes | None]:
    """The SSE events to send, in order; ``None`` means: drop the connection here.

    A fault placed after more chunks than the stream has strikes after the last one, before ``[DONE]``.
    """
    last = len(chunks)
    disconnect_at, malformed_at, error_at = (
        None if n is None else min(n, last)
        for n in (faults.disconnect_after, faults.malformed_after, faults.error_after)
    )
    for sent in range(last + 1):
        if sent == disconnect_at:
            yield None
            return
        if sent == malformed_at:
            yield _MALFORMED
        if sent == error_at:
            error = openai_error(f"Injected stream error (error_after={sent}).", "server_error")
            yield b"event: error\ndata: " + json.dumps(error).encode() + b"\n\n"
            return
        if sent < last:
            yield b"data: " + chunks[sent] + b"\n\n"
    yield _DONE


def openai_error(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, object]:
    """An error body shaped as OpenAI's: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def status_error(status: int) -> dict[str, object]:
    """The error body of an injected status."""
    if status == 429:
        message = "Rate limit reached (injected by the mock upstream)."
        return openai_error(message, "requests", "rate_limit_exceeded")
    if status >= 500:
        message = "The server had an error processing your request (injected by the mock upstream)."
        return openai_error(message, "server_error")
    return openai_error(f"Injected error status {status}.", "invalid_request_error")


class FixtureCatalogue:
    """Captured streams by name: the stem of each ``*.jsonl`` file; the first directory listing a stem wins.

    The directories are read on each call, so fixtures added while the server runs are served at once.
    """

    def __init__(self, dirs: Sequence[Path]) -> None:
        self.dirs = tuple(dirs)

    def _paths(self) -> dict[str, Path]:
        paths: dict[str, Path] = {}
        for directory in self.dirs:
            for path in sorted(directory.glob("*.jsonl")):
                paths.setdefault(path.stem, path)
        return paths

    def names(self) -> list[str]:
        return sorted(self._paths())

    def chunks(self, name: str) -> list[bytes] | None:
        """The raw chunk lines of fixture ``name``, or None when there is no such fixture."""
        path = self._paths().get(name)
        if path is None:
            return None
        return [line for line in path.read_bytes().splitlines() if line.strip()]


@dataclass(frozen=True, slots=True)
class SeenRequest:
    """One request as the mock saw it, for tests to check what a client sent."""

    method: str
    path: str
    model: str | None
    authorization: str | None = field(repr=False)
    body: object = field(repr=False)


class _Server(ThreadingHTTPServer):
    """The HTTP server plus the state its handler threads share."""

    # Handler threads are joined on close (after ``closing`` cuts their sleeps short), so none outlives a test.
    daemon_threads = False

    def __init__(self, address: tuple[str, int], catalogue: FixtureCatalogue) -> None:
        super().__init__(address, _Handler)
        self.catalogue = catalogue
        self.closing = threading.Event()
        self._lock = threading.Lock()
        self._seen: list[SeenRequest] = []
        self._attempts: dict[str, int] = {}

    def record(self, request: SeenRequest) -> None:
        with self._lock:
            self._seen.append(request)

    def seen(self) -> list[SeenRequest]:
        with self._lock:
            return list(self._seen)

    def attempt(self, key: str) -> int:
        """Count one more request for ``key`` and return its number, from 1."""
        with self._lock:
            self._attempts[key] = self._attempts.get(key, 0) + 1
            return self._attempts[key]


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = 10.0
    _model: str | None = None
    _faults: Faults = Faults()

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        self._record(path, None)
        if path in MODELS_PATHS:
            models = [{"id": name, "object": "model", "created": 0, "owned_by": "streamfold-mock"}
                      for name in self.server.catalogue.names()]
            self._send_json(200, {"object": "list", "data": models})
        else:
            self._send_json(404, openai_error(f"Unknown path {path}.", "invalid_request_error", "unknown_url"))

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        body = self._read_json()
        self._model = body.get("model") if isinstance(body, dict) and isinstance(body.get("model"), str) else None
        self._record(url.path, body)
        if url.path not in CHAT_PATHS:
            self._send_json(404, openai_error(f"Unknown path {url.path}.", "invalid_request_error", "unknown_url"))
            return
        try:
            self._faults = read_faults(parse_qs(url.query), self.headers)
        except FaultError as exc:
            self._send_json(400, openai_error(str(exc), "invalid_request_error", "invalid_mock_parameter"))
            return
        self._chat_completion(body)

    def _chat_completion(self, body: object) -> None:
        if not isinstance(body, dict) or self._model is None or not isinstance(body.get("messages"), list):
            message = "The request body must be a JSON object with a string 'model' and a list 'messages'."
            self._send_json(400, openai_error(message, "invalid_request_error"))
            return
        if body.get("stream") is not True:
            message = "This mock upstream serves only streaming chat completions: send \"stream\": true."
            self._send_json(400, openai_error(message, "invalid_request_error", "stream_required", "stream"))
            return
        chunks = self.server.catalogue.chunks(self._model)
        if chunks is None:
            message = f"The model `{self._model}` does not exist; GET /v1/models lists the fixtures served."
            self._send_json(404, openai_error(message, "invalid_request_error", "model_not_found", "model"))
            return
        faults = self._faults
        if faults.fail_times is not None and self.server.attempt(faults.key) > faults.fail_times:
            faults = faults.without_failures()
        if faults.status is not None:
            headers = {} if faults.retry_after is None else {"Retry-After": str(faults.retry_after)}
            self._send_json(faults.status, status_error(faults.status), headers)
            return
        self._stream(chunks, faults)

    def _stream(self, chunks: Sequence[bytes], faults: Faults) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            for frame in sse_frames(chunks, faults):
                if faults.latency_ms and self.server.closing.wait(faults.latency_ms / 1000):
                    return
                if frame is None:
                    return  # no terminating chunk: the client sees the body cut short
                self.wfile.write(b"%x\r\n%s\r\n" % (len(frame), frame))
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the client went away; there is nobody left to tell

    def _read_json(self) -> object:
        """The request body parsed as JSON, or None when it is missing or not JSON."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(length)) if length > 0 else None
        except ValueError:
            return None

    def _record(self, path: str, body: object) -> None:
        self.close_connection = True
        self._faults = Faults()
        authorization = self.headers.get("Authorization")
        self.server.record(SeenRequest(self.command, path, self._model, authorization, body))

    def _send_json(self, status: int, body: object, headers: Mapping[str, str] | None = None) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Connection", "close")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        try:
            self.wfile.write(payload)
        except OSError:
            pass

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # One line per request, never a header: Authorization must not reach a log.
        path = urlsplit(self.path).path
        model, faults = self._model or "-", self._faults.describe()
        _log.info("%s %s model=%s status=%s faults=%s", self.command, path, model, code, faults)

    def log_message(self, format: str, *args: object) -> None:
        _log.warning(format, *args)


class MockUpstream:
    """The mock upstream on a background thread: ``with MockUpstream() as up: ... up.base_url ...``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, fixture_dirs: Sequence[Path] | None = None) -> None:
        self.host = host
        self.port = port
        self.catalogue = FixtureCatalogue(DEFAULT_FIXTURE_DIRS if fixture_dirs is None else fixture_dirs)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes as ``base_url``, e.g. ``http://127.0.0.1:8400/v1``."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def requests_seen(self) -> list[SeenRequest]:
        """Every request served so far, in arrival order."""
        return [] if self._server is None else self._server.seen()

    def start(self) -> MockUpstream:
        """Listen (port 0 picks a free port, then ``port`` tells which) and serve on a background thread."""
        self._server = _Server((self.host, self.port), self.catalogue)
        self.port = self._server.server_address[1]
        # A short poll interval keeps stop(), and so each test's teardown, quick.
        serve = functools.partial(self._server.serve_forever, poll_interval=0.05)
        self._thread = threading.Thread(target=serve, name="mock-upstream", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: cut streams short, wait for their threads, close the socket."""
        if self._server is None or self._thread is None:
            return
        self._server.closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._server, self._thread = None, None

    def __enter__(self) -> MockUpstream:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the mock upstream's options to ``parser``, and the fault-injection guide to its ``--help``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8400, help="port to listen on (default: %(default)s)")
    parser.add_argument("--fixtures", metavar="DIR", type=Path, action="append",
                        help="directory of *.jsonl streams; repeatable (default: fixtures/seeds and recorded)")
    # Set here rather than by the caller so every command reusing these options documents the faults.
    parser.epilog = FAULT_HELP
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM, logging one line per request to stderr."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    upstream = MockUpstream(args.host, args.port, args.fixtures)
    try:
        upstream.start()
    except OSError as exc:
        _log.error("cannot listen on %s:%s: %s", args.host, args.port, exc)
        return 1
    stopping = threading.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda signum, frame: stopping.set()) for sig in signals}
    try:
        _log.info("mock upstream serving %d fixtures at %s", len(upstream.catalogue.names()), upstream.base_url)
        stopping.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        upstream.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the mock upstream from the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m producer.mock_upstream",
        description="Serve captured chat.completion.chunk streams as a mock OpenAI-compatible upstream.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
