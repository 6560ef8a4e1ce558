"""LLM calls through rq: a backend enqueues a call, a call runner streams it onto Redis.

``enqueue_chat_completion`` puts one rq job on ``settings.queue`` and returns the request id at once. The
job, ``run_chat_completion``, is run by ``python -m producer work`` (the concurrent call runner, hundreds of
calls per process) or by rq's own ``rq worker`` (one call per process, on an event loop of its own); both
run it through the same rules (producer/runner/call.py). The runner looks the upstream up in its own
settings and reads its API key from its own environment - the job's arguments carry neither - then publishes
start, every raw SSE data payload and the end or error marker. Workers assemble it.

Cancellation is a handshake on ``keys.cancel(rid)``. A call claims its request by setting the key to
``running`` (SET NX) before publishing anything; ``cancel`` sets it to ``cancelled`` and reads what was there
(SET GET). The first to write decides who publishes the failure: a running call sees the flag within about
100 ms, stops the upstream call and fails the request; a job that had not started never will, so ``cancel``
removes it from the queue and publishes start + error itself. Either way the request gets one failed result.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Mapping
from typing import Any

import orjson
import redis
from rq import Queue
from rq.exceptions import DuplicateJobError, InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus

from producer.publisher import Publisher, new_request_id
from producer.runner.call import CANCELLED, CANCELLED_ERROR, crash_error
from streamfold.connection import connect, connected, queue_connected, redis_errors
from streamfold.contract import validate_request_id
from streamfold.errors import ContractError, StreamfoldError
from streamfold.genai import provider_of
from streamfold.keys import Keys
from streamfold.settings import DEFAULT_UPSTREAM, Settings, load_settings

log = logging.getLogger(__name__)

# Jobs in these states will never publish again, so there is nothing left to cancel.
_OVER = frozenset({JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED})


def job_id(keys: Keys, request_id: str) -> str:
    """The rq job id of a request: stable, so ``cancel`` finds the job, and distinct per namespace.

    A hash, since rq accepts only ``[A-Za-z0-9_-]`` in job ids and request ids may hold any visible character.
    """
    digest = hashlib.sha256(f"{keys.namespace}\0{request_id}".encode()).hexdigest()
    return f"streamfold-{digest[:32]}"


def enqueue_chat_completion(params: Mapping[str, Any], *, upstream: str = DEFAULT_UPSTREAM,
                            request_id: str | None = None, meta: Mapping[str, Any] | None = None,
                            client: redis.Redis | None = None, settings: Settings | None = None,
                            queue: redis.Redis | None = None) -> str:
    """Enqueue one streamed chat completion and return its request id; its result arrives through the workers.

    ``params`` is the request body (``model``, ``messages``, ...); ``stream`` and ``stream_options`` are set by
    the job. When these settings list upstreams, an unknown ``upstream`` raises ConfigError here; otherwise the
    job runner fails the request. A request id can be enqueued only once (ContractError on a second time).
    The job goes to rq's Redis: ``queue`` if given, else ``client`` unless ``queue_redis_url`` names another.
    """
    request_id = new_request_id() if request_id is None else validate_request_id(request_id)
    body, meta_dict = _json_object(params, "params"), _json_object(meta or {}, "meta")
    settings = load_settings() if settings is None else settings
    settings.require("upstreams")
    if settings.upstreams:
        settings.upstream(upstream)
    with queue_connected(queue, client, settings) as connection:
        try:
            with redis_errors(f"enqueuing request {request_id}"):
                Queue(settings.queue, connection=connection).enqueue_call(
                    run_chat_completion, kwargs={"request_id": request_id, "upstream": upstream, "params": body,
                                                 "meta": meta_dict},
                    job_id=job_id(settings.keys, request_id), unique=True, timeout=settings.job_timeout,
                    # The description is what rq logs: the request, never its messages.
                    description=f"chat completion {request_id} via {upstream}",
                    result_ttl=settings.result_ttl, failure_ttl=settings.result_ttl)
        except DuplicateJobError as exc:
            raise ContractError(f"request {request_id} was already enqueued") from exc
    return request_id


def cancel(request_id: str, *, client: redis.Redis | None = None, settings: Settings | None = None,
           queue: redis.Redis | None = None) -> bool:
    """Cancel an enqueued request: it ends ``failed`` with an error of type ``cancelled``, exactly once.

    Returns True when the request is being (or already was) cancelled, False when there is no such job or it
    already finished. A running job stops within about ``CANCEL_CHECK_INTERVAL`` of its next chunk. The job is
    looked up in rq's Redis (``queue``, as ``enqueue_chat_completion`` picks it); the cancel key and the failure
    go to the streams Redis (``client``).
    """
    validate_request_id(request_id)
    with connected(client, settings) as (client, settings), queue_connected(queue, client, settings) as jobs:
        keys = settings.keys
        with redis_errors(f"cancelling request {request_id}"):
            try:
                job = Job.fetch(job_id(keys, request_id), connection=jobs)
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
        publisher.start(request_id, meta, token=job_id(keys, request_id),
                        **_call_names(settings, job.kwargs.get("upstream"), job.kwargs.get("params")))
        publisher.fail(request_id, CANCELLED_ERROR)
        log.info("request %s: cancelled before its job started", request_id)
        return True


def run_chat_completion(request_id: str, upstream: str, params: dict[str, Any],
                        meta: dict[str, Any]) -> dict[str, Any]:
    """The rq job: stream one call from ``upstream`` onto the request's chunk stream.

    The concurrent runner never calls this function: it recognises the job by it and runs its call itself.
    A plain ``rq worker`` does call it, and it runs the call the runner would, on an event loop of its own.
    Returns a summary for rq's job result - request id, outcome and upstream calls made, never content or keys.
    """
    from producer.runner.calls import run_one  # the call runner's stack loads only where jobs run

    settings = load_settings()
    try:
        summary = asyncio.run(run_one(settings, request_id, upstream, params, meta))
    except Exception as exc:
        # rq's job timeout (JobTimeoutException) lands here, raised into the event loop, which then cancels
        # the call unpublished: give the request its failed result instead of a stall.
        _fail_after_crash(settings, request_id, exc)
        raise
    log.info("request %s: %s after %d upstream call(s)", request_id, summary["outcome"], summary["calls"])
    return dict(summary)


def _fail_after_crash(settings: Settings, request_id: str, exc: Exception) -> None:
    """Best effort: end a request whose job died, in a new attempt after whatever it had pushed, unless its
    stream has ended already (the call published its own failure)."""
    keys = settings.keys
    try:
        with connect(settings) as client:
            last = client.xrevrange(keys.chunks(request_id), count=1)
            if last and last[0][1].get(b"k") in (b"end", b"error"):
                return
            publisher = Publisher(client, keys, batch_size=1, max_age=settings.stream_max_age)
            if last:
                publisher.new_attempt(request_id)
            else:
                publisher.start(request_id, token=job_id(keys, request_id))
            publisher.fail(request_id, crash_error(exc))
    except (StreamfoldError, redis.RedisError):
        log.error("request %s: could not publish the failure; workers will find it stalled", request_id)


def _call_names(settings: Settings, upstream: Any, params: Any) -> dict[str, Any]:
    """What a start envelope says of a call that never ran: its format, provider and the model asked for."""
    config = settings.upstreams.get(upstream) if isinstance(upstream, str) else None
    model = params.get("model") if isinstance(params, dict) else None
    return {"format": config.api if config else None,
            "provider": provider_of(config.base_url, config.provider) if config else None,
            "request_model": model if isinstance(model, str) else None}


def _json_object(value: Mapping[str, Any], what: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ContractError(f"{what} must be a mapping, got {type(value).__name__}")
    try:
        orjson.dumps(dict(value))
    except TypeError as exc:
        raise ContractError(f"{what} must be JSON-serialisable: {exc}") from exc
    return dict(value)
