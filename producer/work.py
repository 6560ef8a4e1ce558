"""``python -m producer work``: an rq worker for Streamfold's job queue, with logs that never show an API key.

rq's own ``rq worker --url <redis url> <queue>`` runs the same jobs; this wrapper takes the Redis URL and the
queue from the ``STREAMFOLD_*`` settings and puts a redacting filter in front of every log line, so a
configured upstream key that somehow reached a message is printed as ``[redacted]``.
"""

from __future__ import annotations

import logging

from rq import Worker

from producer.upstream import RedactingFilter, configured_secrets
from streamfold.connection import connect
from streamfold.settings import Settings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def run_worker(settings: Settings, *, burst: bool = False, name: str | None = None,
               log_level: str = "INFO") -> bool:
    """Work on ``settings.queue`` until stopped (or, with ``burst``, until it is empty).

    Returns whether any job was run, as rq's ``Worker.work`` does.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT, "%H:%M:%S"))
    handler.addFilter(RedactingFilter(configured_secrets(settings)))
    # rq logs through the root handler when there is one, so every line - rq's and ours - passes the filter.
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(log_level)
    try:
        with connect(settings) as client:
            worker = Worker([settings.queue], connection=client, name=name)
            return worker.work(burst=burst, logging_level=log_level)
    finally:
        root.removeHandler(handler)
