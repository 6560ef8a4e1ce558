"""A mock LLM upstream that replays captured streams in each API's wire format, with faults on request.

``POST /v1/chat/completions`` with ``"stream": true`` answers as OpenAI does: one ``data: <chunk>`` event per
line of the fixture named by the request's ``model`` (a ``*.jsonl`` file stem in fixtures/seeds or
fixtures/recorded), byte for byte, then ``data: [DONE]``. The native APIs replay fixtures/native/<api>/:
``POST /v1/messages`` (Anthropic) and ``POST /v1/responses`` (OpenAI Responses) as ``event: <type>`` +
``data:`` events, ``POST /v1beta/models/<model>:streamGenerateContent?alt=sse`` (Gemini) as ``data:`` lines.
``GET /v1/models`` lists the chat fixtures. Request headers or query parameters inject the failures real
upstreams show (producer/mock_wire.py), each API's error bodies in its own shape.

Served by uvicorn on one asyncio loop, listening with a backlog of ``BACKLOG`` rather than the standard
library server's 5, so a thousand streams opening at once are all accepted and a benchmark measures the
runner, never the mock. ``peak_connections`` is the most requests it served at once, which tests use to see
that calls really overlap.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
import uvicorn
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from producer.mock_wire import (FAULT_HELP, FaultError, Faults, FixtureCatalogue, error_body, openai_error, read_faults,
                                sse_frames, status_message)

__all__ = ["DEFAULT_FIXTURE_DIRS", "Faults", "MockUpstream", "SeenRequest", "main", "sse_frames"]

_log = logging.getLogger(__name__)

_REPO_FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
DEFAULT_FIXTURE_DIRS = (_REPO_FIXTURES / "seeds", _REPO_FIXTURES / "recorded")
DEFAULT_NATIVE_DIR = _REPO_FIXTURES / "native"
NATIVE_APIS = ("anthropic", "responses", "gemini")
BACKLOG = 4096
_PATHS = {"/v1/chat/completions": "chat", "/chat/completions": "chat", "/v1/messages": "anthropic",
          "/messages": "anthropic", "/v1/responses": "responses", "/responses": "responses"}
_GEMINI = re.compile(r"^(?:/v1beta|/v1)?/models/(?P<model>[^/:]+):streamGenerateContent$")
_MODELS_PATHS = frozenset({"/v1/models", "/models"})
# The message uvicorn logs when a response ends unfinished: here, always an injected disconnect.
_CUT_SHORT = "ASGI callable returned without completing response."


@dataclass(frozen=True, slots=True)
class SeenRequest:
    """One request as the mock saw it, for tests to check what a client sent; ``authorization`` is the
    Authorization, x-api-key or x-goog-api-key header, whichever came."""

    method: str
    path: str
    model: str | None
    authorization: str | None = field(repr=False)
    body: object = field(repr=False)


class _State:
    """What requests share: fixtures, counters, the requests seen. Touched from the server's loop only,
    read from other threads (whole values, never half-updated)."""

    def __init__(self, chat: FixtureCatalogue, native_dir: Path) -> None:
        self.catalogues = {"chat": chat, **{api: FixtureCatalogue([native_dir / api]) for api in NATIVE_APIS}}
        self.seen: list[SeenRequest] = []
        self.attempts: dict[str, int] = {}
        self.open = self.peak = 0
        self.closing = threading.Event()


class _App:
    """The ASGI application: counts requests in flight around each one, answers as the API asks."""

    def __init__(self, state: _State) -> None:
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        state = self.state
        state.open += 1
        state.peak = max(state.peak, state.open)
        try:
            response = await self._answer(Request(scope, receive))
            await response(scope, receive, send)
        finally:
            state.open -= 1

    async def _answer(self, request: Request) -> Response:
        path = request.url.path
        body = _json(await request.body()) if request.method == "POST" else None
        gemini = _GEMINI.match(path)
        api = "gemini" if gemini else _PATHS.get(path)
        model = gemini["model"] if gemini else (body.get("model") if isinstance(body, dict) else None)
        model = model if isinstance(model, str) else None
        headers = request.headers
        key = headers.get("authorization") or headers.get("x-api-key") or headers.get("x-goog-api-key")
        self.state.seen.append(SeenRequest(request.method, path, model, key, body))
        if request.method == "GET" and path in _MODELS_PATHS:
            models = [{"id": name, "object": "model", "created": 0, "owned_by": "streamfold-mock"}
                      for name in self.state.catalogues["chat"].names()]
            return _logged(request, model, Faults(), JSONResponse({"object": "list", "data": models}))
        if request.method != "POST" or api is None:
            return _logged(request, model, Faults(), JSONResponse(
                openai_error(f"Unknown path {path}.", "invalid_request_error", "unknown_url"), 404))
        try:
            faults = read_faults(request.query_params, headers)
        except FaultError as exc:
            return _logged(request, model, Faults(), JSONResponse(
                openai_error(str(exc), "invalid_request_error", "invalid_mock_parameter"), 400))
        return _logged(request, model, faults, self._stream(api, request, body, model, faults))

    def _stream(self, api: str, request: Request, body: object, model: str | None, faults: Faults) -> Response:
        problem = _bad_request(api, request, body, model)
        if problem is not None:
            return JSONResponse(error_body(api, 400, problem[0]) if api != "chat"
                                else openai_error(problem[0], "invalid_request_error", *problem[1:]), 400)
        chunks = self.state.catalogues[api].chunks(model or "")
        if chunks is None:
            message = f"The model `{model}` does not exist; the mock serves its fixtures as models."
            return JSONResponse(error_body(api, 404, message) if api != "chat"
                                else openai_error(message, "invalid_request_error", "model_not_found", "model"), 404)
        if faults.fail_times is not None and self._attempt(faults.key) > faults.fail_times:
            faults = faults.without_failures()
        if faults.status is not None:
            retry = {} if faults.retry_after is None else {"Retry-After": str(faults.retry_after)}
            return JSONResponse(error_body(api, faults.status, status_message(faults.status)), faults.status, retry)
        return _Frames(sse_frames(chunks, faults, api), faults.latency_ms / 1000, self.state.closing)

    def _attempt(self, key: str) -> int:
        """Count one more request for ``key`` and return its number, from 1."""
        self.state.attempts[key] = self.state.attempts.get(key, 0) + 1
        return self.state.attempts[key]


class _Frames(Response):
    """An event stream sent frame by frame (chunked), each after ``latency`` seconds; a ``None`` frame ends
    the response unfinished, so the client sees the body cut short."""

    def __init__(self, frames: Iterator[bytes | None], latency: float, closing: threading.Event) -> None:
        # Not Response.__init__: it would declare a Content-Length, and a stream's length is not known.
        self.status_code, self.background = 200, None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
        self.frames, self.latency, self.closing = frames, latency, closing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        for frame in self.frames:
            if self.latency:
                await asyncio.sleep(self.latency)
            if frame is None or self.closing.is_set():
                return
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _bad_request(api: str, request: Request, body: object, model: str | None) -> tuple[str, ...] | None:
    """Why a request cannot be streamed (message, then OpenAI's code and param), or None."""
    if api == "gemini":
        if request.query_params.get("alt") != "sse":
            return ("This mock upstream serves only streaming: add ?alt=sse.",)
        return None if isinstance(body, dict) else ("The request body must be a JSON object.",)
    if not isinstance(body, dict) or model is None:
        return ("The request body must be a JSON object with a string 'model'.",)
    if api in ("chat", "anthropic") and not isinstance(body.get("messages"), list):
        return ("The request body must be a JSON object with a string 'model' and a list 'messages'.",)
    if body.get("stream") is not True:
        return ("This mock upstream serves only streaming calls: send \"stream\": true.", "stream_required", "stream")
    return None


def _json(raw: bytes) -> object:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def _logged(request: Request, model: str | None, faults: Faults, response: Response) -> Response:
    # One line per request, never a header: keys must not reach a log.
    _log.info("%s %s model=%s status=%s faults=%s", request.method, request.url.path, model or "-",
              response.status_code, faults.describe())
    return response


class _QuietCutShort(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != _CUT_SHORT


class MockUpstream:
    """The mock upstream on a background thread: ``with MockUpstream() as up: ... up.base_url ...``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, fixture_dirs: Sequence[Path] | None = None,
                 native_dir: Path = DEFAULT_NATIVE_DIR) -> None:
        self.host, self.port = host, port
        self.catalogue = FixtureCatalogue(DEFAULT_FIXTURE_DIRS if fixture_dirs is None else fixture_dirs)
        self._state = _State(self.catalogue, native_dir)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes as ``base_url`` (and the chat, Anthropic and Responses upstreams),
        e.g. ``http://127.0.0.1:8400/v1``."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def root_url(self) -> str:
        """The server's root: what the Anthropic SDK takes as ``base_url`` (it adds ``/v1/messages``)."""
        return f"http://{self.host}:{self.port}"

    @property
    def requests_seen(self) -> list[SeenRequest]:
        """Every request served so far, in arrival order."""
        return list(self._state.seen)

    @property
    def peak_connections(self) -> int:
        """The most requests served at once so far."""
        return self._state.peak

    def start(self) -> MockUpstream:
        """Listen (port 0 picks a free port, then ``port`` tells which) and serve on a background thread."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        server_log = logging.getLogger("uvicorn.error")  # uvicorn's own lines: only its warnings matter here
        server_log.setLevel(logging.WARNING)
        server_log.addFilter(_QuietCutShort())
        config = uvicorn.Config(_App(self._state), loop="asyncio", http="h11", lifespan="off", access_log=False,
                                log_config=None, backlog=BACKLOG, timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="mock-upstream",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the mock upstream did not start on {self.host}:{self.port}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop serving: cut streams short, let the server finish, close the socket."""
        if self._server is None or self._thread is None:
            return
        self._state.closing.set()
        self._server.should_exit = True
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
                        help="directory of *.jsonl chat streams; repeatable (default: fixtures/seeds and recorded)")
    parser.add_argument("--native", metavar="DIR", type=Path, default=DEFAULT_NATIVE_DIR,
                        help="directory with anthropic/, responses/ and gemini/ streams (default: fixtures/native)")
    # Set here rather than by the caller so every command reusing these options documents the faults.
    parser.epilog = FAULT_HELP
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM, logging one line per request to stderr."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    upstream = MockUpstream(args.host, args.port, args.fixtures, args.native)
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
        description="Serve captured LLM streams as a mock upstream: chat completions, Anthropic, Responses, Gemini.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
