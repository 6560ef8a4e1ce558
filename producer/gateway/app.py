"""The HTTP gateway: an OpenAI-compatible front door that enqueues calls and relays them live, resumably.

    POST   /v1/chat/completions        enqueue a call (rq path); stream it back as chat.completion.chunks or
                                       answer with the assembled chat.completion
    GET    /v1/requests/{id}/stream    the same SSE stream, resumed after Last-Event-ID
    GET    /v1/requests/{id}           the result record (202 while the request runs)
    DELETE /v1/requests/{id}           cancel the request
    GET    /v1/requests/{id}/link      a watch link to the live page, for a person who has no key
    GET    /requests/{id}              the live page (HTML + EventSource)
    GET    /healthz                    200 when Redis answers

A client that goes away never stops the call: the request runs to its end and its result and usage event
are published once, whoever is watching.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import orjson
import redis
import redis.asyncio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from producer.follow import FollowSession
from producer.gateway.access import Caller, Gatekeeper
from producer.gateway.chunks import ChunkWriter, Superseded
from producer.gateway.hub import Overrun, StreamHub
from producer.gateway.metrics import GatewayMetrics
from producer.gateway.translate import native_body
from producer.jobs import cancel, enqueue_chat_completion, job_id
from producer.publisher import new_request_id
from streamfold import contract
from streamfold.connection import connect, connect_async, connect_queue
from streamfold.errors import ConfigError, ContractError, RedisRefused, RedisUnavailable, StreamfoldError
from streamfold.logs import EventLog
from streamfold.settings import DEFAULT_UPSTREAM, Settings
from worker.limits import Limits
from worker.live import Final, parse_token

log = EventLog(logging.getLogger("streamfold.gateway"))

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# Opens the first event of every stream: a browser's EventSource that loses the connection tries again after
# 1 s. A field of that event rather than an event of its own, which the openai SDK would try to read as a chunk.
RETRY = b"retry: 1000\n"
_PAGE = resources.files("producer.gateway").joinpath("page.html").read_text()


class Gateway:
    """The app's state: settings, Redis clients, the stream hub, who may do what, and the metrics."""

    def __init__(self, settings: Settings, *, metrics: GatewayMetrics | None = None) -> None:
        settings.require("upstreams", "gateway_keys")
        self.settings = settings
        self.keys = settings.keys
        self.gate = Gatekeeper(settings.gateway_keys, link_ttl=settings.gateway_link_ttl)
        self.metrics = metrics or GatewayMetrics()
        self.redis: Any = connect_async(settings, loop_writes=False)  # see connect_async
        # rq is synchronous: enqueue and cancel run on a thread, with these clients of the streams Redis and of
        # rq's (the same Redis unless the streams live on a cluster).
        self.sync = connect(settings)
        self.queue = connect_queue(settings)
        self.hub = StreamHub(self.redis, self.keys, block_ms=settings.block_ms, count=settings.read_count)
        self.limits = Limits.from_settings(settings)
        self.metrics.watch_followers(lambda: self.hub.followed)

    async def close(self) -> None:
        await self.hub.close()
        await self.redis.aclose()
        self.sync.close()
        self.queue.close()

    # --- who owns a request ------------------------------------------------------------------------------

    async def owner(self, request_id: str) -> tuple[bool, str | None]:
        """(whether the request exists, the tenant that started it), from its start envelope, its record or
        its queued job, whichever is still there."""
        first = await self.redis.xrange(self.keys.chunks(request_id), "-", "+", count=1)
        if first and first[0][1].get(b"k") == b"start":
            return True, _tenant(orjson.loads(first[0][1].get(b"d") or b"{}").get("meta"))
        raw = await self.redis.get(self.keys.result(request_id))
        if raw is not None:
            return True, _tenant(contract.decode_record(raw).get("meta"))
        job = await asyncio.to_thread(self._job_meta, request_id)
        return (job is not None), _tenant(job)

    def _job_meta(self, request_id: str) -> dict[str, Any] | None:
        from rq.exceptions import NoSuchJobError
        from rq.job import Job
        try:
            job = Job.fetch(job_id(self.keys, request_id), connection=self.queue)
        except NoSuchJobError:
            return None
        meta = job.kwargs.get("meta")
        return meta if isinstance(meta, dict) else {}

    # --- relaying ---------------------------------------------------------------------------------------

    async def relay(self, request_id: str, *, after: str | None, include_usage: bool,
                    started: float | None = None) -> AsyncIterator[bytes]:
        """The request's SSE stream: chunks after ``after``, then ``[DONE]`` - or an error event when the
        request failed, ended incomplete, or replaced text already sent."""
        writer = ChunkWriter(include_usage=include_usage)
        position = None if after is None else parse_token(after)
        self.metrics.stream_opened()
        opening = RETRY
        try:
            async for event, head in self._events(request_id):
                writer.meta = head
                try:
                    chunks = writer.chunks(event)
                except Superseded as exc:
                    self.metrics.superseded()
                    yield opening + _sse_error(str(exc) + f"; GET /v1/requests/{request_id} for the whole answer",
                                               "stream_superseded")
                    return
                if position is not None and parse_token(event.token) <= position:
                    continue
                for chunk in chunks:
                    if started is not None:
                        self.metrics.first_event(time.monotonic() - started)
                        started = None
                    yield opening + _sse(chunk, event.token)
                    opening = b""
                if isinstance(event, Final):
                    yield opening + _closing(event.record, writer)
        except Overrun:
            self.metrics.overrun()
            return  # the client resumes from its last event id
        finally:
            self.metrics.stream_closed()

    async def _events(self, request_id: str) -> AsyncIterator[tuple[Any, dict[str, Any]]]:
        """Every event of the request from its start, with the completion's id, created and model so far."""
        session = FollowSession(request_id, self.keys, after=None, wait=None, limits=self.limits)
        if not await self.redis.exists(self.keys.chunks(request_id)):
            raw = await self.redis.get(self.keys.result(request_id))
            if raw is not None:
                for event in session.record(raw):
                    yield event, session.head()
                return
        subscription = await self.hub.subscribe(request_id)
        try:
            while not session.done:
                events = session.read([(subscription.key, await subscription.get())])
                if session.closed:
                    events += session.record(await self.redis.get(self.keys.result(request_id)))
                for event in events:
                    yield event, session.head()
        finally:
            self.hub.unsubscribe(subscription)

    async def result(self, request_id: str) -> dict[str, Any]:
        """Wait for the request's record (through the hub: no polling, no extra connection)."""
        async for event, _ in self._events(request_id):
            if isinstance(event, Final):
                return event.record
        raise ContractError(f"the stream of {request_id} ended without its result")

    # --- starting calls ---------------------------------------------------------------------------------

    async def start(self, body: dict[str, Any], caller: Caller, idempotency_key: str | None) -> tuple[str, bool]:
        """Enqueue the call (or find the one an Idempotency-Key started); returns (request id, new)."""
        upstream, params = route(body, self.settings)
        config = self.settings.upstreams.get(upstream)
        params = native_body(config.api if config else "chat", params)
        meta = {"tenant": caller.tenant} if caller.tenant else {}
        if isinstance(body.get("user"), str):
            meta["user"] = body["user"]
        request_id = new_request_id()
        if idempotency_key is not None:
            key = self.keys.idempotency(caller.tenant or "-", _key_digest(idempotency_key))
            fingerprint = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
            claim = orjson.dumps({"request_id": request_id, "body": fingerprint})
            if not await self.redis.set(key, claim, nx=True, ex=self.settings.result_ttl):
                earlier = orjson.loads(await self.redis.get(key) or b"{}")
                if earlier.get("body") != fingerprint:
                    raise IdempotencyConflict("this Idempotency-Key was used with a different request body")
                return str(earlier["request_id"]), False
        try:
            await asyncio.to_thread(enqueue_chat_completion, params, upstream=upstream, request_id=request_id,
                                    meta=meta, client=self.sync, settings=self.settings, queue=self.queue)
        except BaseException:
            if idempotency_key is not None:
                await self.redis.delete(key)
            raise
        return request_id, True


class IdempotencyConflict(StreamfoldError):
    """An Idempotency-Key seen before with another request body."""


def route(body: dict[str, Any], settings: Settings) -> tuple[str, dict[str, Any]]:
    """The upstream a call goes to and its body: a model ``UPSTREAM/MODEL`` whose prefix names an entry of
    ``STREAMFOLD_UPSTREAMS`` goes there as MODEL; any other model goes to ``default`` unchanged."""
    model = body["model"]
    prefix, slash, rest = model.partition("/")
    if slash and rest and prefix in settings.upstreams:
        return prefix, {**body, "model": rest}
    return DEFAULT_UPSTREAM, dict(body)


def create_app(settings: Settings, *, metrics: GatewayMetrics | None = None) -> Starlette:
    """The ASGI app; ``python -m producer serve`` runs it with uvicorn."""
    gateway = Gateway(settings, metrics=metrics)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if settings.redis_cluster:
            # redis-py's asyncio cluster client reads the cluster's layout on its first command; the hub's
            # loops making their first reads at once race in it (a connection closed under another's write).
            await gateway.redis.initialize()
        gateway.hub.start()
        try:
            yield
        finally:
            await gateway.close()

    async def chat_completions(request: Request) -> Response:
        started = time.monotonic()
        caller = gateway.gate.bearer(request.headers.get("authorization"))
        if caller is None:
            return _error(401, "missing or unknown bearer key", "invalid_api_key")
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return _error(400, "the request body is not JSON", "invalid_request_error")
        problem = _body_problem(body)
        if problem is not None:
            return _error(400, problem, "invalid_request_error")
        try:
            request_id, new = await gateway.start(body, caller, request.headers.get("idempotency-key"))
        except IdempotencyConflict as exc:
            return _error(422, str(exc), "idempotency_conflict")
        except ConfigError as exc:
            return _error(400, str(exc), "invalid_request_error")
        log.info("call_enqueued" if new else "call_joined", request_id=request_id, tenant=caller.tenant,
                 stream=bool(body.get("stream")))
        headers = {"X-Request-Id": request_id}
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(gateway.relay(request_id, after=None, include_usage=include_usage,
                                                   started=started),
                                     media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
        try:
            record = await asyncio.wait_for(gateway.result(request_id), timeout=settings.job_timeout)
        except TimeoutError:
            return _error(504, f"no result for {request_id} within {settings.job_timeout} s; GET "
                               f"/v1/requests/{request_id} later", "timeout", headers=headers)
        return _answer(record, headers)

    async def stream(request: Request) -> Response:
        request_id, caller = await _reader(request)
        after = request.headers.get("last-event-id") or request.query_params.get("after")
        if after is not None:
            try:
                parse_token(after)
            except ValueError as exc:
                return _error(400, str(exc), "invalid_request_error")
        include_usage = request.query_params.get("include_usage", "true") != "false"
        return StreamingResponse(gateway.relay(request_id, after=after, include_usage=include_usage),
                                 media_type="text/event-stream", headers={**SSE_HEADERS, "X-Request-Id": request_id})

    async def get_request(request: Request) -> Response:
        request_id, _ = await _reader(request)
        raw = await gateway.redis.get(gateway.keys.result(request_id))
        if raw is None:
            return JSONResponse({"request_id": request_id, "status": "running"}, status_code=202)
        return Response(raw, media_type="application/json")

    async def delete_request(request: Request) -> Response:
        request_id, _ = await _reader(request, watch_allowed=False)
        cancelled = await asyncio.to_thread(cancel, request_id, client=gateway.sync, settings=settings,
                                            queue=gateway.queue)
        return JSONResponse({"request_id": request_id, "cancelled": cancelled})

    async def link(request: Request) -> Response:
        request_id, _ = await _reader(request, watch_allowed=False)
        return JSONResponse({"url": f"/requests/{request_id}?access={gateway.gate.link(request_id)}"})

    async def page(request: Request) -> Response:
        await _reader(request)
        return HTMLResponse(_PAGE)

    async def health(request: Request) -> Response:
        try:
            await gateway.redis.ping()
        except redis.RedisError as exc:
            return JSONResponse({"status": "unhealthy", "reason": str(exc)}, status_code=503)
        return JSONResponse({"status": "ok", "followers": gateway.hub.followed})

    async def _reader(request: Request, *, watch_allowed: bool = True) -> tuple[str, Caller]:
        """The request id of the path and the caller, once both are known good; else an HTTP error."""
        request_id = request.path_params["request_id"]
        try:
            contract.validate_request_id(request_id)
        except ContractError as exc:
            raise HTTPError(_error(400, str(exc), "invalid_request_error")) from None
        caller = gateway.gate.bearer(request.headers.get("authorization"))
        if caller is None and watch_allowed:
            caller = gateway.gate.watcher(request_id, request.query_params.get("access"))
        if caller is None:
            raise HTTPError(_error(401, "missing or unknown bearer key (or watch link)", "invalid_api_key"))
        exists, owner = await gateway.owner(request_id)
        if not exists or not caller.may_see(request_id, owner):
            raise HTTPError(_error(404, f"no request {request_id}", "not_found"))
        return request_id, caller

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/requests/{request_id}/stream", stream, methods=["GET"]),
        Route("/v1/requests/{request_id}/link", link, methods=["GET"]),
        Route("/v1/requests/{request_id}", get_request, methods=["GET"]),
        Route("/v1/requests/{request_id}", delete_request, methods=["DELETE"]),
        Route("/requests/{request_id}", page, methods=["GET"]),
        Route("/healthz", health, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(Observed, gateway=gateway)],
                    exception_handlers={HTTPError: _http_error, RedisUnavailable: _unavailable,
                                        RedisRefused: _unavailable})
    app.state.gateway = gateway
    return app


class Observed:
    """Counts and logs every HTTP request once its answer starts: route, status and time to answer."""

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app, self.gateway = app, gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()

        async def observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = getattr(scope.get("route"), "path", "unknown")
                seconds = time.monotonic() - started
                self.gateway.metrics.answered(route, message["status"], seconds)
                log.info("http_request", method=scope["method"], route=route, status=message["status"],
                         request_id=(scope.get("path_params") or {}).get("request_id"), ms=round(seconds * 1000, 1))
            await send(message)

        await self.app(scope, receive, observed)


class HTTPError(Exception):
    """Ends a request with a prepared response."""

    def __init__(self, response: Response) -> None:
        self.response = response


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPError)
    return exc.response


async def _unavailable(request: Request, exc: Exception) -> Response:
    return _error(503, f"Redis cannot serve: {exc}", "service_unavailable")


def _answer(record: dict[str, Any], headers: dict[str, str]) -> Response:
    """A non-streaming call's answer: the chat.completion, or the error it ended with, OpenAI-shaped."""
    if record["status"] == "completed":
        return JSONResponse(record["completion"], headers=headers)
    error = record.get("error") or {"message": "the upstream stream ended without finishing",
                                     "type": "incomplete", "code": None}
    status = error.get("status")
    code = status if isinstance(status, int) and 400 <= status <= 599 else (502 if record["status"] == "failed"
                                                                            else 504)
    return _error(code, str(error.get("message")), str(error.get("type")), headers=headers, code=error.get("code"))


def _body_problem(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "the request body must be a JSON object"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "'model' must be a non-empty string"
    if not isinstance(body.get("messages"), list) or not body["messages"]:
        return "'messages' must be a non-empty list"
    if "stream" in body and not isinstance(body["stream"], bool):
        return "'stream' must be true or false"
    return None


def _error(status: int, message: str, kind: str, *, headers: dict[str, str] | None = None,
           code: Any = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}},
                        status_code=status, headers=headers)


def _sse(chunk: dict[str, Any], token: str) -> bytes:
    return b"id: " + token.encode() + b"\ndata: " + orjson.dumps(chunk) + b"\n\n"


def _sse_error(message: str, kind: str, code: Any = None) -> bytes:
    return b"data: " + orjson.dumps({"error": {"message": message, "type": kind, "code": code}}) + b"\n\n"


def _closing(record: dict[str, Any], writer: ChunkWriter) -> bytes:
    """What ends the stream: the usage chunk and ``[DONE]``, or the error a request that did not complete had."""
    if record.get("status") != "completed":
        error = record.get("error") or {"message": "the upstream stream ended without finishing",
                                        "type": "incomplete", "code": None}
        return _sse_error(str(error.get("message")), str(error.get("type")), error.get("code"))
    usage = b"".join(b"data: " + orjson.dumps(chunk) + b"\n\n" for chunk in writer.closing())
    return usage + b"data: [DONE]\n\n"


def _tenant(meta: Any) -> str | None:
    tenant = meta.get("tenant") if isinstance(meta, dict) else None
    return tenant if isinstance(tenant, str) else None


def _key_digest(idempotency_key: str) -> str:
    # Any header value, of any length, makes a short key name that cannot break out of the namespace.
    return hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]
