"""A scripted upstream for the upstream client's and the calls' tests: a real HTTP server on loopback, run on the
test's own event loop, so that each test says exactly what the upstream answers and when.

Each request is answered by the next handler; every request is recorded (method, path with query, headers,
body), and so is every connection the client closed while a body was still being sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import orjson
from aiohttp import web
from aiohttp.test_utils import RawTestServer

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
EVENT_STREAM = {"content-type": "text/event-stream"}


@dataclass(frozen=True)
class Seen:
    method: str
    path: str  # with the query
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


class ScriptedUpstream:
    """``async with ScriptedUpstream(*handlers) as upstream``: ``upstream.url("/v1")`` is its base URL."""

    def __init__(self, *handlers: Handler) -> None:
        self.handlers = list(handlers)
        self.requests: list[Seen] = []
        self.closed_by_client = 0
        self._server = RawTestServer(self._handle)

    def url(self, path: str = "/v1") -> str:
        return str(self._server.make_url(path))

    async def __aenter__(self) -> ScriptedUpstream:
        await self._server.start_server()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._server.close()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.requests.append(Seen(request.method, request.path_qs,
                                  {name.lower(): value for name, value in request.headers.items()},
                                  await request.read()))
        try:
            return await self.handlers.pop(0)(request)
        except (asyncio.CancelledError, ConnectionResetError):
            # The server cancels a handler whose client closed the connection; a write after it raises.
            self.closed_by_client += 1
            raise


def answer(status: int, *, json: Any = None, text: str | None = None,
           headers: dict[str, str] | None = None) -> Handler:
    """A whole answer: a JSON body, or a text one."""
    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if json is not None:
            return web.json_response(json, status=status, headers=headers)
        return web.Response(status=status, text=text or "", headers=headers)
    return handle


def events(parts: bytes | Iterable[bytes] | Callable[[], AsyncIterator[bytes]], *, cut: bool = False,
           hold: bool = False) -> Handler:
    """A 200 event stream sent in ``parts``, each a write of its own. ``cut``: the connection is dropped after
    the last part, before the body's end. ``hold``: the body is kept open after the last part (with a comment
    now and then) until the client closes the connection."""
    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        response = web.StreamResponse(headers=EVENT_STREAM)
        await response.prepare(request)
        async for part in _parts(parts):
            await response.write(part)
        if cut:
            assert request.transport is not None
            request.transport.close()
        while hold:
            await asyncio.sleep(0.01)
            await response.write(b": still here\n\n")  # raises once the client has closed the connection
        return response
    return handle


def stalled(seconds: float) -> Handler:
    """An upstream that answers nothing for ``seconds``."""
    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return web.Response(status=200)
    return handle


async def _parts(parts: bytes | Iterable[bytes] | Callable[[], AsyncIterator[bytes]]) -> AsyncIterator[bytes]:
    if isinstance(parts, bytes):
        yield parts
    elif callable(parts):
        async for part in parts():
            yield part
    else:
        for part in parts:
            yield part
