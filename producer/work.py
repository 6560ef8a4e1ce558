"""``python -m producer work``: the concurrent call runner as a process, with logs that never show an API key.

Sets the process up - logging (text or JSON, every line through a redacting filter, rq's lines too), the
metrics endpoint, the Redis clients - and runs producer/runner/loop.py until it drains. rq's own ``rq worker
--url <redis url> <queue>`` still runs the same jobs, one call per process.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import socket
import sys
from collections.abc import Coroutine
from typing import Any

from producer.runner.calls import REDIS_CONNECTIONS
from producer.runner.loop import Runner
from producer.upstream import RedactingFilter, configured_secrets
from streamfold.connection import connect, connect_async, connect_queue, preflight
from streamfold.errors import ConfigError
from streamfold.logs import EventLog, configure_logging
from streamfold.settings import Settings

SWITCH_INTERVAL_S = 0.0005


def runner_name() -> str:
    """A runner name unique to this process (also its rq worker name): host, pid and a random suffix."""
    return f"runner-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def run_worker(settings: Settings, *, burst: bool = False, name: str | None = None, concurrency: int | None = None,
               metrics_port: int | None = None, log_format: str | None = None, log_level: str = "INFO") -> int:
    """Run one call runner until it drains (or, with ``burst``, until nothing is left); returns its exit code."""
    if concurrency is not None and concurrency < 1:
        raise ConfigError(f"concurrency must be at least 1, got {concurrency}")
    settings.require("upstreams")
    if not settings.upstreams:
        raise ConfigError("STREAMFOLD_UPSTREAMS is not set: every call would fail with \"unknown upstream\"; set it "
                          "to a JSON table of upstreams (`python -m producer mock-upstream` serves one to try with)")
    configure_logging(log_format or settings.log_format, level=logging.getLevelName(log_level))
    redacting = RedactingFilter(configured_secrets(settings))
    for handler in logging.getLogger().handlers:
        handler.addFilter(redacting)
    name = name or runner_name()
    port = metrics_port if metrics_port is not None else settings.metrics_port
    with connect(settings) as streams:
        preflight(streams)
    with connect_queue(settings) as client:  # rq's Redis: the streams Redis unless a cluster holds those
        preflight(client)
        streams = connect_async(settings, connections=REDIS_CONNECTIONS)
        runner = Runner(settings, client, streams, name=name, concurrency=concurrency, burst=burst)
        if port is not None:
            try:
                port = runner.metrics.serve(port)
            except OSError as exc:
                raise ConfigError(f"cannot serve metrics on port {port}: {exc}") from exc
            EventLog(logging.getLogger("streamfold.runner"), worker=name).info("metrics_served", port=port)
        # What exists now lives as long as the process: frozen, it stays out of the collector's full passes.
        gc.freeze()
        # rq's blocking verbs run in threads beside the event loop. Each hand-over of the interpreter waits up
        # to the switch interval (5 ms by default), so a round trip made in a thread while the loop is busy
        # would cost milliseconds; a short interval keeps both sides moving.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        try:
            return run_loop(_serve(runner))
        finally:
            runner.metrics.close()


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run the runner's event loop: uvloop's where it is installed (its loop turns over the calls' many small
    reads and timers for about half the interpreter time of asyncio's own), asyncio's otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def _serve(runner: Runner) -> int:
    try:
        return await runner.run()
    finally:
        await runner.lease.client.aclose()
