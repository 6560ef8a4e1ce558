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

from producer.runner.calls import connect_async
from producer.runner.loop import Runner
from producer.upstream import RedactingFilter, configured_secrets
from streamfold.connection import connect
from streamfold.errors import ConfigError
from streamfold.logs import EventLog, configure_logging
from streamfold.settings import Settings

def runner_name() -> str:
    """A runner name unique to this process (also its rq worker name): host, pid and a random suffix."""
    return f"runner-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def run_worker(settings: Settings, *, burst: bool = False, name: str | None = None, concurrency: int | None = None,
               metrics_port: int | None = None, log_format: str | None = None, log_level: str = "INFO") -> int:
    """Run one call runner until it drains (or, with ``burst``, until nothing is left); returns its exit code."""
    if concurrency is not None and concurrency < 1:
        raise ConfigError(f"concurrency must be at least 1, got {concurrency}")
    configure_logging(log_format or settings.log_format, level=logging.getLevelName(log_level))
    redacting = RedactingFilter(configured_secrets(settings))
    for handler in logging.getLogger().handlers:
        handler.addFilter(redacting)
    name = name or runner_name()
    port = metrics_port if metrics_port is not None else settings.metrics_port
    with connect(settings) as client:
        runner = Runner(settings, client, connect_async(settings), name=name, concurrency=concurrency, burst=burst)
        if port is not None:
            try:
                port = runner.metrics.serve(port)
            except OSError as exc:
                raise ConfigError(f"cannot serve metrics on port {port}: {exc}") from exc
            EventLog(logging.getLogger("streamfold.runner"), worker=name).info("metrics_served", port=port)
        # What exists now lives as long as the process: frozen, it stays out of the collector's full passes.
        gc.freeze()
        try:
            return asyncio.run(_serve(runner))
        finally:
            runner.metrics.close()


async def _serve(runner: Runner) -> int:
    try:
        return await runner.run()
    finally:
        await runner.lease.client.aclose()
