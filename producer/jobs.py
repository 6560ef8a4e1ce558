"""LLM calls through rq: a backend enqueues a chat completion, a job runner streams it onto Redis.

``enqueue_chat_completion`` puts one rq job on ``settings.queue`` and returns the request id at once. The
job, ``run_chat_completion`` (run by ``python -m producer work`` or rq's own ``rq worker``), looks the upstream
up in the runner's settings and reads its API key from the runner's environment - the job's arguments carry
neither - then publishes start, every raw SSE data payload and the end or error marker. Workers assemble it.

Cancellation is a handshake on ``keys.cancel(rid)``. A job claims its request by setting the key to
``running`` (SET NX) before publishing anything; ``cancel`` sets it to ``cancelled`` and reads what was there
(SET GET). The first to write decides who publishes the failure: a running job sees the flag at its next
check, stops the upstream call and fails the request; a job that had not started never will, so ``cancel``
removes it from the queue and publishes start + error itself. Either way the request gets one failed result.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Generator, Mapping
from contextlib import closing
from typing import Any, Literal, Protocol

import orjson
import redis
from rq import Queue
from rq.exceptions import DuplicateJobError, InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus

from producer.publisher import Publisher, new_request_id
from producer.upstream import RetryPolicy, UpstreamClient, failure
from streamfold.capture import CapturedItem
from streamfold.connection import connect, connected, redis_errors
from streamfold.contract import ErrorInfo, Mode, validate_request_id
from streamfold.errors import ConfigError, ContractError, RedisUnavailable, UpstreamError
from streamfold.keys import Keys
from streamfold.settings import DEFAULT_UPSTREAM, STREAM_MAX_AGE, Settings, Upstream, load_settings

log = logging.getLogger(__name__)

Outcome = Literal["ended", "failed", "cancelled", "skipped"]
RUNNING = b"running"
CANCELLED = b"cancelled"
CANCEL_CHECK_INTERVAL = 0.1
CANCELLED_ERROR = ErrorInfo(message="request cancelled", type="cancelled", status=None, code=None)
# Jobs in these states will never publish again, so there is nothing left to cancel.
_OVER = frozenset({JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED})


class ChatStream(Protocol):
    """What a job needs of an upstream: the SSE items of one streamed call (``UpstreamClient`` is one)."""

    def stream_chat(self, body: Mapping[str, Any]) -> Generator[CapturedItem, None, None]: ...


def job_id(keys: Keys, request_id: str) -> str:
    """The rq job id of a request: stable, so ``cancel`` finds the job, and distinct per namespace.

    A hash, since rq accepts only ``[A-Za-z0-9_-]`` in job ids and request ids may hold any visible character.
    """
    digest = hashlib.sha256(f"{keys.namespace}\0{request_id}".encode()).hexdigest()
    return f"streamfold-{digest[:32]}"


def request_body(upstream: Upstream, params: Mapping[str, Any]) -> dict[str, Any]:
    """The body sent upstream: the upstream's default params, the call's own, and streaming with usage on."""
    options = {**(upstream.params.get("stream_options") or {}), **(params.get("stream_options") or {})}
    return {**upstream.params, **params, "stream": True, "stream_options": {**options, "include_usage": True}}


def enqueue_chat_completion(params: Mapping[str, Any], *, upstream: str = DEFAULT_UPSTREAM,
                            request_id: str | None = None, meta: Mapping[str, Any] | None = None,
                            client: redis.Redis | None = None, settings: Settings | None = None) -> str:
    """Enqueue one streamed chat completion and return its request id; its result arrives through the workers.

    ``params`` is the request body (``model``, ``messages``, ...); ``stream`` and ``stream_options`` are set by
    the job. When these settings list upstreams, an unknown ``upstream`` raises ConfigError here; otherwise the
    job runner fails the request. A request id can be enqueued only once (ContractError on a second time).
    """
    request_id = new_request_id() if request_id is None else validate_request_id(request_id)
    body, meta_dict = _json_object(params, "params"), _json_object(meta or {}, "meta")
    with connected(client, settings) as (client, settings):
        if settings.upstreams:
            settings.upstream(upstream)
        queue = Queue(settings.queue, connection=client)
        try:
            with redis_errors(f"enqueuing request {request_id}"):
                queue.enqueue_call(
                    run_chat_completion, kwargs={"request_id": request_id, "upstream": upstream, "params": body,
                                                 "meta": meta_dict},
                    job_id=job_id(settings.keys, request_id), unique=True, timeout=settings.job_timeout,
                    # The description is what rq logs: the request, never its messages.
                    description=f"chat completion {request_id} via {upstream}",
                    result_ttl=settings.result_ttl, failure_ttl=settings.result_ttl)
        except DuplicateJobError as exc:
            raise ContractError(f"request {request_id} was already enqueued") from exc
    return request_id


def cancel(request_id: str, *, client: redis.Redis | None = None, settings: Settings | None = None) -> bool:
    """Cancel an enqueued request: it ends ``failed`` with an error of type ``cancelled``, exactly once.

    Returns True when the request is being (or already was) cancelled, False when there is no such job or it
    already finished. A running job stops within about ``CANCEL_CHECK_INTERVAL`` of its next chunk.
    """
    validate_request_id(request_id)
    with connected(client, settings) as (client, settings):
        keys = settings.keys
        with redis_errors(f"cancelling request {request_id}"):
            try:
                job = Job.fetch(job_id(keys, request_id), connection=client)
            except NoSuchJobError:
                return False
            if job.get_status() in _OVER:
                return False
            previous = client.set(keys.cancel(request_id), CANCELLED, ex=settings.cancel_ttl, get=True)
            if previous is not None:
                return True  # the job claimed the request first: it stops and fails it itself
            try:
                job.cancel()
            except InvalidJobOperation:
                pass  # cancelled through rq already; the request still needs its result
            meta = job.kwargs.get("meta") or {}
        publisher = Publisher(client, keys, batch_size=1, max_age=settings.stream_max_age)
        publisher.start(request_id, meta, token=job_id(keys, request_id))
        publisher.fail(request_id, CANCELLED_ERROR)
        log.info("request %s: cancelled before its job started", request_id)
        return True


def run_chat_completion(request_id: str, upstream: str, params: dict[str, Any],
                        meta: dict[str, Any]) -> dict[str, Any]:
    """The rq job: stream one call from ``upstream`` onto the request's chunk stream.

    Returns a summary for rq's job result - request id, outcome and upstream calls made, never content or keys.
    """
    settings = load_settings()
    with connect(settings) as client:
        run = CompletionRun(client, settings.keys, policy=RetryPolicy.from_settings(settings),
                            claim_ttl=settings.job_timeout + settings.cancel_ttl, max_age=settings.stream_max_age)
        try:
            config = settings.upstream(upstream)
            http = UpstreamClient.from_settings(settings, config)
        except ConfigError as exc:
            log.error("request %s: %s", request_id, exc)
            error = ErrorInfo(message=str(exc), type="config_error", status=None, code=None)
            outcome = run.reject(request_id, error, meta=meta)
        else:
            with http:
                outcome = run.run(request_id, http, request_body(config, params), meta=meta, mode=config.mode)
    return {"request_id": request_id, "upstream": upstream, "outcome": outcome, "calls": run.calls}


class CompletionRun:
    """Carries one request from the upstream onto its chunk stream: claim, start, attempts, end or error.

    Failed calls are retried as ``policy`` says. A retry after chunks were pushed starts a new attempt, so
    workers assemble only the latest attempt, never a mix. ``sleep`` and ``clock`` are injectable so that
    tests decide time; every wait is cut into ``check_interval`` slices that look for a cancel.
    """

    def __init__(self, client: redis.Redis, keys: Keys, *, policy: RetryPolicy = RetryPolicy(),
                 claim_ttl: int = 3_600, max_age: int = STREAM_MAX_AGE, check_interval: float = CANCEL_CHECK_INTERVAL,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> None:
        self._client = client
        self._keys = keys
        # Live: each chunk reaches Redis as it comes.
        self._publisher = Publisher(client, keys, batch_size=1, max_age=max_age)
        self._policy = policy
        self._claim_ttl = claim_ttl
        self._check_interval = check_interval
        self._sleep = sleep
        self._clock = clock
        self._last_check = float("-inf")
        self.calls = 0

    def run(self, request_id: str, upstream: ChatStream, body: Mapping[str, Any], *,
            meta: Mapping[str, Any], mode: Mode = "auto") -> Outcome:
        """Stream the call and publish it; returns how it ended (``skipped`` if it was cancelled before)."""
        claim = self._claim(request_id)
        if claim is None:
            log.info("request %s: cancelled before its job started; nothing to do", request_id)
            return "skipped"
        try:
            # A re-run follows the attempts of the run before it, read from the stream before this run's
            # start envelope (attempt 0) becomes its newest entry.
            attempt = self._publisher.new_attempt(request_id) if claim == "rerun" else 0
            self._publisher.start(request_id, meta, mode, token=job_id(self._keys, request_id))
            outcome = self._with_retries(request_id, upstream, body, attempt)
        except Exception as exc:
            self._fail_after_crash(request_id, exc)
            raise
        log.info("request %s: %s after %d upstream call(s)", request_id, outcome, self.calls)
        return outcome

    def reject(self, request_id: str, error: ErrorInfo, *, meta: Mapping[str, Any]) -> Outcome:
        """Fail a request that cannot be called at all (an unknown upstream, a missing key)."""
        if self._claim(request_id) is None:
            return "skipped"
        self._publisher.start(request_id, meta, token=job_id(self._keys, request_id))
        self._publisher.fail(request_id, error)
        return "failed"

    def _with_retries(self, request_id: str, upstream: ChatStream, body: Mapping[str, Any],
                      attempt: int) -> Outcome:
        retry = 0
        while True:
            try:
                return self._call(request_id, upstream, body, attempt)
            except UpstreamError as exc:
                delay = self._policy.delay(retry, exc)
                if delay is None:
                    log.warning("request %s: upstream failed, giving up after %d call(s): %s",
                                request_id, self.calls, _describe(exc))
                    self._publisher.fail(request_id, failure(exc), attempt=attempt)
                    return "failed"
                retry += 1
                log.warning("request %s: upstream failed (%s); retry %d of %d in %.2f s",
                            request_id, _describe(exc), retry, self._policy.retries, delay)
                if self._publisher.pushed(request_id, attempt):
                    attempt = self._publisher.new_attempt(request_id)
                if self._wait_cancelled(request_id, delay):
                    self._publisher.fail(request_id, CANCELLED_ERROR, attempt=attempt)
                    return "cancelled"

    def _call(self, request_id: str, upstream: ChatStream, body: Mapping[str, Any], attempt: int) -> Outcome:
        """One upstream call: push what it streams; raises UpstreamError when the call fails."""
        self.calls += 1
        with closing(upstream.stream_chat(body)) as items:
            for item in items:
                if self._cancel_requested(request_id):
                    # Leaving the with block closes the response: the upstream stops generating.
                    self._publisher.fail(request_id, CANCELLED_ERROR, attempt=attempt)
                    return "cancelled"
                if item.kind == "error":
                    self._publisher.fail(request_id, item.error_body(), attempt=attempt)
                    return "failed"
                self._publisher.push(request_id, item.data, attempt=attempt)
        self._publisher.end(request_id, attempt=attempt)
        return "ended"

    def _claim(self, request_id: str) -> Literal["first", "rerun"] | None:
        """Take the request before publishing anything; None when ``cancel`` got there first.

        ``rerun``: an earlier run of this job claimed it (rq re-ran the job); the new run starts a new attempt.
        """
        key = self._keys.cancel(request_id)
        with redis_errors(f"claiming request {request_id}"):
            if self._client.set(key, RUNNING, nx=True, ex=self._claim_ttl):
                return "first"
            return "rerun" if self._client.get(key) == RUNNING else None

    def _cancel_requested(self, request_id: str, *, now: bool = False) -> bool:
        """Whether ``cancel`` was called; asks Redis at most once per ``check_interval`` unless ``now``."""
        if not now and self._clock() - self._last_check < self._check_interval:
            return False
        self._last_check = self._clock()
        with redis_errors(f"checking request {request_id} for a cancel"):
            return bool(self._client.get(self._keys.cancel(request_id)) == CANCELLED)

    def _wait_cancelled(self, request_id: str, delay: float) -> bool:
        """Sleep ``delay`` seconds in slices, checking for a cancel after each; True when one came."""
        remaining = delay
        while remaining > 0:
            step = min(remaining, self._check_interval)
            self._sleep(step)
            remaining -= step
            if self._cancel_requested(request_id, now=True):
                return True
        return False

    def _fail_after_crash(self, request_id: str, exc: Exception) -> None:
        """Best effort: give a request whose job crashes its one failed result instead of a stall."""
        error = ErrorInfo(message=f"producer job failed: {type(exc).__name__}", type="producer_error",
                          status=None, code=None)
        try:
            self._publisher.fail(request_id, error)
        except RedisUnavailable:
            log.error("request %s: could not publish the failure; workers will find it stalled", request_id)


def _json_object(value: Mapping[str, Any], what: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ContractError(f"{what} must be a mapping, got {type(value).__name__}")
    try:
        orjson.dumps(dict(value))
    except TypeError as exc:
        raise ContractError(f"{what} must be JSON-serialisable: {exc}") from exc
    return dict(value)


def _describe(exc: UpstreamError) -> str:
    return f"HTTP {exc.status}: {exc}" if exc.status is not None else str(exc)
